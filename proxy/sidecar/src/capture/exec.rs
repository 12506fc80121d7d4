//! Runs the capture plan with `iptables`/`ip6tables` in the current network namespace,
//! idempotently: a Trellis chain that exists is flushed instead of created, a jump that
//! exists is not added again, and cleanup removes only what exists.
//!
//! Not atomic: while a second `init` rebuilds the chains, connections opened in those
//! milliseconds are not captured. `init` runs before the app starts (an init container),
//! so nothing is there to open them.

use std::io::{self, Write};
use std::process::Command;

use super::config::{InitArgs, InitConfig};
use super::rules::{Cmd, Op, cleanup_commands, setup, setup_commands, teardown};

/// Jumps deleted per chain at most: duplicates left by other tools are removed too, but
/// a check that always succeeds cannot loop forever.
const MAX_DUPLICATE_JUMPS: usize = 16;

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag is wrong (exit 64).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The program could not be started (not installed?).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not be started.
        source: io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `--dry-run` could not print.
    #[error("cannot write the commands: {0}")]
    Output(#[source] io::Error),
}

/// Runs one command; `Err(Error::Failed)` when it exits non-zero.
pub(crate) trait Runner {
    fn run(&mut self, argv: &[String]) -> Result<(), Error>;
}

/// Runs the programs for real.
struct System;

/// `trellis-proxy init`: validates the flags, then prints (`--dry-run`), removes
/// (`--cleanup`) or installs the rules; one line on `out` says what was done.
pub fn run_init(args: &InitArgs, out: &mut impl Write) -> Result<(), Error> {
    let cfg = InitConfig::from_args(args, ip6tables_available())?;
    let families = if cfg.ipv6 {
        "iptables, ip6tables"
    } else {
        "iptables"
    };
    if args.dry_run {
        let cmds = if args.cleanup {
            cleanup_commands(&cfg)
        } else {
            setup_commands(&cfg)
        };
        for argv in cmds {
            writeln!(out, "{}", argv.join(" ")).map_err(Error::Output)?;
        }
        return Ok(());
    }
    let line = if args.cleanup {
        cleanup(&cfg)?;
        format!("trellis-proxy init: removed the Trellis capture rules ({families})")
    } else {
        apply(&cfg)?;
        format!(
            "trellis-proxy init: capturing TCP: outbound -> :{}, inbound -> :{}, UID {} / GID {} exempt ({families})",
            cfg.outbound_port, cfg.inbound_port, cfg.proxy_uid, cfg.proxy_gid
        )
    };
    writeln!(out, "{line}").map_err(Error::Output)
}

/// Installs the rules for `cfg` in the current network namespace (idempotent).
pub fn apply(cfg: &InitConfig) -> Result<(), Error> {
    apply_with(&mut System, cfg)
}

/// Removes every Trellis chain and jump for the families of `cfg`.
pub fn cleanup(cfg: &InitConfig) -> Result<(), Error> {
    cleanup_with(&mut System, cfg)
}

/// Whether an `ip6tables` executable is on `PATH` (the IPv6 default).
pub fn ip6tables_available() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("ip6tables").is_file()))
}

fn apply_with(runner: &mut impl Runner, cfg: &InitConfig) -> Result<(), Error> {
    for cmd in setup(cfg) {
        match cmd.op {
            Op::New if exists(runner, &cmd.with(Op::List))? => run(runner, &cmd.with(Op::Flush))?,
            Op::Append if cmd.builtin_chain() && exists(runner, &cmd.with(Op::Check))? => {}
            _ => run(runner, &cmd)?,
        }
    }
    Ok(())
}

fn cleanup_with(runner: &mut impl Runner, cfg: &InitConfig) -> Result<(), Error> {
    for cmd in teardown(cfg) {
        match cmd.op {
            Op::Delete => {
                for _ in 0..MAX_DUPLICATE_JUMPS {
                    if !exists(runner, &cmd.with(Op::Check))? {
                        break;
                    }
                    run(runner, &cmd)?;
                }
            }
            _ if exists(runner, &cmd.with(Op::List))? => run(runner, &cmd)?,
            _ => {}
        }
    }
    Ok(())
}

fn run(runner: &mut impl Runner, cmd: &Cmd) -> Result<(), Error> {
    runner.run(&cmd.argv())
}

/// A `-S` or `-C` probe: failing means "not there"; a program that cannot start is an
/// error, not an answer.
fn exists(runner: &mut impl Runner, probe: &Cmd) -> Result<bool, Error> {
    match runner.run(&probe.argv()) {
        Ok(()) => Ok(true),
        Err(Error::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

// === impl System ===

impl Runner for System {
    fn run(&mut self, argv: &[String]) -> Result<(), Error> {
        let command = argv.join(" ");
        let Some((program, args)) = argv.split_first() else {
            return Ok(());
        };
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|source| Error::Spawn {
                command: command.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(Error::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

// === impl Error ===

impl Error {
    /// The process exit code: 64 (EX_CONFIG) for bad flags, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 64,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// An in-memory nat table: enough of iptables' behaviour to check idempotency.
    #[derive(Default)]
    struct Fake {
        chains: BTreeSet<String>,
        rules: Vec<String>,
        ran: Vec<String>,
        fail_on: Option<&'static str>,
    }

    impl Fake {
        fn fail(&self, argv: &[String]) -> Error {
            Error::Failed {
                command: argv.join(" "),
                status: "exit status: 1".into(),
                stderr: "nope".into(),
            }
        }

        /// The table's state as `iptables-save` shows it: rules grouped by family and
        /// chain, in order within a chain.
        fn state(&self) -> (BTreeSet<String>, Vec<String>) {
            let mut rules = self.rules.clone();
            rules.sort_by_key(|r| r.split(' ').take(2).collect::<Vec<_>>().join(" "));
            (self.chains.clone(), rules)
        }
    }

    impl Runner for Fake {
        fn run(&mut self, argv: &[String]) -> Result<(), Error> {
            let line = argv.join(" ");
            if self.fail_on.is_some_and(|f| line.contains(f)) {
                return Err(self.fail(argv));
            }
            let (family, op, chain) = (&argv[0], argv[4].as_str(), &argv[5]);
            let key = format!("{family} {chain}");
            let rule = format!("{family} {}", argv[5..].join(" "));
            let builtin = chain == "OUTPUT" || chain == "PREROUTING";
            let ok = match op {
                "-S" => builtin || self.chains.contains(&key),
                "-N" => self.chains.insert(key),
                "-F" => {
                    let prefix = format!("{key} ");
                    self.rules.retain(|r| !r.starts_with(&prefix));
                    self.chains.contains(&key)
                }
                "-X" => self.chains.remove(&key),
                "-A" => {
                    self.rules.push(rule);
                    true
                }
                "-C" => self.rules.contains(&rule),
                "-D" => match self.rules.iter().position(|r| *r == rule) {
                    Some(i) => {
                        self.rules.remove(i);
                        true
                    }
                    None => false,
                },
                _ => false,
            };
            if !matches!(op, "-S" | "-C") {
                self.ran.push(line);
            }
            if ok { Ok(()) } else { Err(self.fail(argv)) }
        }
    }

    #[test]
    fn applying_twice_leaves_the_same_rules() {
        let cfg = InitConfig::default();
        let mut fake = Fake::default();
        apply_with(&mut fake, &cfg).unwrap();
        let once = fake.state();
        assert_eq!(once.0.len(), 8, "four chains per family");
        apply_with(&mut fake, &cfg).unwrap();
        assert_eq!(fake.state(), once);
        let jumps = once
            .1
            .iter()
            .filter(|r| r.contains("OUTPUT -p tcp -j"))
            .count();
        assert_eq!(jumps, 2, "one OUTPUT jump per family");
    }

    #[test]
    fn a_fresh_namespace_runs_exactly_the_dry_run_commands() {
        let cfg = InitConfig::default();
        let mut fake = Fake::default();
        apply_with(&mut fake, &cfg).unwrap();
        let printed: Vec<String> = setup_commands(&cfg).iter().map(|a| a.join(" ")).collect();
        assert_eq!(fake.ran, printed);
    }

    #[test]
    fn cleanup_removes_everything_and_duplicate_jumps() {
        let cfg = InitConfig::default();
        let mut fake = Fake::default();
        apply_with(&mut fake, &cfg).unwrap();
        fake.rules
            .push("iptables OUTPUT -p tcp -j TRELLIS_OUTPUT".into());
        fake.rules
            .push("iptables OUTPUT -p tcp -j SOMEONE_ELSE".into());
        cleanup_with(&mut fake, &cfg).unwrap();
        assert!(fake.chains.is_empty(), "{:?}", fake.chains);
        assert_eq!(fake.rules, ["iptables OUTPUT -p tcp -j SOMEONE_ELSE"]);
        // Nothing left to remove: cleanup is idempotent too.
        fake.ran.clear();
        cleanup_with(&mut fake, &cfg).unwrap();
        assert!(fake.ran.is_empty(), "{:?}", fake.ran);
    }

    #[test]
    fn a_failing_command_is_named_with_its_stderr() {
        let mut fake = Fake {
            fail_on: Some("--uid-owner"),
            ..Fake::default()
        };
        let e = apply_with(&mut fake, &InitConfig::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("iptables -w -t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337")
                && msg.contains("nope"),
            "{msg}"
        );
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn a_missing_program_is_an_error_not_an_absent_chain() {
        let e = System
            .run(&["trellis-no-such-program".into(), "-S".into()])
            .unwrap_err();
        assert!(matches!(e, Error::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("trellis-no-such-program"), "{e}");
    }
}
