//! The crate's one error type.
//!
//! Every Key Vault error names the vault, the operation and the object (secret or key), and
//! the HTTP status when there was a response. No variant ever carries a secret's value: the
//! messages come from Key Vault's or Entra ID's error bodies, or from our own checks, which
//! describe what is wrong without echoing the content.

use trellis_identity::SpiffeError;

/// Why an Azure operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's configuration is not usable (vault URL, lifetimes, names).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain {trust_domain:?}: {source}")]
    TrustDomain {
        /// The trust domain given.
        trust_domain: String,
        /// Why it is invalid.
        source: SpiffeError,
    },
    /// The HTTPS client for the Azure SDK could not be built.
    #[error("building the HTTPS client: {0}")]
    Transport(String),
    /// An Azure credential could not be built.
    #[error("building the {kind} credential: {message}")]
    Credential {
        /// Which credential (`workload-identity`, `managed-identity`, `developer`).
        kind: &'static str,
        /// What the SDK said.
        message: String,
    },
    /// A Key Vault request failed: an HTTP error, a credential failure or a connection error.
    #[error("Key Vault {vault}: {operation} {object}: {}", describe(*status, code.as_deref(), message))]
    KeyVault {
        /// The vault URL.
        vault: String,
        /// What was being done (`get`, `set`, `create`, `sign`).
        operation: &'static str,
        /// The object, e.g. `secret ca-key` or `key trellis-root`.
        object: String,
        /// The HTTP status, when Key Vault (or Entra ID, for a token) answered.
        status: Option<u16>,
        /// The service's error code, when it sent one.
        code: Option<String>,
        /// The service's message, or the SDK's error with its causes (e.g. Entra ID's AADSTS reason).
        message: String,
    },
    /// A required secret does not exist.
    #[error("Key Vault {vault}: secret {name} not found (HTTP 404)")]
    SecretNotFound {
        /// The vault URL.
        vault: String,
        /// The secret's name.
        name: String,
    },
    /// A secret exists but has no (or an empty) value.
    #[error("Key Vault {vault}: secret {name} has no value")]
    EmptySecret {
        /// The vault URL.
        vault: String,
        /// The secret's name.
        name: String,
    },
    /// `create` refused to replace a key that already exists.
    #[error("Key Vault {vault}: key {name} already exists; use force to add a new version")]
    KeyExists {
        /// The vault URL.
        vault: String,
        /// The key's name.
        name: String,
    },
    /// `create` refused to overwrite secrets that already exist.
    #[error("Key Vault {vault}: secret {name} already exists; use force to overwrite it")]
    SecretExists {
        /// The vault URL.
        vault: String,
        /// The first existing secret's name.
        name: String,
    },
    /// A secret or key holds something we cannot use (not PEM, not a CA, wrong key type).
    #[error("Key Vault {vault}: {object} is not usable: {reason}")]
    Invalid {
        /// The vault URL.
        vault: String,
        /// The object, e.g. `secret trellis-root-cert`.
        object: String,
        /// What is wrong (never the content itself).
        reason: String,
    },
    /// The root certificate secret holds no certificate for the Key Vault key's public key.
    #[error(
        "Key Vault {vault}: secret {secret} holds no root certificate for key {key} (public keys differ); recreate the root with `trellis ca create`"
    )]
    RootKeyMismatch {
        /// The vault URL.
        vault: String,
        /// The key's name.
        key: String,
        /// The root certificate secret's name.
        secret: String,
    },
    /// Building or signing a certificate failed locally.
    #[error("building a certificate: {0}")]
    Certificate(String),
    /// The blocking task that builds a Key Vault-signed certificate failed.
    #[error("certificate task failed: {0}")]
    Task(String),
}

fn describe(status: Option<u16>, code: Option<&str>, message: &str) -> String {
    match (status, code) {
        (Some(status), Some(code)) => format!("HTTP {status} ({code}): {message}"),
        (Some(status), None) => format!("HTTP {status}: {message}"),
        (None, _) => message.to_owned(),
    }
}

/// Maps an SDK error to [`Error::KeyVault`], keeping the status and the service's code.
pub(crate) fn key_vault_error(
    vault: &str,
    operation: &'static str,
    object: String,
    err: &azure_core::Error,
) -> Error {
    let (status, code) = match err.kind() {
        azure_core::error::ErrorKind::HttpResponse {
            status, error_code, ..
        } => (Some(u16::from(*status)), error_code.clone()),
        _ => (None, None),
    };
    Error::KeyVault {
        vault: vault.to_owned(),
        operation,
        object,
        status,
        code,
        message: error_chain(err),
    }
}

/// The error's message and its sources', joined with ": ". The SDK wraps causes (a
/// credential failure inside a "will not be retried" error inside ...); the useful part,
/// such as Entra ID's AADSTS reason, is often only in a source. Repeats are dropped.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_vault_error_names_vault_object_and_status() {
        let err = Error::KeyVault {
            vault: "https://kv.vault.azure.net/".into(),
            operation: "get",
            object: "secret ca-key".into(),
            status: Some(403),
            code: Some("Forbidden".into()),
            message: "denied".into(),
        };
        assert_eq!(
            err.to_string(),
            "Key Vault https://kv.vault.azure.net/: get secret ca-key: HTTP 403 (Forbidden): denied"
        );
        let err = Error::KeyVault {
            vault: "https://kv.vault.azure.net/".into(),
            operation: "sign",
            object: "key root".into(),
            status: None,
            code: None,
            message: "connection refused".into(),
        };
        assert_eq!(
            err.to_string(),
            "Key Vault https://kv.vault.azure.net/: sign key root: connection refused"
        );
    }
}
