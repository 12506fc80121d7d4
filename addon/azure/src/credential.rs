//! Which Azure credential the control plane uses.
//!
//! azure_identity 1.0 has no `DefaultAzureCredential` chain, so the choice is explicit:
//! [`CredentialKind::from_env`] picks workload identity when the AKS webhook injected a
//! federated token file, else managed identity; `developer` (az / azd) is for a laptop.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::ClientOptions;
use azure_identity::{
    ClientAssertionCredentialOptions, DeveloperToolsCredential, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};

use crate::Error;
use crate::transport::with_transport;

/// Set by the AKS workload identity webhook: the projected ServiceAccount token's path.
pub const AZURE_FEDERATED_TOKEN_FILE: &str = "AZURE_FEDERATED_TOKEN_FILE";
/// Set by the webhook (workload identity) or by the operator (a user-assigned managed
/// identity): the identity's client id.
pub const AZURE_CLIENT_ID: &str = "AZURE_CLIENT_ID";

/// The kind of Azure credential to authenticate with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// AKS workload identity: a federated ServiceAccount token exchanged at Entra ID. Tenant,
    /// client id and token file come from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE` (injected by the webhook).
    WorkloadIdentity,
    /// A managed identity from IMDS: system-assigned, or the user-assigned identity with
    /// this client id.
    ManagedIdentity {
        /// The user-assigned identity's client id; `None` for the system-assigned one.
        client_id: Option<String>,
    },
    /// The developer's `az` (then `azd`) login. Not for clusters.
    DeveloperTools,
}

impl CredentialKind {
    /// Workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set (non-empty), else managed
    /// identity, user-assigned when `AZURE_CLIENT_ID` is set (the convention other Azure
    /// SDKs' default chains follow), system-assigned otherwise.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    fn from_lookup(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        if set(AZURE_FEDERATED_TOKEN_FILE).is_some() {
            return Self::WorkloadIdentity;
        }
        Self::ManagedIdentity {
            client_id: set(AZURE_CLIENT_ID).map(|v| v.to_string_lossy().into_owned()),
        }
    }

    /// The name used on the command line and in errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::WorkloadIdentity => "workload-identity",
            Self::ManagedIdentity { .. } => "managed-identity",
            Self::DeveloperTools => "developer",
        }
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CredentialKind {
    type Err = Error;

    /// `workload-identity`, `managed-identity` (system-assigned; use the enum directly for a
    /// user-assigned one) or `developer`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "workload-identity" => Ok(Self::WorkloadIdentity),
            "managed-identity" => Ok(Self::ManagedIdentity { client_id: None }),
            "developer" => Ok(Self::DeveloperTools),
            other => Err(Error::Config(format!(
                "unknown credential {other:?}: expected workload-identity, managed-identity or developer"
            ))),
        }
    }
}

/// Builds the credential of `kind`. `options` configures its HTTP pipeline (Entra ID or
/// IMDS); without a transport it gets [`https_transport`](crate::https_transport).
pub fn credential(
    kind: CredentialKind,
    options: ClientOptions,
) -> Result<Arc<dyn TokenCredential>, Error> {
    let name = kind.name();
    let failed = |e: azure_core::Error| Error::Credential {
        kind: name,
        message: e.to_string(),
    };
    match kind {
        CredentialKind::WorkloadIdentity => workload_identity_credential(None, None, None, options),
        CredentialKind::ManagedIdentity { client_id } => {
            let credential =
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.map(UserAssignedId::ClientId),
                    client_options: with_transport(options)?,
                }))
                .map_err(failed)?;
            Ok(credential)
        }
        // Runs `az` / `azd`; it has no HTTP pipeline, so `options` has nothing to configure.
        CredentialKind::DeveloperTools => Ok(DeveloperToolsCredential::new(None).map_err(failed)?),
    }
}

/// A workload identity credential with explicit settings; each `None` falls back to its
/// environment variable (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`).
/// The token file is read once here (it must exist) and again every 10 minutes, so the
/// kubelet's rotation of the projected token is picked up.
pub fn workload_identity_credential(
    tenant_id: Option<String>,
    client_id: Option<String>,
    token_file: Option<PathBuf>,
    options: ClientOptions,
) -> Result<Arc<dyn TokenCredential>, Error> {
    let credential = WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
        credential_options: ClientAssertionCredentialOptions {
            client_options: with_transport(options)?,
        },
        client_id,
        tenant_id,
        token_file_path: token_file,
    }))
    .map_err(|e| Error::Credential {
        kind: CredentialKind::WorkloadIdentity.name(),
        message: e.to_string(),
    })?;
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn kind_for(vars: &[(&str, &str)]) -> CredentialKind {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        CredentialKind::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn env_picks_workload_identity_then_managed_identity() {
        assert_eq!(
            kind_for(&[
                (
                    AZURE_FEDERATED_TOKEN_FILE,
                    "/var/run/secrets/azure/tokens/azure-identity-token"
                ),
                (AZURE_CLIENT_ID, "cid"),
            ]),
            CredentialKind::WorkloadIdentity
        );
        assert_eq!(
            kind_for(&[(AZURE_CLIENT_ID, "cid")]),
            CredentialKind::ManagedIdentity {
                client_id: Some("cid".into())
            }
        );
        // An empty variable counts as unset (a Helm value left blank).
        assert_eq!(
            kind_for(&[(AZURE_FEDERATED_TOKEN_FILE, ""), (AZURE_CLIENT_ID, "")]),
            CredentialKind::ManagedIdentity { client_id: None }
        );
    }

    #[test]
    fn names_parse_and_round_trip() {
        for kind in [
            CredentialKind::WorkloadIdentity,
            CredentialKind::ManagedIdentity { client_id: None },
            CredentialKind::DeveloperTools,
        ] {
            assert_eq!(kind.to_string().parse::<CredentialKind>().unwrap(), kind);
        }
        let err = "default".parse::<CredentialKind>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration: unknown credential \"default\": expected workload-identity, managed-identity or developer"
        );
    }

    #[test]
    fn workload_identity_needs_a_readable_token_file() {
        let err = workload_identity_credential(
            Some("tenant".into()),
            Some("client".into()),
            Some("/nonexistent/token".into()),
            ClientOptions::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.starts_with("building the workload-identity credential: "),
            "{err}"
        );
        assert!(err.contains("/nonexistent/token"), "{err}");
    }

    #[test]
    fn managed_identity_builds_without_network() {
        let kind = CredentialKind::ManagedIdentity {
            client_id: Some("00000000-0000-0000-0000-000000000001".into()),
        };
        credential(kind, ClientOptions::default()).unwrap();
    }
}
