//! What both suites build requests and listeners with.

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use trellis_identity::{ConnectInfo, SpiffeId};

pub(crate) const WAIT: Duration = Duration::from_secs(20);
pub(crate) const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub(crate) const CHECKOUT: &str = "spiffe://cluster.local/ns/payments/sa/checkout";

// === OTLP builders ===

pub(crate) fn attr(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

pub(crate) fn s(key: &str, value: &str) -> KeyValue {
    attr(key, any_value::Value::StringValue(value.to_owned()))
}

pub(crate) fn i(key: &str, value: i64) -> KeyValue {
    attr(key, any_value::Value::IntValue(value))
}

/// What a proxy reports about its workload (as `trace::resource` builds it).
pub(crate) fn workload(namespace: &str, service: &str, pod: &str) -> Resource {
    Resource {
        attributes: vec![
            s("service.name", service),
            s("service.namespace", namespace),
            s("service.instance.id", pod),
            s("k8s.pod.name", pod),
            s("k8s.namespace.name", namespace),
        ],
        ..Default::default()
    }
}

// === listeners ===

/// An interceptor that gives every request `peer` as its verified identity (`None`: a
/// TLS client without a certificate), as the serving binary's acceptor does.
pub(crate) fn as_peer(
    peer: Option<&str>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<> {
    let peer: Option<SpiffeId> = peer.map(|p| p.parse().unwrap());
    move |mut req: tonic::Request<()>| {
        let info = ConnectInfo {
            remote_addr: req.remote_addr(),
            peer: peer.clone(),
        };
        req.extensions_mut().insert(info);
        Ok(req)
    }
}

/// Serves `router` on a fresh loopback port; the task is pushed onto `servers`.
pub(crate) async fn serve(
    servers: &mut Vec<JoinHandle<()>>,
    router: tonic::transport::server::Router,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    servers.push(tokio::spawn(async move {
        let _ = router
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    }));
    addr
}

/// The value of one series in `registry`, e.g.
/// `trellis_telemetry_spans_dropped_total{reason="invalid"}`.
pub(crate) fn metric(registry: &Registry, series: &str) -> u64 {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .unwrap()
}
