//! What a server knows about the other end of an accepted connection.

use std::net::SocketAddr;

use crate::SpiffeId;

/// The verified facts about an accepted connection, handed to request handlers.
///
/// gRPC servers in the control plane find it in `tonic::Request::extensions()`: the TLS
/// acceptor wraps each stream in a type whose `tonic::transport::server::Connected` impl
/// returns this value. `peer` is `Some` only when the client presented a certificate that
/// chained to the trust bundle and carried exactly one valid SPIFFE ID in the trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// The remote socket address.
    pub remote_addr: Option<SocketAddr>,
    /// The client's verified workload identity, if it presented a certificate.
    pub peer: Option<SpiffeId>,
}
