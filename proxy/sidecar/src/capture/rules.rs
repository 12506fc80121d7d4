//! The capture rules as a pure function of [`InitConfig`]: what `init` installs, in
//! order, as iptables/ip6tables argument vectors.
//!
//! Chains (table `nat`, one set per IP family):
//!
//! ```text
//! OUTPUT     -p tcp -> TRELLIS_OUTPUT
//!   owner UID 1337           RETURN   the proxy's own traffic: never captured, never loops
//!   owner GID 1337           RETURN
//!   -o lo                    RETURN   stays in the pod: 127.0.0.1, ::1 and the pod's own IPs
//!   excluded ports / CIDRs   RETURN   (IMDS by default)
//!   included CIDRs (all)  -> TRELLIS_REDIRECT -> REDIRECT --to-ports 15001
//! PREROUTING -p tcp -> TRELLIS_INBOUND
//!   excluded ports           RETURN   always 15006, 15001, 15020, then the user's
//!   everything else       -> TRELLIS_IN_REDIRECT -> REDIRECT --to-ports 15006
//! ```
//!
//! App to its own pod IP: not captured. The kernel routes it over `lo`, and it never
//! leaves the pod, exactly like app to 127.0.0.1; capturing it would only send the app's
//! call through its own outbound and inbound proxy for no security gain. Istio does the
//! same for the app; its extra rule that sends the *proxy's* `lo` traffic to the inbound
//! chain exists because Envoy forwards inbound traffic to the pod IP, whereas the Trellis
//! proxy reaches its app on `--app` (loopback) and peers on their `:15006` directly, so
//! the proxy's traffic is simply never captured.

use super::config::{InitConfig, OutboundCidrs};

/// Chain the nat OUTPUT chain jumps to: the app's outbound TCP.
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
/// Chain holding the outbound REDIRECT.
pub const REDIRECT_CHAIN: &str = "TRELLIS_REDIRECT";
/// Chain the nat PREROUTING chain jumps to: TCP arriving at the pod.
pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
/// Chain holding the inbound REDIRECT.
pub const IN_REDIRECT_CHAIN: &str = "TRELLIS_IN_REDIRECT";
/// Every chain `init` owns, in creation order.
pub const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// The table every rule lives in.
const TABLE: &str = "nat";

/// An IP family and the program that programs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

/// What an iptables invocation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `-N`: create a chain.
    New,
    /// `-F`: flush a chain.
    Flush,
    /// `-X`: delete an empty chain.
    DeleteChain,
    /// `-S`: list a chain (succeeds only if it exists).
    List,
    /// `-A`: append a rule.
    Append,
    /// `-C`: does the rule exist?
    Check,
    /// `-D`: delete a rule.
    Delete,
}

/// One iptables invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cmd {
    pub(crate) family: Family,
    pub(crate) op: Op,
    pub(crate) chain: &'static str,
    pub(crate) spec: Vec<String>,
}

/// Every `-A` rule for `cfg`: IPv4 first, then IPv6 when enabled; per family the
/// Trellis chains' rules first, the jumps from `PREROUTING`/`OUTPUT` last (so traffic
/// only enters chains that are complete).
pub fn rules(cfg: &InitConfig) -> Vec<Vec<String>> {
    families(cfg)
        .flat_map(|f| appends(cfg, f))
        .map(|c| c.argv())
        .collect()
}

/// What `init` runs on a namespace without Trellis rules (and what `--dry-run` prints):
/// per family, create the chains, then [`rules`]. On a namespace that has them, the
/// executor flushes instead of creating and skips jumps that exist.
pub fn setup_commands(cfg: &InitConfig) -> Vec<Vec<String>> {
    setup(cfg).iter().map(Cmd::argv).collect()
}

/// What `init --cleanup` runs: per family, delete the jumps, flush and delete the chains.
pub fn cleanup_commands(cfg: &InitConfig) -> Vec<Vec<String>> {
    teardown(cfg).iter().map(Cmd::argv).collect()
}

pub(crate) fn setup(cfg: &InitConfig) -> Vec<Cmd> {
    let mut out = Vec::new();
    for f in families(cfg) {
        out.extend(CHAINS.iter().map(|c| Cmd::new(f, Op::New, c, &[])));
        out.extend(appends(cfg, f));
    }
    out
}

pub(crate) fn teardown(cfg: &InitConfig) -> Vec<Cmd> {
    let mut out = Vec::new();
    for f in families(cfg) {
        out.extend(jumps(f).into_iter().map(|j| Cmd {
            op: Op::Delete,
            ..j
        }));
        out.extend(CHAINS.iter().map(|c| Cmd::new(f, Op::Flush, c, &[])));
        out.extend(CHAINS.iter().map(|c| Cmd::new(f, Op::DeleteChain, c, &[])));
    }
    out
}

fn families(cfg: &InitConfig) -> impl Iterator<Item = Family> {
    [Family::V4, Family::V6]
        .into_iter()
        .filter(move |f| *f == Family::V4 || cfg.ipv6)
}

/// The jumps into Trellis chains from the built-in ones.
fn jumps(f: Family) -> Vec<Cmd> {
    vec![
        Cmd::new(
            f,
            Op::Append,
            "PREROUTING",
            &["-p", "tcp", "-j", INBOUND_CHAIN],
        ),
        Cmd::new(f, Op::Append, "OUTPUT", &["-p", "tcp", "-j", OUTPUT_CHAIN]),
    ]
}

fn appends(cfg: &InitConfig, f: Family) -> Vec<Cmd> {
    let rule = |chain, spec: &[&str]| Cmd::new(f, Op::Append, chain, spec);
    let mut out = Vec::new();

    // Inbound: the proxy's own ports and the user's exclusions reach their listener.
    for port in &cfg.exclude_inbound_ports {
        let port = port.to_string();
        out.push(rule(
            INBOUND_CHAIN,
            &["-p", "tcp", "--dport", &port, "-j", "RETURN"],
        ));
    }
    out.push(rule(INBOUND_CHAIN, &["-p", "tcp", "-j", IN_REDIRECT_CHAIN]));
    let inbound = cfg.inbound_port.to_string();
    out.push(rule(
        IN_REDIRECT_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound],
    ));

    // Outbound: the proxy first, so nothing below can ever send it back to itself.
    let (uid, gid) = (cfg.proxy_uid.to_string(), cfg.proxy_gid.to_string());
    out.push(rule(
        OUTPUT_CHAIN,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    out.push(rule(
        OUTPUT_CHAIN,
        &["-m", "owner", "--gid-owner", &gid, "-j", "RETURN"],
    ));
    out.push(rule(OUTPUT_CHAIN, &["-o", "lo", "-j", "RETURN"]));
    for port in &cfg.exclude_outbound_ports {
        let port = port.to_string();
        out.push(rule(
            OUTPUT_CHAIN,
            &["-p", "tcp", "--dport", &port, "-j", "RETURN"],
        ));
    }
    let of_family = |c: &&super::config::Cidr| c.is_ipv4() == (f == Family::V4);
    for cidr in cfg.exclude_outbound_cidrs.iter().filter(of_family) {
        out.push(rule(
            OUTPUT_CHAIN,
            &["-d", &cidr.to_string(), "-j", "RETURN"],
        ));
    }
    match &cfg.include_outbound_cidrs {
        OutboundCidrs::All => out.push(rule(OUTPUT_CHAIN, &["-j", REDIRECT_CHAIN])),
        OutboundCidrs::Only(cidrs) => {
            for cidr in cidrs.iter().filter(of_family) {
                let cidr = cidr.to_string();
                out.push(rule(OUTPUT_CHAIN, &["-d", &cidr, "-j", REDIRECT_CHAIN]));
            }
        }
    }
    let outbound = cfg.outbound_port.to_string();
    out.push(rule(
        REDIRECT_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound],
    ));

    out.extend(jumps(f));
    out
}

// === impl Family ===

impl Family {
    /// The program for this family.
    pub fn program(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

// === impl Cmd ===

impl Cmd {
    fn new(family: Family, op: Op, chain: &'static str, spec: &[&str]) -> Self {
        let spec = spec.iter().map(|s| (*s).to_owned()).collect();
        Self {
            family,
            op,
            chain,
            spec,
        }
    }

    /// Whether the chain is one of the kernel's (a jump we add to it may already exist).
    pub(crate) fn builtin_chain(&self) -> bool {
        !CHAINS.contains(&self.chain)
    }

    /// The same rule with another operation (`-C` before `-A`, `-S` before `-N`).
    pub(crate) fn with(&self, op: Op) -> Self {
        let spec = if matches!(op, Op::List | Op::Flush | Op::New | Op::DeleteChain) {
            Vec::new()
        } else {
            self.spec.clone()
        };
        Self {
            op,
            spec,
            ..self.clone()
        }
    }

    /// `iptables -w -t nat -A CHAIN ...`. `-w` waits for the xtables lock: with the
    /// legacy backend that lock is shared by every namespace on the host.
    pub(crate) fn argv(&self) -> Vec<String> {
        let op = match self.op {
            Op::New => "-N",
            Op::Flush => "-F",
            Op::DeleteChain => "-X",
            Op::List => "-S",
            Op::Append => "-A",
            Op::Check => "-C",
            Op::Delete => "-D",
        };
        let head = [self.family.program(), "-w", "-t", TABLE, op, self.chain];
        head.iter()
            .map(|s| (*s).to_owned())
            .chain(self.spec.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::config::Cidr;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    /// The rules of one family and chain, without the `iptables -w -t nat -A CHAIN` head.
    fn chain(cfg: &InitConfig, program: &str, name: &str) -> Vec<String> {
        rules(cfg)
            .into_iter()
            .filter(|r| r[0] == program && r[5] == name)
            .map(|r| r[6..].join(" "))
            .collect()
    }

    #[test]
    fn default_rules_in_order() {
        let cfg = InitConfig::default();
        assert_eq!(
            chain(&cfg, "iptables", OUTPUT_CHAIN),
            [
                "-m owner --uid-owner 1337 -j RETURN",
                "-m owner --gid-owner 1337 -j RETURN",
                "-o lo -j RETURN",
                "-d 169.254.169.254/32 -j RETURN",
                "-j TRELLIS_REDIRECT",
            ]
        );
        assert_eq!(
            chain(&cfg, "iptables", REDIRECT_CHAIN),
            ["-p tcp -j REDIRECT --to-ports 15001"]
        );
        assert_eq!(
            chain(&cfg, "iptables", INBOUND_CHAIN),
            [
                "-p tcp --dport 15006 -j RETURN",
                "-p tcp --dport 15001 -j RETURN",
                "-p tcp --dport 15020 -j RETURN",
                "-p tcp -j TRELLIS_IN_REDIRECT",
            ]
        );
        assert_eq!(
            chain(&cfg, "iptables", IN_REDIRECT_CHAIN),
            ["-p tcp -j REDIRECT --to-ports 15006"]
        );
        assert_eq!(
            chain(&cfg, "iptables", "OUTPUT"),
            ["-p tcp -j TRELLIS_OUTPUT"]
        );
        assert_eq!(
            chain(&cfg, "iptables", "PREROUTING"),
            ["-p tcp -j TRELLIS_INBOUND"]
        );
    }

    #[test]
    fn ipv6_gets_the_same_rules_without_ipv4_cidrs() {
        let cfg = InitConfig::default();
        let v6 = chain(&cfg, "ip6tables", OUTPUT_CHAIN);
        assert_eq!(
            v6,
            [
                "-m owner --uid-owner 1337 -j RETURN",
                "-m owner --gid-owner 1337 -j RETURN",
                "-o lo -j RETURN",
                "-j TRELLIS_REDIRECT",
            ]
        );
        assert_eq!(
            chain(&cfg, "ip6tables", INBOUND_CHAIN),
            chain(&cfg, "iptables", INBOUND_CHAIN)
        );
        let no_v6 = InitConfig {
            ipv6: false,
            ..InitConfig::default()
        };
        assert!(rules(&no_v6).iter().all(|r| r[0] == "iptables"));
    }

    #[test]
    fn proxy_uid_and_gid_return_before_any_redirect() {
        let cfg = InitConfig {
            proxy_uid: 1500,
            proxy_gid: 1600,
            ..InitConfig::default()
        };
        for program in ["iptables", "ip6tables"] {
            let out = chain(&cfg, program, OUTPUT_CHAIN);
            assert_eq!(out[0], "-m owner --uid-owner 1500 -j RETURN");
            assert_eq!(out[1], "-m owner --gid-owner 1600 -j RETURN");
        }
    }

    #[test]
    fn excluded_ports_and_cidrs_return_before_the_redirect() {
        let cfg = InitConfig {
            exclude_outbound_ports: vec![5432, 6379],
            exclude_outbound_cidrs: vec![cidr("10.96.0.1/32"), cidr("fd00:1::/64")],
            ..InitConfig::default()
        };
        let v4 = chain(&cfg, "iptables", OUTPUT_CHAIN);
        assert_eq!(
            v4[3..],
            [
                "-p tcp --dport 5432 -j RETURN",
                "-p tcp --dport 6379 -j RETURN",
                "-d 10.96.0.1/32 -j RETURN",
                "-j TRELLIS_REDIRECT",
            ]
        );
        let v6 = chain(&cfg, "ip6tables", OUTPUT_CHAIN);
        assert_eq!(
            v6[3..],
            [
                "-p tcp --dport 5432 -j RETURN",
                "-p tcp --dport 6379 -j RETURN",
                "-d fd00:1::/64 -j RETURN",
                "-j TRELLIS_REDIRECT",
            ]
        );
    }

    #[test]
    fn included_cidrs_replace_the_catch_all_per_family() {
        let cfg = InitConfig {
            include_outbound_cidrs: OutboundCidrs::Only(vec![cidr("10.0.0.0/8")]),
            ..InitConfig::default()
        };
        let v4 = chain(&cfg, "iptables", OUTPUT_CHAIN);
        assert_eq!(v4.last().unwrap(), "-d 10.0.0.0/8 -j TRELLIS_REDIRECT");
        assert!(!v4.contains(&"-j TRELLIS_REDIRECT".to_owned()));
        // No IPv6 CIDR listed: IPv6 is not captured outbound (inbound still is).
        let v6 = chain(&cfg, "ip6tables", OUTPUT_CHAIN);
        assert!(v6.iter().all(|r| !r.contains(REDIRECT_CHAIN)), "{v6:?}");
        assert_eq!(chain(&cfg, "ip6tables", IN_REDIRECT_CHAIN).len(), 1);
    }

    #[test]
    fn custom_ports_follow_the_config() {
        let cfg = InitConfig {
            outbound_port: 16001,
            inbound_port: 16006,
            exclude_inbound_ports: vec![16006, 16001, 15020, 22],
            ..InitConfig::default()
        };
        assert_eq!(
            chain(&cfg, "iptables", REDIRECT_CHAIN),
            ["-p tcp -j REDIRECT --to-ports 16001"]
        );
        assert_eq!(
            chain(&cfg, "iptables", IN_REDIRECT_CHAIN),
            ["-p tcp -j REDIRECT --to-ports 16006"]
        );
        assert_eq!(
            chain(&cfg, "iptables", INBOUND_CHAIN)[3],
            "-p tcp --dport 22 -j RETURN"
        );
    }

    #[test]
    fn jumps_come_after_the_chains_they_enter() {
        let all = rules(&InitConfig::default());
        for program in ["iptables", "ip6tables"] {
            let of: Vec<_> = all.iter().filter(|r| r[0] == program).collect();
            let first_jump = of
                .iter()
                .position(|r| r[5] == "PREROUTING" || r[5] == "OUTPUT");
            assert_eq!(first_jump, Some(of.len() - 2), "{of:?}");
        }
        // IPv4 entirely before IPv6.
        let first_v6 = all.iter().position(|r| r[0] == "ip6tables").unwrap();
        assert!(all[first_v6..].iter().all(|r| r[0] == "ip6tables"));
    }

    #[test]
    fn every_command_waits_for_the_lock_and_uses_nat() {
        let cfg = InitConfig::default();
        for argv in setup_commands(&cfg).iter().chain(&cleanup_commands(&cfg)) {
            assert_eq!(argv[1..4], ["-w", "-t", "nat"], "{argv:?}");
        }
    }

    #[test]
    fn setup_creates_chains_before_rules_and_cleanup_reverses_it() {
        let cfg = InitConfig {
            ipv6: false,
            ..InitConfig::default()
        };
        let setup: Vec<String> = setup_commands(&cfg)
            .iter()
            .map(|a| a[4..6].join(" "))
            .collect();
        assert_eq!(
            setup[..4],
            [
                "-N TRELLIS_INBOUND",
                "-N TRELLIS_IN_REDIRECT",
                "-N TRELLIS_OUTPUT",
                "-N TRELLIS_REDIRECT"
            ]
        );
        assert_eq!(setup.len(), 4 + rules(&cfg).len());
        let cleanup: Vec<String> = cleanup_commands(&cfg)
            .iter()
            .map(|a| a[4..].join(" "))
            .collect();
        assert_eq!(
            cleanup,
            [
                "-D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-D OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "-F TRELLIS_INBOUND",
                "-F TRELLIS_IN_REDIRECT",
                "-F TRELLIS_OUTPUT",
                "-F TRELLIS_REDIRECT",
                "-X TRELLIS_INBOUND",
                "-X TRELLIS_IN_REDIRECT",
                "-X TRELLIS_OUTPUT",
                "-X TRELLIS_REDIRECT",
            ]
        );
    }
}
