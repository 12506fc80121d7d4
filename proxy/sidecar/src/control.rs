//! gRPC channels to the control plane over rustls, with the control plane's SPIFFE
//! identity checked by our own verifier (tonic's TLS config cannot check URI SANs).

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::config::ControlPlaneAddr;

/// Connects a gRPC channel to `addr`, running TLS with `tls` (which carries the expected
/// server identity and, once we have one, our client certificate).
pub async fn connect(
    addr: ControlPlaneAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    // The URI is only used for the :authority header; the connector decides where to go.
    let endpoint = Endpoint::from_static("http://trellis-control-plane")
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        let addr = addr.clone();
        async move {
            let tcp = addr.connect().await?;
            tcp.set_nodelay(true)?;
            // Our verifier ignores the name (SPIFFE certificates carry no DNS SAN); rustls
            // still needs one for SNI.
            let name = ServerName::try_from("trellis-control-plane")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    endpoint.connect_with_connector(connector).await
}
