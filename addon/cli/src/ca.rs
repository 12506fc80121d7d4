//! `trellis ca`: create CA material (in Key Vault, or as a `cacerts` directory for the
//! kind profile's Secret), show the chain a mesh uses, and check expiry.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use trellis_azure::{
    CaLayout, ChainReport, CredentialKind, DEFAULT_ROOT_CERT_SECRET, DEFAULT_ROOT_KEY, Expiry,
    SecretNames, Vault,
};

/// `trellis ca` subcommands.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Creates a non-exportable EC P-256 root key in Key Vault and its self-signed root
    /// certificate (stored as a secret): the material of the `keyvault-key` CA source.
    CreateRoot {
        #[command(flatten)]
        vault: VaultArgs,
        /// Name of the Key Vault key.
        #[arg(long, default_value = DEFAULT_ROOT_KEY)]
        key_name: String,
        /// Secret that receives the root certificate (PEM).
        #[arg(long, default_value = DEFAULT_ROOT_CERT_SECRET)]
        root_cert_secret: String,
        /// Trust domain of the mesh.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Root lifetime.
        #[arg(long, default_value = "10y", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Creates the Istio plug-in CA layout (a root and an intermediate): as the four Key
    /// Vault secrets of the `keyvault-secret` source (`--vault`), or as files for the
    /// `secret` source (`--dir`, then `kubectl create secret generic cacerts --from-file=DIR`).
    CreatePlugin {
        #[command(flatten)]
        target: Target,
        /// Trust domain of the mesh.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Root lifetime.
        #[arg(long, default_value = "10y", value_parser = humantime::parse_duration)]
        root_lifetime: Duration,
        /// Intermediate lifetime.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ca_lifetime: Duration,
        /// Overwrite existing secrets.
        #[arg(long)]
        force: bool,
    },
    /// Shows the certificates of a CA (subject, expiry) and exits 1 if any has expired or
    /// expires within --warn-within.
    Show {
        #[command(flatten)]
        target: Target,
        /// A trust bundle file instead (e.g. `<state>/trust-bundle.pem`).
        #[arg(long, conflicts_with_all = ["vault", "dir"])]
        bundle: Option<PathBuf>,
        /// With --vault: the `keyvault-key` layout (root key + certificate secret) instead
        /// of the plug-in secrets.
        #[arg(long)]
        root_key: Option<String>,
        /// Warn (and exit 1) when a certificate expires within this.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        warn_within: Duration,
    },
}

#[derive(Debug, clap::Args)]
struct VaultArgs {
    /// Key Vault URL, `https://<name>.vault.azure.net/`.
    #[arg(long)]
    vault: String,
    /// Azure credential: `developer` (az / azd login), `workload-identity`,
    /// `managed-identity`.
    #[arg(long, default_value = "developer")]
    credential: CredentialKind,
}

#[derive(Debug, clap::Args)]
#[group(skip)]
struct Target {
    /// Key Vault URL, `https://<name>.vault.azure.net/`.
    #[arg(long, conflicts_with = "dir")]
    vault: Option<String>,
    /// A directory in the `cacerts` layout.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Azure credential (with --vault).
    #[arg(long, default_value = "developer")]
    credential: CredentialKind,
}

/// Runs a `trellis ca` subcommand.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::CreateRoot {
            vault,
            key_name,
            root_cert_secret,
            trust_domain,
            lifetime,
            force,
        } => {
            let vault = open_vault(&vault.vault, vault.credential)?;
            let pem = trellis_azure::create_root_key(
                &vault,
                &key_name,
                &root_cert_secret,
                &trust_domain,
                lifetime,
                force,
            )
            .await?;
            print!("{pem}");
            eprintln!(
                "created key {key_name} (non-exportable) and secret {root_cert_secret} in {}; \
                 set ca.source: keyvault-key with keyvault.keyName: {key_name} in trellis-config",
                vault.url()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CreatePlugin {
            target,
            trust_domain,
            root_lifetime,
            ca_lifetime,
            force,
        } => match (target.vault, target.dir) {
            (Some(url), None) => {
                let vault = open_vault(&url, target.credential)?;
                trellis_azure::create_plugin_secrets(
                    &vault,
                    &SecretNames::default(),
                    &trust_domain,
                    root_lifetime,
                    ca_lifetime,
                    force,
                )
                .await?;
                println!(
                    "uploaded root-cert, ca-cert, ca-key, cert-chain to {}",
                    vault.url()
                );
                Ok(ExitCode::SUCCESS)
            }
            (None, Some(dir)) => {
                if !force && dir.join(trellis_ca::CA_KEY_PEM).exists() {
                    anyhow::bail!(
                        "{} already holds a CA key; pass --force to replace it",
                        dir.display()
                    );
                }
                let pems = trellis_ca::generate_pems(
                    &trust_domain,
                    "Trellis",
                    root_lifetime,
                    ca_lifetime,
                )?;
                trellis_ca::source::write_dir(&dir, &pems)
                    .with_context(|| format!("writing {}", dir.display()))?;
                println!(
                    "wrote {} ({}, {}, {}, {}); key mode 0600",
                    dir.display(),
                    trellis_ca::ROOT_CERT_PEM,
                    trellis_ca::CA_CERT_PEM,
                    trellis_ca::CA_KEY_PEM,
                    trellis_ca::CERT_CHAIN_PEM
                );
                Ok(ExitCode::SUCCESS)
            }
            _ => anyhow::bail!("give exactly one of --vault or --dir"),
        },
        Command::Show {
            target,
            bundle,
            root_key,
            warn_within,
        } => {
            let report = match (target.vault, target.dir, bundle) {
                (Some(url), None, None) => {
                    let vault = open_vault(&url, target.credential)?;
                    let layout = match root_key {
                        Some(key_name) => CaLayout::RootKey {
                            key_name,
                            root_cert_secret: DEFAULT_ROOT_CERT_SECRET.to_owned(),
                        },
                        None => CaLayout::PluginSecrets(SecretNames::default()),
                    };
                    trellis_azure::show(&vault, &layout).await?
                }
                (None, Some(dir), None) => {
                    let mut files = Vec::new();
                    for name in [
                        trellis_ca::ROOT_CERT_PEM,
                        trellis_ca::CA_CERT_PEM,
                        trellis_ca::CERT_CHAIN_PEM,
                    ] {
                        let path = dir.join(name);
                        match std::fs::read_to_string(&path) {
                            Ok(text) => files.push((name, text)),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(e)
                                    .with_context(|| format!("reading {}", path.display()));
                            }
                        }
                    }
                    let files: Vec<(&str, &str)> =
                        files.iter().map(|(n, t)| (*n, t.as_str())).collect();
                    trellis_azure::report_from_pems(
                        &format!("cacerts directory {}", dir.display()),
                        &files,
                    )?
                }
                (None, None, Some(file)) => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let name = format!("trust bundle {}", file.display());
                    trellis_azure::report_from_pems(&name, &[("bundle", &text)])?
                }
                _ => anyhow::bail!("give exactly one of --vault, --dir or --bundle"),
            };
            Ok(print_report(&report, warn_within))
        }
    }
}

fn print_report(report: &ChainReport, warn_within: Duration) -> ExitCode {
    let now = SystemTime::now();
    print!("{}", report.render(now));
    let check = report.check_expiry(now, warn_within);
    for f in &check.findings {
        let what = match f.expiry {
            Expiry::Expired => "EXPIRED",
            _ => "expires soon",
        };
        println!(
            "{what}: {} {} ({} days left)",
            f.secret, f.subject, f.days_left
        );
    }
    if check.status == Expiry::Ok {
        println!(
            "ok: nothing expires within {}",
            humantime::format_duration(warn_within)
        );
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn open_vault(url: &str, kind: CredentialKind) -> anyhow::Result<Vault> {
    let options = trellis_azure::client_options_from_env()?;
    let credential = trellis_azure::credential(kind, options.clone())?;
    Ok(Vault::new(url, credential, options)?)
}
