//! The inbound side admits only peers with a certificate chained to the mesh root and a
//! valid SPIFFE identity; everything else is refused before any byte reaches the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use trellis_identity::test_util::TestCa;
use trellis_identity::{SpiffeId, Svid, TrustBundle};

use crate::request_path::start_mesh;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// Sends one HTTP/2 request straight to a proxy's inbound port with `tls`.
async fn direct_request(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<u16, String> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("peer").unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get("http://web.demo/direct")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_accepts_only_certificates_from_the_mesh_root() {
    let m = start_mesh().await;
    let web = id("spiffe://cluster.local/ns/demo/sa/web");
    let client = id("spiffe://cluster.local/ns/demo/sa/client");
    let mesh_roots =
        TrustBundle::from_pem(&std::fs::read_to_string(m.cp.root_pem()).unwrap()).unwrap();

    // Positive control: a certificate from the mesh CA (read from the control plane's
    // persisted root) gets through, so the refusals below are about the certificate.
    let ca = trellis_ca::CertificateAuthority::load_or_generate(
        &m.cp.state_dir().join("ca"),
        "cluster.local",
    )
    .unwrap();
    let csr = trellis_identity::generate_csr(&client).unwrap();
    let issued = ca.sign(&csr.csr_der, &client, None).unwrap();
    let chain = issued
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let good = Svid::new(chain, csr.key).unwrap();
    let tls = trellis_identity::client_config(Some(&good), &mesh_roots, &web, &[b"h2"]).unwrap();
    assert_eq!(direct_request(m.web.inbound, tls).await, Ok(200));
    assert_eq!(m.web_app.received().len(), 1);

    // Same identity, same trust domain, but signed by another root.
    let foreign = TestCa::new("cluster.local").issue(&client);
    let tls = trellis_identity::client_config(Some(&foreign), &mesh_roots, &web, &[b"h2"]).unwrap();
    let refused = direct_request(m.web.inbound, tls).await;
    assert!(
        refused.is_err(),
        "a certificate from another root was accepted: {refused:?}"
    );

    // No client certificate at all.
    let tls = trellis_identity::client_config(None, &mesh_roots, &web, &[b"h2"]).unwrap();
    let refused = direct_request(m.web.inbound, tls).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was accepted: {refused:?}"
    );

    assert_eq!(
        m.web_app.received().len(),
        1,
        "refused peers must not reach the app"
    );
    let failures = r#"trellis_proxy_tls_handshake_failures_total{direction="inbound"}"#;
    assert_eq!(m.web.metric(failures).await, Some(2.0));
    assert!(m.web.wait_log("mTLS handshake refused").await);
    let log = m.web.log();
    assert!(log.contains("mTLS handshake refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_a_peer_that_is_not_who_discovery_says() {
    // The mesh says web-1 (service account `web`) listens on `web_in`; an impostor with a
    // valid mesh certificate for another identity listens there instead.
    let m = start_mesh().await;
    let ca = trellis_ca::CertificateAuthority::load_or_generate(
        &m.cp.state_dir().join("ca"),
        "cluster.local",
    )
    .unwrap();
    let impostor_id = id("spiffe://cluster.local/ns/demo/sa/impostor");
    let csr = trellis_identity::generate_csr(&impostor_id).unwrap();
    let issued = ca.sign(&csr.csr_der, &impostor_id, None).unwrap();
    let svid = Svid::new(
        issued
            .chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        csr.key,
    )
    .unwrap();
    let bundle = TrustBundle::from_der(ca.trust_bundle_der()).unwrap();
    let server = trellis_identity::server_config(
        &svid,
        &bundle,
        trellis_identity::ClientAuth::Required,
        &[b"h2"],
    )
    .unwrap();

    // Stop the real web proxy and put the impostor on its port.
    let web_in = m.web.inbound;
    drop(m.web);
    let listener = bind_retry(web_in).await;
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            let count = count.clone();
            tokio::spawn(async move {
                if acceptor.accept(tcp).await.is_ok() {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let (status, headers, body) = trellis_e2e::http_get(m.client.outbound, "web.demo", "/")
        .await
        .unwrap();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-trellis-error"], "upstream");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the client proxy completed a handshake with an impostor"
    );
}

async fn bind_retry(addr: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not bind {addr}");
}
