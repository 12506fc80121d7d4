//! Transparent capture in network namespaces, without the rest of the mesh: pod A runs
//! `trellis-proxy init`, stub listeners on its outbound (15001) and inbound (15006)
//! ports answer each connection with what `trellis_proxy::capture::original_dst` says,
//! and plain listeners answer with the address they were reached on. So every reply
//! says who answered and for which destination:
//!
//! ```text
//! outbound <original dst>   captured by the outbound rules
//! inbound <original dst>    captured by the inbound rules
//! direct <local addr>       not captured: the real listener answered
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
    sockopt,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_e2e::netns::{Network, Pod, PodTask};
use trellis_proxy::capture::original_dst;

/// Every connect and read in these tests is bounded: a capture bug shows up as a
/// timeout naming the destination, not as a hung test.
const WAIT: Duration = Duration::from_secs(5);

/// The proxy's UID, exempt from capture.
const PROXY_UID: u32 = 1337;

/// Pods A (captured, with stubs), B and C (plain listeners), and the tasks serving them.
struct Scene {
    // Declared first, dropped first: servers stop before their namespaces go.
    _servers: Vec<PodTask>,
    net: Network,
    a: Pod,
    b: Pod,
    c: Pod,
}

/// What a listener answers.
#[derive(Clone, Copy)]
enum Reply {
    /// `outbound <original dst>` or `inbound <original dst>`.
    Stub(&'static str),
    /// `direct <local addr>`.
    Direct,
}

/// Builds the scene and captures pod A with `init_args`.
async fn scene(init_args: &[&str]) -> Scene {
    let mut net = Network::new().unwrap();
    let (a, b, c) = (
        net.pod("a").unwrap(),
        net.pod("b").unwrap(),
        net.pod("c").unwrap(),
    );
    let mut servers = Vec::new();
    // Pod A: the outbound stub on a plain IPv4 socket and an IPv6-only one (both kinds
    // of socket a proxy may use), the inbound stub on a dual-stack socket (IPv4 arrives
    // as ::ffff:a.b.c.d), and plain listeners the rules must leave alone.
    servers.push(serve(
        &a,
        a.listen(addr("0.0.0.0", 15001)).unwrap(),
        Reply::Stub("outbound"),
    ));
    servers.push(serve(
        &a,
        listen_v6_only(&a, 15001),
        Reply::Stub("outbound"),
    ));
    servers.push(serve(
        &a,
        a.listen(addr("::", 15006)).unwrap(),
        Reply::Stub("inbound"),
    ));
    for port in [15020, 2222, 7070] {
        servers.push(serve(
            &a,
            a.listen(addr("::", port)).unwrap(),
            Reply::Direct,
        ));
    }
    for pod in [&b, &c] {
        for port in [8080, 8081] {
            servers.push(serve(
                pod,
                pod.listen(addr("::", port)).unwrap(),
                Reply::Direct,
            ));
        }
    }
    a.capture(init_args).await.unwrap();
    Scene {
        _servers: servers,
        net,
        a,
        b,
        c,
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// `[::]:port` with IPV6_V6ONLY, so it can share the port with `0.0.0.0:port`.
fn listen_v6_only(pod: &Pod, port: u16) -> std::net::TcpListener {
    pod.enter(move || -> nix::Result<std::net::TcpListener> {
        let fd: OwnedFd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(
                Ipv6Addr::UNSPECIFIED,
                port,
                0,
                0,
            )),
        )?;
        listen(&fd, Backlog::new(128)?)?;
        Ok(std::net::TcpListener::from(fd))
    })
    .unwrap()
    .unwrap()
}

/// Serves `listener` in `pod`: one line per connection, then close.
fn serve(pod: &Pod, listener: std::net::TcpListener, reply: Reply) -> PodTask {
    pod.spawn(move || async move {
        let listener = TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            let line = match reply {
                Reply::Stub(tag) => match original_dst(&tcp) {
                    Ok(orig) => format!("{tag} {orig}\n"),
                    Err(e) => format!("{tag} error {e}\n"),
                },
                Reply::Direct => format!("direct {}\n", unmapped(tcp.local_addr().unwrap())),
            };
            tokio::spawn(async move {
                let _ = tcp.write_all(line.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    })
}

/// `[::ffff:10.203.1.2]:80` -> `10.203.1.2:80`, as the client dialled it.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => sa(v4, v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// Connects to `dst` from a thread in `pod` (running as root: captured) and returns the
/// line the server sent.
async fn ask(pod: &Pod, dst: SocketAddr) -> String {
    pod.run(move || async move {
        let mut tcp = tokio::time::timeout(WAIT, TcpStream::connect(dst))
            .await
            .unwrap_or_else(|_| panic!("connect to {dst} timed out"))
            .unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
        let mut line = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no answer from {dst}"))
            .unwrap();
        line.trim_end().to_owned()
    })
    .await
}

/// Connects to `dst` from a `bash` process in `pod` running as `uid` (and GID `uid`).
async fn ask_as(pod: &Pod, uid: u32, dst: SocketAddr) -> String {
    bash_ask(pod.command_as(uid, "bash"), dst).await
}

/// Connects to `dst` from a `bash` process in `pod` running as `uid` and `gid`.
async fn ask_as_ids(pod: &Pod, uid: u32, gid: u32, dst: SocketAddr) -> String {
    let mut setpriv = pod.command("setpriv");
    setpriv.args([
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        "bash".into(),
    ]);
    bash_ask(setpriv, dst).await
}

async fn bash_ask(mut bash: tokio::process::Command, dst: SocketAddr) -> String {
    let script = format!("exec 3<>/dev/tcp/{}/{} && cat <&3", dst.ip(), dst.port());
    let out = tokio::time::timeout(WAIT, bash.args(["-c", &script]).output())
        .await
        .unwrap_or_else(|_| panic!("bash to {dst} timed out"))
        .unwrap();
    assert!(
        out.status.success(),
        "bash to {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
}

/// `iptables-save -t nat` (or ip6tables-save) in `pod`, only the lines naming Trellis
/// (built-in chains carry packet counters that change with traffic).
async fn trellis_rules(pod: &Pod, save: &str) -> Vec<String> {
    let out = pod
        .command(save)
        .args(["-t", "nat"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{save}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.contains("TRELLIS"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn outbound_tcp_is_redirected_with_its_original_destination() {
    let mut s = scene(&[]).await;
    let b = sa(s.b.ip, 8080);
    assert_eq!(ask(&s.a, b).await, format!("outbound {b}"));
    // A Service clusterIP nobody owns: only the capture can answer it.
    let svc = sa(s.net.service_ip(), 80);
    assert_eq!(ask(&s.a, svc).await, format!("outbound {svc}"));
    // A process (not just a thread) of the app is captured the same way.
    assert_eq!(ask_as(&s.a, 1000, b).await, format!("outbound {b}"));
    // And by name, as apps call Services: the pod's hosts file maps it to the clusterIP.
    let name = "web.demo.svc.cluster.local";
    s.a.hosts(&[(name, svc.ip())]).unwrap();
    let script = format!("exec 3<>/dev/tcp/{name}/80 && cat <&3");
    let out = tokio::time::timeout(WAIT, s.a.command("bash").args(["-c", &script]).output())
        .await
        .expect("bash by name timed out")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        format!("outbound {svc}"),
        "{stderr}"
    );
}

#[tokio::test]
async fn outbound_ipv6_is_redirected_with_its_original_destination() {
    let s = scene(&[]).await;
    let b6 = sa(s.b.ip6, 8080);
    assert_eq!(ask(&s.a, b6).await, format!("outbound {b6}"));
    assert_eq!(ask_as(&s.a, 1000, b6).await, format!("outbound {b6}"));
}

#[tokio::test]
async fn the_proxy_uid_is_never_redirected() {
    let s = scene(&[]).await;
    for dst in [sa(s.b.ip, 8080), sa(s.b.ip6, 8080)] {
        assert_eq!(ask_as(&s.a, PROXY_UID, dst).await, format!("direct {dst}"));
    }
    // Either id alone is enough: the proxy's UID with another group, or another UID in
    // the proxy's group; neither is the app's.
    let dst = sa(s.b.ip, 8081);
    let direct = format!("direct {dst}");
    assert_eq!(ask_as_ids(&s.a, PROXY_UID, 4000, dst).await, direct);
    assert_eq!(ask_as_ids(&s.a, 4000, PROXY_UID, dst).await, direct);
    assert_eq!(
        ask_as_ids(&s.a, 4000, 4000, dst).await,
        format!("outbound {dst}")
    );
}

#[tokio::test]
async fn excluded_ports_and_cidrs_go_direct() {
    let s = scene(&[]).await;
    // Re-run init with exclusions: C's address and port 8081 everywhere.
    let c_cidr = format!("{}/32,{}/128", s.c.ip, s.c.ip6);
    s.a.capture(&[
        "--exclude-outbound-ports",
        "8081",
        "--exclude-outbound-cidrs",
        &c_cidr,
    ])
    .await
    .unwrap();
    for dst in [
        sa(s.b.ip, 8081),
        sa(s.b.ip6, 8081),
        sa(s.c.ip, 8080),
        sa(s.c.ip6, 8080),
    ] {
        assert_eq!(ask(&s.a, dst).await, format!("direct {dst}"));
    }
    let b = sa(s.b.ip, 8080);
    assert_eq!(ask(&s.a, b).await, format!("outbound {b}"));
}

#[tokio::test]
async fn include_outbound_cidrs_captures_only_those() {
    let s = scene(&[]).await;
    let only_b = format!("{}/32", s.b.ip);
    s.a.capture(&["--include-outbound-cidrs", &only_b])
        .await
        .unwrap();
    let (b, c) = (sa(s.b.ip, 8080), sa(s.c.ip, 8080));
    assert_eq!(ask(&s.a, b).await, format!("outbound {b}"));
    assert_eq!(ask(&s.a, c).await, format!("direct {c}"));
    // No IPv6 CIDR listed: IPv6 is not captured outbound.
    let c6 = sa(s.c.ip6, 8080);
    assert_eq!(ask(&s.a, c6).await, format!("direct {c6}"));
}

#[tokio::test]
async fn loopback_and_the_pods_own_addresses_stay_local() {
    let s = scene(&[]).await;
    for ip in [
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from(Ipv6Addr::LOCALHOST),
        s.a.ip.into(),
        s.a.ip6.into(),
    ] {
        let dst = sa(ip, 7070);
        assert_eq!(ask(&s.a, dst).await, format!("direct {dst}"));
    }
}

#[tokio::test]
async fn inbound_tcp_is_redirected_with_its_original_destination() {
    let s = scene(&[]).await;
    for dst in [sa(s.a.ip, 9090), sa(s.a.ip6, 9090)] {
        assert_eq!(ask(&s.b, dst).await, format!("inbound {dst}"));
    }
}

#[tokio::test]
async fn admin_proxy_and_excluded_ports_are_not_captured_inbound() {
    let s = scene(&["--exclude-inbound-ports", "2222"]).await;
    for port in [15020, 2222] {
        for ip in [IpAddr::from(s.a.ip), s.a.ip6.into()] {
            let dst = sa(ip, port);
            assert_eq!(ask(&s.b, dst).await, format!("direct {dst}"));
        }
    }
    // Peers reach the inbound port directly (their mTLS); conntrack reports the port
    // itself as the destination, which is what the proxy compares with its own ports.
    let inbound = sa(s.a.ip, 15006);
    assert_eq!(ask(&s.b, inbound).await, format!("inbound {inbound}"));
    // The outbound port is excluded too: a connection to it from another pod reaches it
    // as is (the outbound listener refuses it as a loop), instead of being redirected to
    // the inbound port as if it were the app's.
    let outbound = sa(s.a.ip, 15001);
    assert_eq!(ask(&s.b, outbound).await, format!("outbound {outbound}"));
}

#[tokio::test]
async fn init_twice_gives_the_same_rules_and_cleanup_removes_them() {
    let s = scene(&[]).await;
    let v4 = trellis_rules(&s.a, "iptables-save").await;
    let v6 = trellis_rules(&s.a, "ip6tables-save").await;
    assert!(
        v4.contains(&"-A OUTPUT -p tcp -j TRELLIS_OUTPUT".to_owned()),
        "{v4:#?}"
    );
    assert!(
        v6.contains(&"-A PREROUTING -p tcp -j TRELLIS_INBOUND".to_owned()),
        "{v6:#?}"
    );
    assert!(
        v4.contains(&"-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN".to_owned()),
        "{v4:#?}"
    );

    s.a.capture(&[]).await.unwrap();
    assert_eq!(trellis_rules(&s.a, "iptables-save").await, v4);
    assert_eq!(trellis_rules(&s.a, "ip6tables-save").await, v6);

    s.a.capture(&["--cleanup"]).await.unwrap();
    assert_eq!(
        trellis_rules(&s.a, "iptables-save").await,
        Vec::<String>::new()
    );
    assert_eq!(
        trellis_rules(&s.a, "ip6tables-save").await,
        Vec::<String>::new()
    );
    // And the traffic agrees: nothing is captured any more.
    let b = sa(s.b.ip, 8080);
    assert_eq!(ask(&s.a, b).await, format!("direct {b}"));
    // Cleaning up a clean namespace is fine too.
    s.a.capture(&["--cleanup"]).await.unwrap();
}

#[tokio::test]
async fn init_reports_bad_flags_with_64_and_dry_run_changes_nothing() {
    let mut net = Network::new().unwrap();
    let a = net.pod("a").unwrap();
    let proxy = trellis_e2e::mesh::bin("trellis-proxy");
    let out = a
        .command(&proxy)
        .args(["init", "--exclude-outbound-cidrs", "10.0.0.1/8"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--exclude-outbound-cidrs") && err.contains("host bits"),
        "{err}"
    );

    let out = a
        .command(&proxy)
        .args(["init", "--dry-run"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed
            .contains("iptables -w -t nat -A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{printed}"
    );
    assert_eq!(
        trellis_rules(&a, "iptables-save").await,
        Vec::<String>::new()
    );
}
