//! Pods as network namespaces: each pod gets its own namespace with `lo`, one `eth0`
//! (IPv4 `10.203.<net>.<n>/24`, IPv6 `fd00:7e11::<n>/64`) plugged into a Linux bridge
//! that lives in a namespace the harness also created. Nothing is added to the host's
//! namespace and nothing is routed out: pods reach each other and nobody else.
//!
//! ```text
//!   [trl-<pid>-<k>-a] eth0 --veth-- p1 \
//!                                        br0   [trl-<pid>-<k>-hub]
//!   [trl-<pid>-<k>-b] eth0 --veth-- p2 /
//! ```
//!
//! Code runs in a pod three ways: a process ([`Pod::command`], `ip netns exec`, which
//! also sees the pod's [`Pod::hosts`] file), a future on a thread that entered the pod
//! ([`Pod::run`], [`Pod::spawn`]: sockets it creates live in the pod; it sees the host's
//! `/etc/hosts`), or a blocking closure ([`Pod::enter`], e.g. to bind a listener before
//! a test connects to it).
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2, iptables and setpriv; fails
//! loudly, never skips, when namespaces cannot be made. Dropping the [`Network`] deletes
//! every namespace it made, also when the test panics; a test process killed by SIGKILL
//! leaves `trl-<pid>-*` namespaces behind (`ip netns list`).

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

use crate::mesh::bin;

/// Networks made by this process so far: part of every namespace name.
static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// First address of the pod subnet handed to Services (counting down), so pods
/// (counting up from 1) and Services never meet.
const FIRST_SERVICE_HOST: u8 = 250;

/// One isolated network of pods. Dropping it deletes every namespace it made.
pub struct Network {
    /// `trl-<pid>-<k>`: the prefix of every namespace name.
    prefix: String,
    /// Third octet of the pod subnet.
    net: u8,
    /// The namespace holding the bridge.
    hub: String,
    /// Every namespace made, hub first, for Drop.
    namespaces: Vec<String>,
    next_pod: u8,
    next_service: u8,
}

/// A pod: a network namespace with its addresses.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The name the test gave it.
    pub name: String,
    /// Its network namespace (`ip netns`).
    pub ns: String,
    /// Its IPv4 address on `eth0`.
    pub ip: Ipv4Addr,
    /// Its IPv6 address on `eth0`.
    pub ip6: Ipv6Addr,
}

/// A long-running future in a pod ([`Pod::spawn`]); stopped and joined when dropped.
pub struct PodTask {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

// === impl Network ===

impl Network {
    /// A new network: the hub namespace with its bridge, no pods yet.
    pub fn new() -> anyhow::Result<Network> {
        let k = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("trl-{}-{k}", std::process::id());
        let hub = format!("{prefix}-hub");
        ip(&["netns", "add", &hub]).with_context(|| {
            format!(
                "cannot create network namespace {hub}: the network-namespace tests need root \
                 (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; they fail rather than skip"
            )
        })?;
        let net = Network {
            prefix,
            // 1-250: readable in logs, never .0 or .255.
            net: u8::try_from(k % 250 + 1).unwrap_or(1),
            hub: hub.clone(),
            namespaces: vec![hub.clone()],
            next_pod: 1,
            next_service: FIRST_SERVICE_HOST,
        };
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// A new pod: its namespace, a veth pair to the bridge, its addresses, `lo` up.
    pub fn pod(&mut self, name: &str) -> anyhow::Result<Pod> {
        let valid = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            bail!("pod name {name:?}: use 1-20 of [a-z0-9-]");
        }
        let ns = format!("{}-{name}", self.prefix);
        if self.namespaces.contains(&ns) {
            bail!("pod {name:?} exists already");
        }
        let n = self.next_pod;
        if n >= self.next_service {
            bail!("no address left in 10.203.{}.0/24", self.net);
        }
        self.next_pod += 1;
        ip(&["netns", "add", &ns]).with_context(|| format!("cannot create namespace {ns}"))?;
        self.namespaces.push(ns.clone());
        let pod = Pod {
            name: name.to_owned(),
            ns: ns.clone(),
            ip: Ipv4Addr::new(10, 203, self.net, n),
            ip6: Ipv6Addr::new(0xfd00, 0x7e11, 0, 0, 0, 0, 0, u16::from(n)),
        };
        // Both ends are created inside their namespaces (never in the host's), so the
        // interface names only need to be unique per namespace: `eth0` and `p<n>`.
        let port = format!("p{n}");
        let (v4, v6) = (format!("{}/24", pod.ip), format!("{}/64", pod.ip6));
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
            &self.hub,
        ])?;
        ip(&["-n", &self.hub, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &ns, "addr", "add", &v4, "dev", "eth0"])?;
        // nodad: usable at once instead of "tentative" for a second or two.
        ip(&["-n", &ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(pod)
    }

    /// An address in the pod subnet that no pod has: a Service's clusterIP, which only
    /// a capturing proxy can answer (nobody replies to ARP for it).
    pub fn service_ip(&mut self) -> Ipv4Addr {
        let n = self.next_service;
        assert!(
            n >= self.next_pod,
            "no address left in 10.203.{}.0/24",
            self.net
        );
        self.next_service -= 1;
        Ipv4Addr::new(10, 203, self.net, n)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("netns harness: {e:#}");
            }
            let _ = std::fs::remove_dir_all(etc_dir(ns));
        }
    }
}

// === impl Pod ===

impl Pod {
    /// `ip netns exec <ns> <program>`, killed when dropped.
    pub fn command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .arg(program)
            .kill_on_drop(true);
        c
    }

    /// [`Pod::command`] as `uid` (also its GID, no supplementary groups), e.g. the
    /// proxy's 1337.
    pub fn command_as(&self, uid: u32, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut c = self.command("setpriv");
        c.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
        ])
        .arg(program);
        c
    }

    /// Writes `/etc/netns/<ns>/hosts` (localhost plus `entries`): what processes started
    /// with [`Pod::command`] see as `/etc/hosts`.
    pub fn hosts(&self, entries: &[(&str, IpAddr)]) -> anyhow::Result<()> {
        let dir = etc_dir(&self.ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, addr) in entries {
            text.push_str(&format!("{addr} {name}\n"));
        }
        let path = dir.join("hosts");
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }

    /// Runs `trellis-proxy init <extra_args>` in the pod; its stderr is the error.
    pub async fn capture(&self, extra_args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .command(bin("trellis-proxy"))
            .arg("init")
            .args(extra_args)
            .output()
            .await
            .context("cannot start trellis-proxy init")?;
        if !out.status.success() {
            bail!(
                "trellis-proxy init {} in pod {} failed ({}): {}",
                extra_args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `f` to completion on a new thread inside the pod, on its own current-thread
    /// runtime; a panic in `f` is a panic here.
    pub async fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let ns = self.ns.clone();
        std::thread::Builder::new()
            .name(format!("pod-{}", self.name))
            .spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    enter_ns(&ns).unwrap();
                    runtime().block_on(f())
                }));
                let _ = tx.send(result);
            })
            .expect("spawn a pod thread");
        match rx.await.expect("the pod thread ended without an answer") {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Runs `f` (a server, say) in the pod on its own thread and runtime until the
    /// returned [`PodTask`] is dropped.
    pub fn spawn<F, Fut>(&self, f: F) -> PodTask
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let ns = self.ns.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pod-{}", self.name))
            .spawn(move || {
                enter_ns(&ns).unwrap();
                runtime().block_on(async move {
                    tokio::select! {
                        () = f() => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn a pod thread");
        PodTask {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs blocking `f` inside the pod and returns its result (a scoped thread).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let ns = &self.ns;
        std::thread::scope(|s| {
            s.spawn(move || -> anyhow::Result<T> {
                enter_ns(ns)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A non-blocking listener bound inside the pod (ready for `TcpListener::from_std`):
    /// bound before the test goes on, so no client can race it.
    pub fn listen(&self, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
        let l = self
            .enter(|| std::net::TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in pod {}", self.name))?;
        l.set_nonblocking(true)?;
        Ok(l)
    }
}

// === impl PodTask ===

impl Drop for PodTask {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("netns harness: a pod task panicked");
        }
    }
}

/// Moves the calling thread into namespace `ns` (threads it starts later follow).
fn enter_ns(ns: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).with_context(|| format!("open {path}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {ns}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// Runs `ip args`; the error names the command and carries its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = StdCommand::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
