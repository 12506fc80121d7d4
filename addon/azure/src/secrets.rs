//! The `keyvault-secret` CA source: the Istio plug-in CA layout as four Key Vault secrets.
//!
//! This is the AKS Istio add-on's convention (`root-cert`, `ca-cert`, `ca-key`,
//! `cert-chain`, PEM values), so a vault prepared for it works unchanged. The issuing key
//! lives in Key Vault as a secret and is loaded into the control plane's memory.

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::ClientOptions;
use azure_security_keyvault_secrets::SecretClient;
use tracing::info;
use trellis_ca::CaPems;

use crate::Error;
use crate::vault::{Vault, get_secret, require_secret};

/// Names of the four secrets of the plug-in CA layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretNames {
    /// The root certificate(s). Required.
    pub root_cert: String,
    /// The issuing CA certificate. Required.
    pub ca_cert: String,
    /// The issuing CA's PKCS#8 private key. Required.
    pub ca_key: String,
    /// The chain from the issuing certificate up to the root. Optional: missing means empty.
    pub cert_chain: String,
}

impl Default for SecretNames {
    /// The AKS Istio add-on's names: `root-cert`, `ca-cert`, `ca-key`, `cert-chain`.
    fn default() -> Self {
        Self {
            root_cert: "root-cert".to_owned(),
            ca_cert: "ca-cert".to_owned(),
            ca_key: "ca-key".to_owned(),
            cert_chain: "cert-chain".to_owned(),
        }
    }
}

impl SecretNames {
    /// All four names, in the order `load` reads them.
    pub fn all(&self) -> [&str; 4] {
        [
            &self.root_cert,
            &self.ca_cert,
            &self.ca_key,
            &self.cert_chain,
        ]
    }
}

/// Reads the plug-in CA layout from Key Vault secrets.
pub struct KeyVaultSecretsSource {
    vault: String,
    client: SecretClient,
    names: SecretNames,
}

impl KeyVaultSecretsSource {
    /// A source reading `names` from the vault at `vault_url` (see [`Vault::new`] for what
    /// the URL and options must be).
    pub fn new(
        vault_url: &str,
        credential: Arc<dyn TokenCredential>,
        names: SecretNames,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        Self::from_vault(&Vault::new(vault_url, credential, options)?, names)
    }

    /// A source reading `names` from `vault`.
    pub fn from_vault(vault: &Vault, names: SecretNames) -> Result<Self, Error> {
        Ok(Self {
            vault: vault.url().to_owned(),
            client: vault.secret_client()?,
            names,
        })
    }

    /// The vault URL.
    pub fn vault_url(&self) -> &str {
        &self.vault
    }

    /// The secret names read.
    pub fn names(&self) -> &SecretNames {
        &self.names
    }

    /// Reads the four secrets (latest versions), values byte for byte. A missing
    /// `cert-chain` gives an empty chain; a missing root, CA certificate or key is an error
    /// naming the secret. Contents are not validated here: the CA parses them
    /// (`trellis_ca::CaPems` is the one shape every source hands over).
    pub async fn load(&self) -> Result<CaPems, Error> {
        let vault = &self.vault;
        let names = &self.names;
        let root_cert = require_secret(&self.client, vault, &names.root_cert).await?;
        let ca_cert = require_secret(&self.client, vault, &names.ca_cert).await?;
        let ca_key = require_secret(&self.client, vault, &names.ca_key).await?;
        let cert_chain = get_secret(&self.client, vault, &names.cert_chain)
            .await?
            .unwrap_or_default();
        info!(
            vault,
            root_cert = %names.root_cert,
            ca_cert = %names.ca_cert,
            ca_key = %names.ca_key,
            cert_chain = %names.cert_chain,
            chain_present = !cert_chain.is_empty(),
            "loaded CA material from Key Vault secrets"
        );
        Ok(CaPems {
            root_cert,
            ca_cert,
            ca_key,
            cert_chain,
        })
    }
}

impl std::fmt::Debug for KeyVaultSecretsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultSecretsSource")
            .field("vault", &self.vault)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_aks_istio_addon_names() {
        assert_eq!(
            SecretNames::default().all(),
            ["root-cert", "ca-cert", "ca-key", "cert-chain"]
        );
    }
}
