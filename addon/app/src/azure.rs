//! Key Vault CA sources (`keyvault-secret`, `keyvault-key`), built from the mesh config with
//! an explicit Azure credential (workload identity on AKS unless configured otherwise).

use std::sync::Arc;
use std::time::Duration;

use trellis_azure::{
    CredentialKind, DEFAULT_ROOT_CERT_SECRET, KeyVaultKeyCa, KeyVaultKeySource,
    KeyVaultSecretsSource, SecretNames, Vault,
};
use trellis_ca::source::CaSource;

use crate::mesh_config::{CaSettings, CaSourceKind};

/// The Key Vault source `settings` name.
pub(crate) fn build_source(
    settings: &CaSettings,
    trust_domain: &str,
) -> Result<Arc<dyn CaSource>, String> {
    let kv = settings
        .keyvault
        .as_ref()
        .ok_or("ca.keyvault.url is required for a Key Vault source")?;
    let kind = match &kv.credential {
        Some(name) => name
            .parse::<CredentialKind>()
            .map_err(|e| format!("ca.keyvault.credential: {e}"))?,
        None => CredentialKind::from_env(),
    };
    let options = trellis_azure::client_options_from_env().map_err(|e| e.to_string())?;
    let credential = trellis_azure::credential(kind, options.clone()).map_err(|e| e.to_string())?;
    let vault = Vault::new(&kv.url, credential, options).map_err(|e| e.to_string())?;
    Ok(match settings.source {
        CaSourceKind::KeyvaultKey => {
            let key = kv
                .key_name
                .as_deref()
                .ok_or("ca.keyvault.keyName is required for keyvault-key")?;
            let cert = kv
                .root_cert_secret
                .as_deref()
                .unwrap_or(DEFAULT_ROOT_CERT_SECRET);
            let source =
                KeyVaultKeySource::from_vault(&vault, key, cert).map_err(|e| e.to_string())?;
            let ttl = kv
                .intermediate_ttl
                .unwrap_or(trellis_azure::DEFAULT_INTERMEDIATE_TTL)
                .max(Duration::from_secs(3600));
            Arc::new(KeyVaultKeyCa::new(source, trust_domain, ttl))
        }
        _ => {
            let mut names = SecretNames::default();
            for (key, value) in kv.secret_names.iter().flatten() {
                match key.as_str() {
                    "rootCert" => names.root_cert = value.clone(),
                    "caCert" => names.ca_cert = value.clone(),
                    "caKey" => names.ca_key = value.clone(),
                    "certChain" => names.cert_chain = value.clone(),
                    other => return Err(format!("ca.keyvault.secretNames.{other}: unknown")),
                }
            }
            Arc::new(KeyVaultSecretsSource::from_vault(&vault, names).map_err(|e| e.to_string())?)
        }
    })
}
