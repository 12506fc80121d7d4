//! Flags of `trellis-proxy init`, each with a `TRELLIS_INIT_*` environment variable and a
//! default, parsed once into [`InitConfig`].
//!
//! Lists are comma-separated and may be empty (`--exclude-outbound-cidrs ''` turns the
//! IMDS default off). A bad value names the flag and exits 64, like `run`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::exec::Error;

/// Outbound listener of the proxy (`run --outbound`'s port).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Inbound listener of the proxy (`run --inbound`'s port).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Admin listener of the proxy: never captured inbound.
pub const DEFAULT_ADMIN_PORT: u16 = 15020;
/// The proxy runs as this UID and GID; its traffic is never captured.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Outbound destinations that bypass the proxy by default: the cloud instance metadata
/// service (IMDS on Azure, AWS, GCP). Node agents and SDKs fetch tokens there before any
/// proxy is ready, the answer is node-local, and mTLS to it is impossible anyway.
pub const DEFAULT_EXCLUDE_OUTBOUND_CIDRS: &str = "169.254.169.254/32";

/// Flags of `trellis-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Port of the proxy's outbound listener; the app's outbound TCP is redirected here.
    #[arg(long, env = "TRELLIS_INIT_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// Port of the proxy's inbound listener; inbound TCP to the pod is redirected here.
    #[arg(long, env = "TRELLIS_INIT_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port of the proxy's admin listener; never captured inbound.
    #[arg(long, env = "TRELLIS_INIT_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,
    /// UID the proxy runs as: its traffic is never captured.
    #[arg(long, env = "TRELLIS_INIT_PROXY_UID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// GID the proxy runs as: its traffic is never captured either.
    #[arg(long, env = "TRELLIS_INIT_PROXY_GID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_gid: u32,
    /// Outbound destination ports that go direct, not through the proxy (comma-separated).
    #[arg(long, env = "TRELLIS_INIT_EXCLUDE_OUTBOUND_PORTS", default_value = "")]
    pub exclude_outbound_ports: PortList,
    /// Outbound destination CIDRs that go direct (comma-separated, IPv4 and IPv6). The
    /// default is IMDS; giving the flag replaces it.
    #[arg(long, env = "TRELLIS_INIT_EXCLUDE_OUTBOUND_CIDRS", default_value = DEFAULT_EXCLUDE_OUTBOUND_CIDRS)]
    pub exclude_outbound_cidrs: CidrList,
    /// Outbound destination CIDRs that are captured: `*` for all, or a comma-separated
    /// list; a family with no CIDR in the list is not captured outbound at all.
    #[arg(long, env = "TRELLIS_INIT_INCLUDE_OUTBOUND_CIDRS", default_value = "*")]
    pub include_outbound_cidrs: OutboundCidrs,
    /// Inbound ports that reach the app directly (comma-separated). The admin, inbound and
    /// outbound ports are always excluded.
    #[arg(long, env = "TRELLIS_INIT_EXCLUDE_INBOUND_PORTS", default_value = "")]
    pub exclude_inbound_ports: PortList,
    /// Also program IPv6 (ip6tables), and fail if it is missing. Default: when ip6tables
    /// is installed.
    #[arg(long, conflicts_with = "no_ipv6")]
    pub ipv6: bool,
    /// Leave IPv6 alone.
    #[arg(long, env = "TRELLIS_INIT_NO_IPV6")]
    pub no_ipv6: bool,
    /// Remove every rule and chain `init` added, then exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Validated capture configuration: what [`super::rules`] turns into rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// Outbound listener port (REDIRECT target of the app's outbound TCP).
    pub outbound_port: u16,
    /// Inbound listener port (REDIRECT target of inbound TCP).
    pub inbound_port: u16,
    /// The proxy's UID; its traffic is not captured.
    pub proxy_uid: u32,
    /// The proxy's GID; its traffic is not captured.
    pub proxy_gid: u32,
    /// Outbound destination ports that go direct.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs that go direct.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound destinations that are captured.
    pub include_outbound_cidrs: OutboundCidrs,
    /// Inbound ports not captured: always the proxy's own ports, then the user's, no
    /// duplicates.
    pub exclude_inbound_ports: Vec<u16>,
    /// Program ip6tables too.
    pub ipv6: bool,
}

/// An IP network, `10.0.0.0/8` or `fd00::/8`; a bare address is a host (`/32`, `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A comma-separated list of CIDRs (may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

/// A comma-separated list of ports 1-65535 (may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

/// Which outbound destinations are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCidrs {
    /// Every destination (`*`).
    All,
    /// Only these (per family: none of a family means that family is not captured).
    Only(Vec<Cidr>),
}

// === impl InitConfig ===

impl InitConfig {
    /// Validates the flags. `ip6tables_found` resolves the IPv6 default: on when
    /// ip6tables is installed, unless `--no-ipv6`; `--ipv6` without it is an error.
    pub fn from_args(a: &InitArgs, ip6tables_found: bool) -> Result<Self, Error> {
        if a.outbound_port == a.inbound_port {
            return Err(Error::Config(format!(
                "--outbound-port and --inbound-port are both {}",
                a.outbound_port
            )));
        }
        if a.ipv6 && !ip6tables_found {
            return Err(Error::Config(
                "--ipv6 was asked for but ip6tables is not installed".into(),
            ));
        }
        let mut inbound = vec![a.inbound_port, a.outbound_port, a.admin_port];
        for p in &a.exclude_inbound_ports.0 {
            if !inbound.contains(p) {
                inbound.push(*p);
            }
        }
        Ok(Self {
            outbound_port: a.outbound_port,
            inbound_port: a.inbound_port,
            proxy_uid: a.proxy_uid,
            proxy_gid: a.proxy_gid,
            exclude_outbound_ports: a.exclude_outbound_ports.0.clone(),
            exclude_outbound_cidrs: a.exclude_outbound_cidrs.0.clone(),
            include_outbound_cidrs: a.include_outbound_cidrs.clone(),
            exclude_inbound_ports: inbound,
            ipv6: !a.no_ipv6 && (a.ipv6 || ip6tables_found),
        })
    }
}

impl Default for InitConfig {
    /// The defaults of every flag, with IPv6 on.
    fn default() -> Self {
        Self {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: DEFAULT_PROXY_UID,
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: vec![Cidr {
                addr: IpAddr::from([169, 254, 169, 254]),
                prefix: 32,
            }],
            include_outbound_cidrs: OutboundCidrs::All,
            exclude_inbound_ports: vec![
                DEFAULT_INBOUND_PORT,
                DEFAULT_OUTBOUND_PORT,
                DEFAULT_ADMIN_PORT,
            ],
            ipv6: true,
        }
    }
}

// === impl Cidr ===

impl Cidr {
    /// Whether this is an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
            },
        };
        // Host bits set usually mean a typo (10.1.2.3/8 for 10.1.2.0/24?): refuse rather
        // than silently widen or narrow what bypasses the proxy.
        let bits = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        };
        let host_mask = u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        let host_mask = if addr.is_ipv4() {
            host_mask & (u128::MAX << 96)
        } else {
            host_mask
        };
        if bits & host_mask != 0 {
            return Err(format!("{s:?} has host bits set after /{prefix}"));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

// === impl CidrList, PortList, OutboundCidrs ===

fn items(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty())
}

impl FromStr for CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        items(s).map(str::parse).collect::<Result<_, _>>().map(Self)
    }
}

impl FromStr for PortList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        items(s)
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{p:?} is not a port (1-65535)")),
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl FromStr for OutboundCidrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "*" {
            return Ok(Self::All);
        }
        s.parse::<CidrList>().map(|l| Self::Only(l.0))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InitArgs,
    }

    fn parse(argv: &[&str], ip6tables: bool) -> Result<InitConfig, String> {
        let argv = std::iter::once("init").chain(argv.iter().copied());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        InitConfig::from_args(&cli.args, ip6tables).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_proxy_ports_and_exclude_imds() {
        assert_eq!(parse(&[], true).unwrap(), InitConfig::default());
        assert!(!parse(&[], false).unwrap().ipv6);
        assert!(!parse(&["--no-ipv6"], true).unwrap().ipv6);
    }

    #[test]
    fn proxy_ports_are_always_excluded_inbound_without_duplicates() {
        let c = parse(&["--exclude-inbound-ports", "22, 15020,8443"], true).unwrap();
        assert_eq!(c.exclude_inbound_ports, [15006, 15001, 15020, 22, 8443]);
    }

    #[test]
    fn an_empty_list_turns_the_imds_default_off() {
        let c = parse(&["--exclude-outbound-cidrs", ""], true).unwrap();
        assert!(c.exclude_outbound_cidrs.is_empty());
    }

    #[test]
    fn cidrs_parse_strictly() {
        let ok = [
            "10.0.0.0/8",
            "10.1.2.3",
            "fd00:7e11::/64",
            "::1",
            "0.0.0.0/0",
        ];
        for s in ok {
            assert!(s.parse::<Cidr>().is_ok(), "{s}");
        }
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        let bad = [
            "10.1.2.3/8",
            "10.0.0.0/33",
            "fd00::1/64",
            "nope",
            "10.0.0.0/x",
        ];
        for s in bad {
            assert!(s.parse::<Cidr>().is_err(), "{s}");
        }
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (argv, flag) in [
            (
                &["--exclude-outbound-ports", "80,0"][..],
                "--exclude-outbound-ports",
            ),
            (
                &["--exclude-outbound-cidrs", "10.0.0.1/8"],
                "--exclude-outbound-cidrs",
            ),
            (&["--inbound-port", "0"], "--inbound-port"),
            (&["--outbound-port", "15006"], "--outbound-port"),
        ] {
            let e = parse(argv, true).unwrap_err();
            assert!(e.contains(flag), "{e}");
        }
        let e = parse(&["--ipv6"], false).unwrap_err();
        assert!(e.contains("ip6tables"), "{e}");
        assert!(parse(&["--ipv6", "--no-ipv6"], true).is_err());
    }

    #[test]
    fn include_cidrs_default_to_all() {
        assert_eq!(
            parse(&[], true).unwrap().include_outbound_cidrs,
            OutboundCidrs::All
        );
        let c = parse(&["--include-outbound-cidrs", "10.0.0.0/8"], true).unwrap();
        assert_eq!(
            c.include_outbound_cidrs,
            OutboundCidrs::Only(vec!["10.0.0.0/8".parse().unwrap()])
        );
    }
}
