//! The discovery server over a real tonic server and client on loopback.
//!
//! TLS is the serving binary's job, so these tests put the `ConnectInfo` its acceptor would
//! produce into each request with an interceptor instead.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codec::Streaming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Status};
use trellis_api::discovery::v1::discovery_client::DiscoveryClient;
use trellis_api::discovery::v1::discovery_request::Kind;
use trellis_api::discovery::v1::{Ack, DiscoveryRequest, DiscoveryResponse, Hello, Nack};
use trellis_api::{
    Endpoint, MeshSnapshot, Protocol, Service, ServiceKey, ServicePort, Trust, apply,
};
use trellis_discovery::{DiscoveryService, Metrics, ProxyStatus};
use trellis_identity::{ConnectInfo, SpiffeId};

/// Long enough for loopback on a loaded 2-core machine, short enough to fail fast.
const WAIT: Duration = Duration::from_secs(5);

struct Harness {
    addr: SocketAddr,
    snapshots: watch::Sender<Arc<MeshSnapshot>>,
    service: DiscoveryService,
    registry: Registry,
}

/// A proxy's side of one stream.
struct Proxy {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

fn web_id() -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::new("cluster.local", "demo", "web")?)
}

fn service(name: &str, endpoints: &[&str]) -> anyhow::Result<Service> {
    let endpoints = endpoints
        .iter()
        .map(|addr| {
            Ok(Endpoint {
                address: addr.parse()?,
                identity: format!("spiffe://cluster.local/ns/demo/sa/{name}"),
                workload: format!("{name}-1"),
                labels: BTreeMap::new(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Service {
        key: ServiceKey::new("demo", name),
        hostnames: Vec::new(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
            endpoints,
        }],
        addresses: Vec::new(),
    })
}

fn snapshot(version: u64, services: Vec<Service>) -> Arc<MeshSnapshot> {
    Arc::new(MeshSnapshot {
        version,
        trust_domain: "cluster.local".into(),
        services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
        ..Default::default()
    })
}

fn first_snapshot() -> anyhow::Result<Arc<MeshSnapshot>> {
    Ok(snapshot(
        1,
        vec![
            service("web", &["10.0.0.1:4143"])?,
            service("db", &["10.0.0.2:4143"])?,
        ],
    ))
}

fn hello() -> DiscoveryRequest {
    DiscoveryRequest {
        kind: Some(Kind::Hello(Hello {
            workload: "web-7d9f".into(),
            proxy_version: "0.1.0".into(),
            last_version: 0,
            ..Hello::default()
        })),
    }
}

/// Waits for `f` to hold, polling: registry updates happen on the server's stream task.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(WAIT, fut)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

// === impl Harness ===

impl Harness {
    /// Serves discovery on 127.0.0.1:0; every request carries `peer` as its verified identity.
    async fn start(peer: Option<SpiffeId>, hello_timeout: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (snapshots, rx) = watch::channel(first_snapshot()?);
        let mut registry = Registry::default();
        let service = DiscoveryService::new(rx, Metrics::new(&mut registry))
            .with_hello_timeout(hello_timeout);
        // Stands in for the binary's TLS acceptor.
        let inject = move |mut req: Request<()>| -> Result<Request<()>, Status> {
            let info = ConnectInfo {
                remote_addr: req.remote_addr(),
                peer: peer.clone(),
            };
            req.extensions_mut().insert(info);
            Ok(req)
        };
        let server = tonic::service::interceptor::InterceptedService::new(
            service.clone().into_server(),
            inject,
        );
        tokio::spawn(
            Server::builder()
                .add_service(server)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok(Self {
            addr,
            snapshots,
            service,
            registry,
        })
    }

    async fn client(&self) -> anyhow::Result<DiscoveryClient<Channel>> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?;
        Ok(DiscoveryClient::new(channel))
    }

    /// Opens a stream, optionally sending the Hello first.
    async fn open(&self, send_hello: bool) -> Result<Proxy, Status> {
        let mut client = self
            .client()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (requests, rx) = mpsc::channel(8);
        if send_hello {
            requests
                .send(hello())
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        let responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Proxy {
            requests,
            responses,
        })
    }

    fn metric(&self, name: &str) -> anyhow::Result<String> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        let line = text.lines().find(|l| l.split(' ').next() == Some(name));
        Ok(line
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("missing")
            .to_owned())
    }
}

// === impl Proxy ===

impl Proxy {
    async fn next(&mut self) -> anyhow::Result<DiscoveryResponse> {
        within("a response", self.responses.message())
            .await??
            .context("stream ended instead of a response")
    }

    async fn send(&self, kind: Kind) -> anyhow::Result<()> {
        Ok(self
            .requests
            .send(DiscoveryRequest { kind: Some(kind) })
            .await?)
    }
}

#[tokio::test]
async fn first_response_is_the_full_view_at_the_snapshot_version() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut proxy = harness.open(true).await?;
    let resp = proxy.next().await?;
    assert!(resp.full);
    assert_eq!(resp.version, 1);
    assert_eq!(resp.trust_domain, "cluster.local");
    assert_eq!(apply(&MeshSnapshot::default(), &resp)?, *first_snapshot()?);
    Ok(())
}

#[tokio::test]
async fn snapshot_change_arrives_as_incremental_diff() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut proxy = harness.open(true).await?;
    let held = apply(&MeshSnapshot::default(), &proxy.next().await?)?;

    // A version bump that changes nothing for the proxy is not pushed ...
    let same = MeshSnapshot {
        version: 2,
        ..(*first_snapshot()?).clone()
    };
    harness.snapshots.send_replace(Arc::new(same));
    let quiet = tokio::time::timeout(Duration::from_millis(200), proxy.responses.message()).await;
    assert!(quiet.is_err(), "an unchanged view was pushed: {quiet:?}");
    // ... so the next response is the real change: web scaled out, db gone, cache added.
    let changed = snapshot(
        3,
        vec![
            service("web", &["10.0.0.1:4143", "10.0.0.3:4143"])?,
            service("cache", &[])?,
        ],
    );
    harness.snapshots.send_replace(changed.clone());

    let resp = proxy.next().await?;
    assert!(!resp.full, "expected an incremental update");
    assert_eq!(resp.version, 3);
    assert_eq!(resp.removed, vec!["demo/db".to_owned()]);
    assert_eq!(resp.upserts.len(), 2);
    assert_eq!(apply(&held, &resp)?, *changed);
    Ok(())
}

/// A root rotation with no service change still reaches connected proxies: the trust is
/// part of the view, so a bundle or generation change alone is pushed, as an increment
/// carrying the whole new bundle.
#[tokio::test]
async fn trust_change_alone_is_pushed_with_the_bundle() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut proxy = harness.open(true).await?;
    let first = proxy.next().await?;
    assert!(first.full);
    assert!(first.trust_roots_der.is_empty(), "no bundle yet");
    let mut held = apply(&MeshSnapshot::default(), &first)?;

    let rotations = [
        (2, vec![b"old-root".to_vec()], 1),
        (3, vec![b"old-root".to_vec(), b"new-root".to_vec()], 1),
        (4, vec![b"old-root".to_vec(), b"new-root".to_vec()], 2),
        (5, vec![b"new-root".to_vec()], 2),
    ];
    for (version, roots_der, generation) in rotations {
        let next = Arc::new(MeshSnapshot {
            version,
            trust: Trust {
                roots_der: roots_der.clone(),
                generation,
            },
            ..(*first_snapshot()?).clone()
        });
        harness.snapshots.send_replace(next.clone());
        let resp = proxy.next().await?;
        assert!(!resp.full, "v{version}: expected an increment");
        assert_eq!(resp.version, version);
        assert!(resp.upserts.is_empty() && resp.removed.is_empty());
        assert_eq!(resp.trust_roots_der, roots_der, "v{version}");
        assert_eq!(resp.ca_generation, generation, "v{version}");
        held = apply(&held, &resp)?;
        assert_eq!(held, *next);
    }
    Ok(())
}

#[tokio::test]
async fn acks_and_nacks_show_in_proxies() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut proxy = harness.open(true).await?;
    let first = proxy.next().await?;
    proxy
        .send(Kind::Ack(Ack {
            version: first.version,
        }))
        .await?;
    eventually("the ack", || {
        harness
            .service
            .proxies()
            .iter()
            .any(|p| p.acked_version == Some(1))
    })
    .await?;
    assert_eq!(harness.metric("trellis_discovery_proxies_behind")?, "0");

    let [status]: [ProxyStatus; 1] = harness
        .service
        .proxies()
        .try_into()
        .map_err(|v| anyhow::anyhow!("proxies: {v:?}"))?;
    assert_eq!(status.identity, "spiffe://cluster.local/ns/demo/sa/web");
    assert_eq!(status.workload, "web-7d9f");
    assert_eq!(status.sent_version, 1);
    assert!(status.remote.is_some_and(|r| r.ip().is_loopback()));
    assert_eq!(status.last_nack, None);

    harness
        .snapshots
        .send_replace(snapshot(2, vec![service("web", &["10.0.0.9:4143"])?]));
    let second = proxy.next().await?;
    assert!(!second.full);
    proxy
        .send(Kind::Nack(Nack {
            version: 2,
            error: "no route".into(),
        }))
        .await?;
    eventually("the nack", || {
        harness
            .service
            .proxies()
            .iter()
            .any(|p| p.last_nack == Some((2, "no route".into())))
    })
    .await?;
    let status = harness.service.proxies();
    assert_eq!(
        status[0].acked_version,
        Some(1),
        "a nack keeps the last ack"
    );
    assert_eq!(status[0].sent_version, 2);

    // The proxy kept version 1, so the next push must not be a diff against version 2.
    harness
        .snapshots
        .send_replace(snapshot(3, vec![service("web", &["10.0.0.8:4143"])?]));
    let third = proxy.next().await?;
    assert!(third.full, "after a nack the next push is a full view");
    assert_eq!(third.version, 3);

    assert_eq!(harness.metric("trellis_discovery_acks_total")?, "1");
    assert_eq!(harness.metric("trellis_discovery_nacks_total")?, "1");
    assert_eq!(harness.metric("trellis_discovery_pushes_total")?, "3");
    assert_eq!(harness.metric("trellis_discovery_full_pushes_total")?, "2");
    assert_eq!(harness.metric("trellis_discovery_connected_proxies")?, "1");
    // Version 3 is sent and not acked: behind until the ack, and out of the count once
    // the stream is gone.
    assert_eq!(harness.metric("trellis_discovery_proxies_behind")?, "1");
    proxy.send(Kind::Ack(Ack { version: 3 })).await?;
    eventually("the ack of v3", || {
        harness
            .metric("trellis_discovery_proxies_behind")
            .ok()
            .as_deref()
            == Some("0")
    })
    .await?;
    assert!(harness.service.proxies()[0].synced);
    harness
        .snapshots
        .send_replace(snapshot(4, vec![service("web", &["10.0.0.7:4143"])?]));
    proxy.next().await?;
    assert_eq!(harness.metric("trellis_discovery_proxies_behind")?, "1");
    drop(proxy);
    eventually("the stream to end", || {
        harness
            .metric("trellis_discovery_connected_proxies")
            .ok()
            .as_deref()
            == Some("0")
    })
    .await?;
    assert_eq!(harness.metric("trellis_discovery_proxies_behind")?, "0");
    Ok(())
}

#[tokio::test]
async fn stream_without_peer_identity_is_unauthenticated() -> anyhow::Result<()> {
    let harness = Harness::start(None, Duration::from_secs(10)).await?;
    match harness.open(true).await {
        Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status}"),
        Ok(_) => bail!("stream without identity was accepted"),
    }
    assert!(harness.service.proxies().is_empty());
    Ok(())
}

#[tokio::test]
async fn stream_without_hello_is_closed_after_the_timeout() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_millis(200)).await?;
    let mut proxy = harness.open(false).await?;
    match within("the stream to close", proxy.responses.message()).await? {
        Err(status) => assert_eq!(status.code(), Code::DeadlineExceeded, "{status}"),
        Ok(resp) => bail!("expected an error, got {resp:?}"),
    }
    assert!(harness.service.proxies().is_empty());
    Ok(())
}

#[tokio::test]
async fn stream_starting_with_an_ack_is_refused() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut proxy = harness.open(false).await?;
    proxy.send(Kind::Ack(Ack { version: 1 })).await?;
    match within("the stream to close", proxy.responses.message()).await? {
        Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{status}"),
        Ok(resp) => bail!("expected an error, got {resp:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn disconnected_proxy_disappears_from_proxies() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut stays = harness.open(true).await?;
    let mut leaves = harness.open(true).await?;
    stays.next().await?;
    leaves.next().await?;
    eventually("two proxies", || harness.service.proxies().len() == 2).await?;

    drop(leaves);
    eventually("one proxy", || harness.service.proxies().len() == 1).await?;
    assert_eq!(harness.metric("trellis_discovery_connected_proxies")?, "1");

    // The other stream is unaffected and still gets updates.
    harness.snapshots.send_replace(snapshot(2, vec![]));
    assert_eq!(stays.next().await?.version, 2);
    Ok(())
}

/// The outbound traffic policy alone changing reaches a connected proxy as an increment
/// that carries it, and applying it gives the proxy the policy.
#[tokio::test]
async fn an_outbound_policy_change_reaches_the_proxy() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut proxy = harness.open(true).await?;
    let held = apply(&MeshSnapshot::default(), &proxy.next().await?)?;
    assert_eq!(held.outbound, trellis_api::OutboundPolicy::AllowAny);
    let strict = MeshSnapshot {
        version: 2,
        outbound: trellis_api::OutboundPolicy::RegistryOnly,
        ..(*first_snapshot()?).clone()
    };
    harness.snapshots.send_replace(Arc::new(strict));
    let resp = proxy.next().await?;
    assert!(!resp.full && resp.upserts.is_empty(), "{resp:?}");
    assert_eq!(
        apply(&held, &resp)?.outbound,
        trellis_api::OutboundPolicy::RegistryOnly
    );
    Ok(())
}

/// Authorization policies reach a connected proxy by its certificate's namespace: its
/// own and the root namespace's, never another namespace's; a change of policies alone is
/// pushed.
#[tokio::test]
async fn policies_of_the_proxys_namespace_reach_it() -> anyhow::Result<()> {
    use trellis_api::authz::{Action, AuthorizationPolicy, ROOT_NAMESPACE};
    let policy = |ns: &str, name: &str| AuthorizationPolicy {
        namespace: ns.into(),
        name: name.into(),
        target_services: vec!["web".into()],
        action: Action::Deny,
        dry_run: false,
        rules: Vec::new(),
    };
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    let mut proxy = harness.open(true).await?;
    let full = proxy.next().await?;
    assert_eq!(
        full.authorization.as_ref().map(|a| a.policies.len()),
        Some(0),
        "a full view always carries the set"
    );
    let held = apply(&MeshSnapshot::default(), &full)?;
    let mut policies = vec![
        policy("demo", "deny-web"),
        policy("other", "not-for-demo"),
        policy(ROOT_NAMESPACE, "mesh-wide"),
    ];
    policies.sort();
    harness.snapshots.send_replace(Arc::new(MeshSnapshot {
        version: 2,
        authorization: policies,
        ..(*first_snapshot()?).clone()
    }));
    let resp = proxy.next().await?;
    assert!(!resp.full && resp.upserts.is_empty(), "{resp:?}");
    let held = apply(&held, &resp)?;
    let keys: Vec<String> = held
        .authorization
        .iter()
        .map(AuthorizationPolicy::key)
        .collect();
    assert_eq!(keys, ["demo/deny-web", "trellis-system/mesh-wide"]);
    Ok(())
}

/// A proxy that stops reading does not hold up the others, and when it reads again it
/// gets the newest view in a few coalesced pushes, not one per change it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_proxy_blocks_nobody_and_catches_up_coalesced() -> anyhow::Result<()> {
    let harness = Harness::start(Some(web_id()?), Duration::from_secs(10)).await?;
    // Big enough that a few versions fill the stalled stream's HTTP/2 windows and buffer.
    let big = |version: u64, port: u16| -> anyhow::Result<Arc<MeshSnapshot>> {
        let services = (0..100)
            .map(|i| {
                let addrs: Vec<String> = (0..50).map(|e| format!("10.1.{i}.{e}:{port}")).collect();
                let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
                let mut svc = service(&format!("svc-{i}"), &addrs)?;
                svc.key = ServiceKey::new("demo", format!("svc-{i}"));
                Ok(svc)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(snapshot(version, services))
    };
    harness.snapshots.send_replace(big(2, 1)?);
    let mut stalled = harness.open(true).await?;
    let mut live = harness.open(true).await?;
    let mut held = apply(&MeshSnapshot::default(), &reassembled(&mut live).await?)?;
    let mut stalled_held = apply(&MeshSnapshot::default(), &reassembled(&mut stalled).await?)?;

    // 30 versions, each changing every endpoint; only `live` reads.
    for v in 3..33u64 {
        let next = big(v, u16::try_from(v)?)?;
        harness.snapshots.send_replace(next.clone());
        let resp = within("the live proxy's push", reassembled(&mut live)).await??;
        held = apply(&held, &resp)?;
        live.send(Kind::Ack(Ack {
            version: resp.version,
        }))
        .await?;
        assert_eq!(held.services, next.services, "live proxy behind at v{v}");
    }
    // The stalled proxy now reads: it ends exactly on the newest view, in far fewer
    // pushes than the 30 versions it missed.
    let mut pushes = 0;
    while stalled_held.version < 32 {
        let resp = within("the stalled proxy's catch-up", reassembled(&mut stalled)).await??;
        stalled_held = apply(&stalled_held, &resp)?;
        pushes += 1;
    }
    assert_eq!(stalled_held.services, held.services);
    eprintln!("stalled proxy caught up in {pushes} pushes");
    // What was already buffered when it stalled (bounded by bytes: windows and the
    // stream buffer), then one push from there to the newest.
    assert!(pushes <= 15, "{pushes} pushes to catch up on 30 versions");
    Ok(())
}

/// The next whole version on `proxy`'s stream, reassembled from its parts.
async fn reassembled(proxy: &mut Proxy) -> anyhow::Result<DiscoveryResponse> {
    let mut parts = trellis_api::Parts::default();
    loop {
        if let Some(whole) = parts.push(proxy.next().await?)? {
            return Ok(whole);
        }
    }
}
