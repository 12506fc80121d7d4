//! Discovery at scale: N simulated proxies on real gRPC streams against the real
//! discovery server, fed a synthetic cluster.
//!
//! ```text
//! cargo run --release -p trellis-discovery --example scale -- \
//!     --proxies 1000 --services 1000 --endpoints 10000 --changes 30
//! ```
//!
//! The server runs in a child process (this same binary with `--serve`), so its RSS and
//! CPU are its own; the driver (this process) opens one HTTP/2 connection and one stream
//! per simulated proxy, acks every version it receives, and times each change from the
//! moment it asks the server to make it until every affected proxy has acked it.
//!
//! Stand-in, named as such: the real server sits behind the control plane's mTLS
//! acceptor, which puts the client certificate's SPIFFE ID into each request. Here an
//! interceptor takes it from the `x-trellis-bench-identity` header instead, so the figures
//! are those of discovery itself, not of 1,000 TLS handshakes. The simulated proxies only
//! decode and ack (a real proxy applies too, on its own machine); one of them applies
//! every response with `trellis_api::apply` and the run fails if its final state differs
//! from the server's.

#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Server};
use tonic::{Request, Status};
use trellis_api::discovery::v1::discovery_client::DiscoveryClient;
use trellis_api::discovery::v1::discovery_request::Kind;
use trellis_api::discovery::v1::{Ack, DiscoveryRequest, DiscoveryResponse, Hello};
use trellis_api::{
    Endpoint, MeshSnapshot, Parts, Protocol, Service, ServiceKey, ServicePort, apply,
};
use trellis_discovery::{DiscoveryService, Metrics, Scope};
use trellis_identity::{ConnectInfo, SpiffeId};

const IDENTITY_HEADER: &str = "x-trellis-bench-identity";

#[derive(Debug, Clone, Parser)]
struct Args {
    /// Simulated proxies.
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// Services in the synthetic cluster.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints, spread evenly over the services.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Namespaces the services and proxies are spread over.
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    /// Endpoint changes to time, one at a time.
    #[arg(long, default_value_t = 30)]
    changes: usize,
    /// Proxies that disconnect and reconnect to time a full resync.
    #[arg(long, default_value_t = 100)]
    resync: usize,
    /// Discovery scope: `all` (every proxy sees every service, the default) or `own`
    /// (a proxy sees its own namespace and trellis-system).
    #[arg(long, default_value = "all")]
    scope: String,
    /// Internal: run as the server child.
    #[arg(long, hide = true)]
    serve: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.serve {
        runtime.block_on(serve(args))
    } else {
        runtime.block_on(drive(args))
    }
}

fn namespace(i: usize, args: &Args) -> String {
    format!("ns-{}", i % args.namespaces)
}

fn scope(args: &Args) -> anyhow::Result<Scope> {
    match args.scope.as_str() {
        "all" => Ok(Scope::all()),
        "own" => Ok(Scope::own_namespace()),
        other => bail!("--scope must be all or own, not {other:?}"),
    }
}

// === the server child ===

/// The synthetic cluster: service `svc-j` in `ns-(j % namespaces)`, endpoints dealt out
/// round-robin, each on its own pod IP.
fn cluster(args: &Args) -> MeshSnapshot {
    let mut services: Vec<Service> = (0..args.services)
        .map(|j| Service {
            key: ServiceKey::new(namespace(j, args), format!("svc-{j}")),
            hostnames: Vec::new(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
                endpoints: Vec::new(),
            }],
            addresses: vec![std::net::IpAddr::from([10, 96, (j >> 8) as u8, j as u8])],
        })
        .collect();
    for e in 0..args.endpoints {
        let j = e % args.services;
        let svc = &mut services[j];
        let n = e / args.services;
        svc.ports[0].endpoints.push(Endpoint {
            address: SocketAddr::from(([10, 1 + (e >> 16) as u8, (e >> 8) as u8, e as u8], 8080)),
            identity: format!("spiffe://cluster.local/ns/{}/sa/svc-{j}", svc.key.namespace),
            workload: format!("svc-{j}-{n}"),
            labels: BTreeMap::from([("app".to_owned(), format!("svc-{j}"))]),
        });
    }
    MeshSnapshot {
        version: 1,
        trust_domain: "cluster.local".into(),
        services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
        ..Default::default()
    }
}

/// Change `i`: the first endpoint of one service moves to a new pod IP.
fn change(snapshot: &MeshSnapshot, i: usize, args: &Args) -> (MeshSnapshot, String) {
    let mut next = snapshot.clone();
    next.version += 1;
    let j = (i * 7919) % args.services;
    let key = ServiceKey::new(namespace(j, args), format!("svc-{j}"));
    if let Some(endpoint) = next
        .services
        .get_mut(&key)
        .and_then(|svc| svc.ports[0].endpoints.first_mut())
    {
        endpoint.address = SocketAddr::from(([10, 200, (i >> 8) as u8, i as u8], 8080));
    }
    (next, key.namespace)
}

/// Serves discovery on loopback; reads `change <i>` lines on stdin and publishes each
/// change, answering `published <version> <namespace>` once it is on the watch channel.
async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut current = cluster(&args);
    let (tx, rx) = watch::channel(Arc::new(current.clone()));
    let mut registry = Registry::default();
    let service = DiscoveryService::new(rx, Metrics::new(&mut registry)).with_scope(scope(&args)?);
    let inject = move |mut req: Request<()>| -> Result<Request<()>, Status> {
        let peer = req
            .metadata()
            .get(IDENTITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| SpiffeId::parse(v).ok());
        let info = ConnectInfo {
            remote_addr: req.remote_addr(),
            peer,
        };
        req.extensions_mut().insert(info);
        Ok(req)
    };
    let server =
        tonic::service::interceptor::InterceptedService::new(service.into_server(), inject);
    tokio::spawn(
        Server::builder()
            .add_service(server)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    println!("listening {addr}");
    std::io::stdout().flush()?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let Some(i) = line.strip_prefix("change ") else {
            bail!("unknown command {line:?}");
        };
        let (next, ns) = change(&current, i.parse()?, &args);
        current = next;
        tx.send_replace(Arc::new(current.clone()));
        println!("published {} {ns}", current.version);
        std::io::stdout().flush()?;
    }
    Ok(())
}

// === the driver ===

/// What a simulated proxy reports for each response it acked.
struct Acked {
    proxy: usize,
    version: u64,
    full: bool,
    bytes: usize,
    at: Instant,
}

struct Child {
    process: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Child {
    fn start(args: &Args) -> anyhow::Result<(Self, SocketAddr)> {
        let exe = std::env::current_exe()?;
        let mut process = Command::new(exe)
            .args(std::env::args().skip(1))
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = process.stdin.take().context("child stdin")?;
        let stdout = process.stdout.take().context("child stdout")?;
        let mut stdout = std::io::BufReader::new(stdout).lines();
        let first = stdout.next().context("server exited")??;
        let addr = first
            .strip_prefix("listening ")
            .context("server said something else")?
            .parse()?;
        let _ = args;
        Ok((
            Self {
                process,
                stdin,
                stdout,
            },
            addr,
        ))
    }

    /// Asks for change `i`; the published version and the namespace it touched.
    fn change(&mut self, i: usize) -> anyhow::Result<(u64, String)> {
        writeln!(self.stdin, "change {i}")?;
        self.stdin.flush()?;
        let line = self.stdout.next().context("server exited")??;
        let mut words = line.split(' ').skip(1);
        let version = words.next().context("no version")?.parse()?;
        let ns = words.next().context("no namespace")?.to_owned();
        Ok((version, ns))
    }

    /// Resident set size in MiB and CPU seconds (user + system) so far.
    fn usage(&self) -> anyhow::Result<(f64, f64)> {
        let pid = self.process.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .context("VmRSS")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').context("stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // USER_HZ is 100 on every Linux this runs on.
        Ok((rss_kib / 1024.0, ticks / 100.0))
    }
}

/// One simulated proxy: Hello, then decode and ack every response until told to stop.
async fn proxy(
    id: usize,
    addr: SocketAddr,
    ns: String,
    acked: mpsc::UnboundedSender<Acked>,
    mut stop: watch::Receiver<bool>,
    check: Option<watch::Sender<MeshSnapshot>>,
) -> anyhow::Result<()> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = DiscoveryClient::new(channel);
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            kind: Some(Kind::Hello(Hello {
                workload: format!("client-{id}"),
                proxy_version: "bench".into(),
                last_version: 0,
                ..Hello::default()
            })),
        })
        .await?;
    let mut request = Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        IDENTITY_HEADER,
        format!("spiffe://cluster.local/ns/{ns}/sa/client-{id}").parse()?,
    );
    let mut responses = client.stream(request).await?.into_inner();
    let mut held = MeshSnapshot::default();
    let mut parts = Parts::default();
    let mut bytes = 0;
    loop {
        let part: DiscoveryResponse = tokio::select! {
            msg = responses.message() => match msg? {
                Some(resp) => resp,
                None => return Ok(()),
            },
            _ = stop.changed() => return Ok(()),
        };
        bytes += part.encoded_len();
        let Some(resp) = parts.push(part)? else {
            continue;
        };
        if let Some(check) = &check {
            held = apply(&held, &resp)?;
            check.send_replace(held.clone());
        }
        requests
            .send(DiscoveryRequest {
                kind: Some(Kind::Ack(Ack {
                    version: resp.version,
                })),
            })
            .await?;
        let _ = acked.send(Acked {
            proxy: id,
            version: resp.version,
            full: resp.full,
            bytes: std::mem::take(&mut bytes),
            at: Instant::now(),
        });
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Proxies that see a change in `ns` under `scope`.
fn affected(args: &Args, ns: &str) -> BTreeSet<usize> {
    (0..args.proxies)
        .filter(|&p| args.scope == "all" || namespace(p, args) == ns)
        .collect()
}

async fn drive(args: Args) -> anyhow::Result<()> {
    scope(&args)?;
    let (mut child, addr) = Child::start(&args)?;
    let (rss_idle, _) = child.usage()?;
    let (acked_tx, mut acked) = mpsc::unbounded_channel::<Acked>();
    let (stop_tx, stop) = watch::channel(false);
    let (check_tx, check) = watch::channel(MeshSnapshot::default());

    // Initial sync: every proxy connects at once and gets its full view.
    let started = Instant::now();
    let (_, cpu_before_sync) = child.usage()?;
    let mut tasks = Vec::new();
    for id in 0..args.proxies {
        let check = (id == 0).then(|| check_tx.clone());
        tasks.push(tokio::spawn(proxy(
            id,
            addr,
            namespace(id, &args),
            acked_tx.clone(),
            stop.clone(),
            check,
        )));
    }
    let mut full_bytes = Vec::new();
    while full_bytes.len() < args.proxies {
        let a = tokio::time::timeout(Duration::from_secs(120), acked.recv())
            .await
            .context("initial sync timed out")?
            .context("proxies gone")?;
        if a.full {
            full_bytes.push(a.bytes as f64);
        }
    }
    let sync_secs = started.elapsed().as_secs_f64();
    let (rss_synced, cpu_after_sync) = child.usage()?;
    let full_bytes = sorted(full_bytes);

    // One change at a time: from asking to the last affected proxy's ack.
    let mut latencies = Vec::new();
    let mut per_change_max = Vec::new();
    let mut change_bytes = Vec::new();
    let mut change_pushes = Vec::new();
    let (_, cpu_before_changes) = child.usage()?;
    for i in 0..args.changes {
        let asked = Instant::now();
        let (version, ns) = child.change(i)?;
        let mut waiting = affected(&args, &ns);
        let expected = waiting.len();
        let mut bytes = 0usize;
        let mut pushes = 0usize;
        let mut max = 0f64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !waiting.is_empty() {
            let a = tokio::time::timeout_at(deadline, acked.recv())
                .await
                .with_context(|| {
                    format!(
                        "change {i}: {} of {expected} proxies never acked",
                        waiting.len()
                    )
                })?
                .context("proxies gone")?;
            if a.version != version {
                continue;
            }
            bytes += a.bytes;
            pushes += 1;
            if waiting.remove(&a.proxy) {
                let ms = a.at.duration_since(asked).as_secs_f64() * 1e3;
                latencies.push(ms);
                max = max.max(ms);
            } else {
                bail!(
                    "change {i} in {ns} reached proxy {} outside its scope",
                    a.proxy
                );
            }
        }
        // Late pushes to unaffected proxies would show up on the next change as a stale
        // version and be skipped; count them here by draining briefly.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(a) = acked.try_recv() {
            if a.version == version {
                bail!(
                    "change {i} in {ns} reached proxy {} outside its scope",
                    a.proxy
                );
            }
        }
        per_change_max.push(max);
        change_bytes.push(bytes as f64);
        change_pushes.push(pushes as f64);
    }
    let (rss_after_changes, cpu_after_changes) = child.usage()?;

    // Full resync: some proxies drop their streams and reconnect.
    let resync = args.resync.min(args.proxies);
    for task in tasks.iter().take(resync) {
        task.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, cpu_before_resync) = child.usage()?;
    let resync_started = Instant::now();
    for (id, task) in tasks.iter_mut().enumerate().take(resync) {
        *task = tokio::spawn(proxy(
            id,
            addr,
            namespace(id, &args),
            acked_tx.clone(),
            stop.clone(),
            None,
        ));
    }
    let mut resynced = BTreeSet::new();
    while resynced.len() < resync {
        let a = tokio::time::timeout(Duration::from_secs(60), acked.recv())
            .await
            .context("resync timed out")?
            .context("proxies gone")?;
        if a.full {
            resynced.insert(a.proxy);
        }
    }
    let resync_secs = resync_started.elapsed().as_secs_f64();
    let (_, cpu_after_resync) = child.usage()?;

    // The one proxy that applied everything must hold exactly the server's final state.
    let mut expected = cluster(&args);
    for i in 0..args.changes {
        expected = change(&expected, i, &args).0;
    }
    let held = check.borrow().clone();
    let ns0 = namespace(0, &args);
    expected
        .services
        .retain(|k, _| args.scope == "all" || k.namespace == ns0);
    if held.services != expected.services {
        bail!("proxy 0's applied view differs from the server's final state");
    }

    let _ = stop_tx.send(true);
    drop(child.stdin);
    let _ = child.process.kill();

    let latencies = sorted(latencies);
    let per_change_max = sorted(per_change_max);
    let change_bytes = sorted(change_bytes);
    let change_pushes = sorted(change_pushes);
    println!(
        "## Discovery scale: {} proxies, {} services, {} endpoints, {} namespaces, scope {}",
        args.proxies, args.services, args.endpoints, args.namespaces, args.scope
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| initial sync, all proxies connected and acked | {sync_secs:.2} s ({:.2} CPU s on the server) |",
        cpu_after_sync - cpu_before_sync
    );
    println!(
        "| full view per proxy (p50) | {:.0} KiB |",
        percentile(&full_bytes, 50.0) / 1024.0
    );
    println!(
        "| one endpoint change, per-proxy ack latency p50 / p99 | {:.1} / {:.1} ms |",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0)
    );
    println!(
        "| one endpoint change, until every affected proxy acked, p50 / p99 | {:.1} / {:.1} ms |",
        percentile(&per_change_max, 50.0),
        percentile(&per_change_max, 99.0)
    );
    println!(
        "| proxies pushed per change (median) | {:.0} |",
        percentile(&change_pushes, 50.0)
    );
    println!(
        "| bytes sent per change, all proxies (median) | {:.0} ({:.0} per proxy) |",
        percentile(&change_bytes, 50.0),
        percentile(&change_bytes, 50.0) / percentile(&change_pushes, 50.0).max(1.0)
    );
    println!(
        "| server CPU per change | {:.1} ms |",
        (cpu_after_changes - cpu_before_changes) * 1e3 / args.changes.max(1) as f64
    );
    println!(
        "| full resync of {resync} proxies | {:.0} ms, {:.1} ms server CPU per proxy |",
        resync_secs * 1e3,
        (cpu_after_resync - cpu_before_resync) * 1e3 / resync.max(1) as f64
    );
    println!(
        "| server RSS: idle / synced / after changes | {rss_idle:.1} / {rss_synced:.1} / {rss_after_changes:.1} MiB |"
    );
    Ok(())
}
