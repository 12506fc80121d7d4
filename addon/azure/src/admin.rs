//! The Key Vault side of `trellis ca`: create a root key, upload a plug-in CA, show what a
//! vault holds and when it expires. Library functions; the CLI wires them up.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use azure_security_keyvault_keys::models::{
    CreateKeyParameters, CurveName, KeyAttributes, KeyOperation, KeyType,
};
use azure_security_keyvault_secrets::SecretClient;
use tracing::info;
use trellis_ca::CaPems;

use crate::error::key_vault_error;
use crate::keys::{KeyVaultSigner, VaultKey, get_key, on_blocking_thread};
use crate::pki::{self, CaRole, ParsedCert};
use crate::vault::{get_secret, require_secret, set_secret};
use crate::{Error, SecretNames, Vault};

const DAY_SECS: u64 = 24 * 60 * 60;

/// Creates the `keyvault-key` root: a non-exportable EC P-256 key `key_name` (operations
/// sign and verify only) and its self-signed root certificate for `trust_domain`, valid for
/// `lifetime`, signed by Key Vault and stored as secret `root_cert_secret`. Returns the
/// root certificate PEM.
///
/// Refuses when the key exists, unless `force`: then Key Vault adds a new key version and
/// the root certificate is replaced, so every proxy must be given the new root (a root
/// rotation). If storing the certificate fails after the key was created, run again with
/// `force`.
pub async fn create_root_key(
    vault: &Vault,
    key_name: &str,
    root_cert_secret: &str,
    trust_domain: &str,
    lifetime: Duration,
    force: bool,
) -> Result<String, Error> {
    pki::check_trust_domain(trust_domain)?;
    let now = pki::now();
    let not_after = pki::expiry(now, lifetime)?;
    let url = vault.url();
    let keys = Arc::new(vault.key_client()?);
    let secrets = vault.secret_client()?;
    if !force && get_key(&keys, url, key_name).await?.is_some() {
        return Err(Error::KeyExists {
            vault: url.to_owned(),
            name: key_name.to_owned(),
        });
    }
    let parameters = CreateKeyParameters {
        kty: Some(KeyType::Ec),
        curve: Some(CurveName::P256),
        key_ops: Some(vec![KeyOperation::Sign, KeyOperation::Verify]),
        key_attributes: Some(KeyAttributes {
            enabled: Some(true),
            exportable: Some(false),
            ..KeyAttributes::default()
        }),
        ..CreateKeyParameters::default()
    };
    let object = || format!("key {key_name}");
    let body = parameters
        .try_into()
        .map_err(|e| key_vault_error(url, "create", object(), &e))?;
    let created = keys
        .create_key(key_name, body, None)
        .await
        .and_then(|response| response.into_model())
        .map_err(|e| key_vault_error(url, "create", object(), &e))?;
    let key = VaultKey::from_model(url, key_name, &created)?;
    let kid = key.kid.clone();
    let params = pki::ca_params(CaRole::Root, trust_domain, now, not_after)?;
    let signer = KeyVaultSigner::new(keys, url, key_name, key)?;
    let (pem, der) = on_blocking_thread(move || {
        let cert = params
            .self_signed(&signer)
            .map_err(|e| signer.failure_or(e))?;
        Ok((cert.pem(), cert.der().to_vec()))
    })
    .await?;
    pki::verify_signed_by(&der, None).map_err(|reason| Error::Invalid {
        vault: url.to_owned(),
        object: object(),
        reason: format!("its signature does not verify: {reason}"),
    })?;
    set_secret(&secrets, url, root_cert_secret, &pem).await?;
    info!(vault = url, key = %kid, secret = root_cert_secret, trust_domain, "created the Key Vault root");
    Ok(pem)
}

/// Generates a root and an intermediate locally and uploads the plug-in CA layout (four
/// secrets named by `names`) for the `keyvault-secret` source. The intermediate is valid for
/// `ca_lifetime`, capped at the root's `root_lifetime`. Returns what was uploaded.
///
/// The root's private key is discarded: this layout never needs it, and a key that is never
/// stored cannot leak. Issuing another intermediate under the same root therefore needs the
/// `keyvault-key` layout instead. Refuses when any of the four secrets exists, unless
/// `force`.
pub async fn create_plugin_secrets(
    vault: &Vault,
    names: &SecretNames,
    trust_domain: &str,
    root_lifetime: Duration,
    ca_lifetime: Duration,
    force: bool,
) -> Result<CaPems, Error> {
    pki::check_trust_domain(trust_domain)?;
    // Refuses lifetimes that overflow before anything is uploaded.
    let now = pki::now();
    pki::expiry(now, root_lifetime)?;
    pki::expiry(now, ca_lifetime)?;
    let url = vault.url();
    let secrets = vault.secret_client()?;
    if !force {
        for name in names.all() {
            if secret_exists(&secrets, url, name).await? {
                return Err(Error::SecretExists {
                    vault: url.to_owned(),
                    name: name.to_owned(),
                });
            }
        }
    }
    // Made by the CA crate, so the layout is the one its sources validate.
    let pems = trellis_ca::generate_pems(trust_domain, "Trellis", root_lifetime, ca_lifetime)
        .map_err(|e| Error::Certificate(e.to_string()))?;
    // Root first: a reader that catches the upload halfway trusts the new root before it
    // sees anything signed under it.
    for (name, value) in [
        (&names.root_cert, &pems.root_cert),
        (&names.cert_chain, &pems.cert_chain),
        (&names.ca_cert, &pems.ca_cert),
        (&names.ca_key, &pems.ca_key),
    ] {
        set_secret(&secrets, url, name, value).await?;
    }
    info!(vault = url, trust_domain, "uploaded the plug-in CA secrets");
    Ok(pems)
}

async fn secret_exists(client: &SecretClient, vault: &str, name: &str) -> Result<bool, Error> {
    match get_secret(client, vault, name).await {
        Ok(value) => Ok(value.is_some()),
        Err(Error::EmptySecret { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Which CA layout a vault holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaLayout {
    /// The plug-in CA secrets (`keyvault-secret` source).
    PluginSecrets(SecretNames),
    /// A Key Vault root key and its certificate secret (`keyvault-key` source).
    RootKey {
        /// The root key's name.
        key_name: String,
        /// The root certificate secret's name.
        root_cert_secret: String,
    },
}

/// One certificate found in a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The secret it was read from.
    pub secret: String,
    /// Subject DN, e.g. `O=Trellis, CN=Trellis root cluster.local`.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, colon-separated hex.
    pub serial: String,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// The trust domain of its `spiffe://` URI SAN, if any.
    pub trust_domain: Option<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl CertSummary {
    /// Whole days from `now` until `not_after`, rounded down; negative once expired.
    pub fn days_left(&self, now: SystemTime) -> i64 {
        let secs = match self.not_after.duration_since(now) {
            Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
            Err(behind) => -i64::try_from(behind.duration().as_secs()).unwrap_or(i64::MAX),
        };
        secs.div_euclid(DAY_SECS.cast_signed())
    }

    fn from_parsed(secret: &str, cert: ParsedCert) -> Self {
        Self {
            secret: secret.to_owned(),
            subject: cert.subject,
            issuer: cert.issuer,
            serial: cert.serial,
            is_ca: cert.is_ca,
            trust_domain: cert.trust_domain,
            not_before: cert.not_before,
            not_after: cert.not_after.into(),
        }
    }
}

/// The Key Vault root key of a `keyvault-key` layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootKeyStatus {
    /// The key's name.
    pub name: String,
    /// The latest version's id; `None` when the key does not exist.
    pub kid: Option<String>,
    /// Whether a certificate in the root secret has this key's public key.
    pub matches_root: bool,
}

/// What a vault's CA layout holds: every certificate, and for `keyvault-key` the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// The vault URL; for [`report_from_pems`], the label it was given.
    pub vault: String,
    /// Certificates in secret order (root first), several per secret if it holds several.
    pub certs: Vec<CertSummary>,
    /// The root key, for the `keyvault-key` layout.
    pub root_key: Option<RootKeyStatus>,
}

/// How close to expiry a certificate is; ordered from fine to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Expiry {
    /// Valid for longer than the warning threshold.
    Ok,
    /// Valid, but expires within the warning threshold.
    ExpiresSoon,
    /// Already expired.
    Expired,
}

/// A certificate that expires soon or has expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryFinding {
    /// The secret holding it.
    pub secret: String,
    /// Its subject DN.
    pub subject: String,
    /// Its `notAfter`.
    pub not_after: SystemTime,
    /// Whole days left (negative once expired).
    pub days_left: i64,
    /// [`Expiry::ExpiresSoon`] or [`Expiry::Expired`].
    pub expiry: Expiry,
}

/// The result of [`ChainReport::check_expiry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryCheck {
    /// The worst of all certificates ([`Expiry::Ok`] when there are none).
    pub status: Expiry,
    /// The certificates that are not [`Expiry::Ok`].
    pub findings: Vec<ExpiryFinding>,
}

impl ChainReport {
    /// Which certificates have expired at `now` or expire within `warn_within` of it.
    pub fn check_expiry(&self, now: SystemTime, warn_within: Duration) -> ExpiryCheck {
        let findings: Vec<ExpiryFinding> = self
            .certs
            .iter()
            .filter_map(|cert| {
                let expiry = if cert.not_after <= now {
                    Expiry::Expired
                } else if cert.not_after.duration_since(now).unwrap_or_default() < warn_within {
                    Expiry::ExpiresSoon
                } else {
                    return None;
                };
                Some(ExpiryFinding {
                    secret: cert.secret.clone(),
                    subject: cert.subject.clone(),
                    not_after: cert.not_after,
                    days_left: cert.days_left(now),
                    expiry,
                })
            })
            .collect();
        let status = findings
            .iter()
            .map(|f| f.expiry)
            .max()
            .unwrap_or(Expiry::Ok);
        ExpiryCheck { status, findings }
    }

    /// A human-readable listing as of `now`, one certificate per line.
    pub fn render(&self, now: SystemTime) -> String {
        let mut out = if self.vault.starts_with("https://") {
            format!("vault {}\n", self.vault)
        } else {
            format!("{}\n", self.vault)
        };
        for cert in &self.certs {
            let _ = writeln!(
                out,
                "  {:<20} {:<50} not after {} ({} days left)",
                cert.secret,
                cert.subject,
                humantime::format_rfc3339_seconds(cert.not_after),
                cert.days_left(now)
            );
        }
        if let Some(key) = &self.root_key {
            let state = match (&key.kid, key.matches_root) {
                (None, _) => "missing".to_owned(),
                (Some(kid), true) => format!("{kid} (matches the root certificate)"),
                (Some(kid), false) => format!("{kid} (DOES NOT match the root certificate)"),
            };
            let _ = writeln!(out, "  key {:<16} {state}", key.name);
        }
        out
    }
}

/// Reads the certificates of `layout` from `vault` (never the private key) and reports
/// them; for [`CaLayout::RootKey`] also whether the key matches the root certificate.
pub async fn show(vault: &Vault, layout: &CaLayout) -> Result<ChainReport, Error> {
    let url = vault.url();
    let secrets = vault.secret_client()?;
    let mut report = ChainReport {
        vault: url.to_owned(),
        certs: Vec::new(),
        root_key: None,
    };
    let (required, optional): (Vec<&str>, Vec<&str>) = match layout {
        CaLayout::PluginSecrets(names) => (
            vec![names.root_cert.as_str(), names.ca_cert.as_str()],
            vec![names.cert_chain.as_str()],
        ),
        CaLayout::RootKey {
            root_cert_secret, ..
        } => (vec![root_cert_secret.as_str()], Vec::new()),
    };
    for name in required {
        let pem = require_secret(&secrets, url, name).await?;
        report.certs.extend(summaries(url, name, &pem)?);
    }
    for name in optional {
        if let Some(pem) = get_secret(&secrets, url, name).await? {
            report.certs.extend(summaries(url, name, &pem)?);
        }
    }
    if let CaLayout::RootKey {
        key_name,
        root_cert_secret,
    } = layout
    {
        let keys = vault.key_client()?;
        let key = get_key(&keys, url, key_name).await?;
        let root_pem = require_secret(&secrets, url, root_cert_secret).await?;
        let matches_root = key.as_ref().is_some_and(|key| {
            let spki = key.spki();
            pki::parse_pem_certs(&root_pem)
                .map(|certs| certs.iter().any(|c| c.spki == spki))
                .unwrap_or(false)
        });
        report.root_key = Some(RootKeyStatus {
            name: key_name.clone(),
            kid: key.map(|k| k.kid),
            matches_root,
        });
    }
    Ok(report)
}

/// A report over PEM text that is not in a vault (a `cacerts` directory, a bundle
/// file): `label` names where it came from, each `(name, pem)` one file.
pub fn report_from_pems(label: &str, files: &[(&str, &str)]) -> Result<ChainReport, Error> {
    let mut certs = Vec::new();
    for (name, pem) in files {
        certs.extend(summaries(label, name, pem)?);
    }
    Ok(ChainReport {
        vault: label.to_owned(),
        certs,
        root_key: None,
    })
}

fn summaries(vault: &str, secret: &str, pem: &str) -> Result<Vec<CertSummary>, Error> {
    let certs = pki::parse_pem_certs(pem).map_err(|reason| Error::Invalid {
        vault: vault.to_owned(),
        object: format!("secret {secret}"),
        reason,
    })?;
    Ok(certs
        .into_iter()
        .map(|cert| CertSummary::from_parsed(secret, cert))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(secret: &str, not_after: SystemTime) -> CertSummary {
        CertSummary {
            secret: secret.into(),
            subject: format!("CN={secret}"),
            issuer: "CN=root".into(),
            serial: "01".into(),
            is_ca: true,
            trust_domain: None,
            not_before: SystemTime::UNIX_EPOCH,
            not_after,
        }
    }

    #[test]
    fn days_left_rounds_down_and_goes_negative() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * DAY_SECS);
        let day = Duration::from_secs(DAY_SECS);
        assert_eq!(summary("a", now + day * 3).days_left(now), 3);
        assert_eq!(
            summary("a", now + day * 3 - Duration::from_secs(1)).days_left(now),
            2
        );
        assert_eq!(summary("a", now).days_left(now), 0);
        assert_eq!(
            summary("a", now - Duration::from_secs(1)).days_left(now),
            -1
        );
        assert_eq!(summary("a", now - day * 2).days_left(now), -2);
    }

    #[test]
    fn expiry_check_reports_the_worst() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 * DAY_SECS);
        let day = Duration::from_secs(DAY_SECS);
        let report = ChainReport {
            vault: "https://kv.vault.azure.net/".into(),
            certs: vec![
                summary("root-cert", now + day * 3650),
                summary("ca-cert", now + day * 10),
                summary("cert-chain", now - day),
            ],
            root_key: None,
        };
        let check = report.check_expiry(now, day * 30);
        assert_eq!(check.status, Expiry::Expired);
        assert_eq!(
            check
                .findings
                .iter()
                .map(|f| (f.secret.as_str(), f.expiry, f.days_left))
                .collect::<Vec<_>>(),
            [
                ("ca-cert", Expiry::ExpiresSoon, 10),
                ("cert-chain", Expiry::Expired, -1)
            ]
        );
        assert_eq!(report.check_expiry(now - day * 2, day).status, Expiry::Ok);
        assert_eq!(
            report.check_expiry(now - day * 2, day * 2).status,
            Expiry::ExpiresSoon
        );
        let rendered = report.render(now);
        assert!(
            rendered.starts_with("vault https://kv.vault.azure.net/\n"),
            "{rendered}"
        );
        assert!(rendered.contains("(10 days left)"), "{rendered}");
    }
}
