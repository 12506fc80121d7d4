//! Transparent capture: `trellis-proxy init` programs the pod's network namespace with
//! iptables (nat) so the app's TCP reaches the proxy without any change to the app, and
//! [`original_dst`] tells the proxy where a captured connection was going.
//!
//! ```text
//! app  --connect 10.0.0.7:80-->  nat OUTPUT -> TRELLIS_OUTPUT -> TRELLIS_REDIRECT
//!                                  -> REDIRECT :15001 (outbound listener)
//! peer --connect pod-ip:9090-->  nat PREROUTING -> TRELLIS_INBOUND -> TRELLIS_IN_REDIRECT
//!                                  -> REDIRECT :15006 (inbound listener)
//! proxy (UID/GID 1337)        -> RETURN: never captured, so it never loops to itself
//! ```
//!
//! The rule list is a pure function of [`InitConfig`] ([`rules`]), table-tested; the
//! executor ([`apply`], [`cleanup`]) only runs it, idempotently: Trellis chains are
//! flushed and rebuilt, jumps into them are added only when missing. Modelled on Istio's
//! `istio-iptables`; the choices that differ are documented in [`rules`].

mod config;
mod exec;
mod rules;

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};
use tokio::net::TcpStream;

pub use config::{
    Cidr, CidrList, DEFAULT_ADMIN_PORT, DEFAULT_EXCLUDE_OUTBOUND_CIDRS, DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_UID, InitArgs, InitConfig, OutboundCidrs, PortList,
};
pub use exec::{Error, apply, cleanup, ip6tables_available, run_init};
pub use rules::{
    CHAINS, Family, IN_REDIRECT_CHAIN, INBOUND_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN,
    cleanup_commands, rules, setup_commands,
};

/// Where a captured connection was going before iptables redirected it to us.
///
/// Reads `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) from conntrack. An
/// IPv4 connection accepted on a dual-stack IPv6 socket (`[::ffff:a.b.c.d]`) is asked as
/// IPv4 and answered as an IPv4 address, which is what the app dialled.
///
/// A connection that was not redirected (someone dialled the listener itself) reports
/// the listener's own address, or fails with `ENOENT` when conntrack has no entry;
/// callers compare the answer with their own ports so a connection can never be sent
/// back to the proxy.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if ipv4 {
        let raw = getsockopt(stream, sockopt::OriginalDst)?;
        Ok(SocketAddrV4::from(SockaddrIn::from(raw)).into())
    } else {
        let raw = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddrV6::from(SockaddrIn6::from(raw)).into())
    }
}
