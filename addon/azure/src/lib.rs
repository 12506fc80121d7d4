//! Azure for the Trellis control plane.
//!
//! Owns: Azure credentials ([`credential`]: workload identity, managed identity, developer
//! tools), the HTTPS transport under the Azure SDK ([`https_transport`]: reqwest + rustls
//! with ring), and the two Key Vault CA sources, which hand the CA `trellis_ca::CaPems`:
//!
//! - `keyvault-secret` ([`KeyVaultSecretsSource`]): the Istio plug-in CA layout as four
//!   secrets (`root-cert`, `ca-cert`, `ca-key`, `cert-chain`), as the AKS Istio add-on uses.
//! - `keyvault-key` ([`KeyVaultKeySource`]): a non-exportable root key in Key Vault signs a
//!   short-lived intermediate whose key exists only in memory; one Key Vault `sign` per
//!   intermediate, none per workload.
//!
//! Plus the Key Vault side of `trellis ca` ([`create_root_key`], [`create_plugin_secrets`],
//! [`show`]) and, behind the `test-util` feature, `stand_in`: HTTPS stand-ins for Entra ID
//! and Key Vault speaking their documented wire formats, for tests only.
//!
//! Must not depend on: kube crates. Nothing under proxy/ may depend on this crate: the
//! proxy never talks to Azure.

mod admin;
mod credential;
mod error;
mod keys;
mod pki;
mod secrets;
mod source;
mod transport;
mod vault;

#[cfg(feature = "test-util")]
pub mod stand_in;

pub use admin::{
    CaLayout, CertSummary, ChainReport, Expiry, ExpiryCheck, ExpiryFinding, RootKeyStatus,
    create_plugin_secrets, create_root_key, report_from_pems, show,
};
pub use credential::{
    AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE, CredentialKind, credential,
    workload_identity_credential,
};
pub use error::Error;
pub use keys::{DEFAULT_ROOT_CERT_SECRET, DEFAULT_ROOT_KEY, KeyVaultKeySource};
pub use secrets::{KeyVaultSecretsSource, SecretNames};
pub use source::{DEFAULT_INTERMEDIATE_TTL, KeyVaultKeyCa};
pub use transport::{
    EXTRA_ROOTS_ENV, RESOLVE_ENV, client_options, client_options_from_env, https_transport,
};
pub use vault::Vault;
