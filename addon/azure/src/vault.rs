//! A Key Vault to talk to: its URL, the credential and the HTTP options, plus the few
//! secret operations every module shares.

use std::fmt;
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, StatusCode, Url};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use azure_security_keyvault_secrets::models::SetSecretParameters;
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use tracing::debug;

use crate::Error;
use crate::error::key_vault_error;
use crate::transport::with_transport;

/// Content type stored with the PEM secrets we write, as `az keyvault secret set
/// --encoding`-less uploads of PEM files commonly use.
pub(crate) const PEM_CONTENT_TYPE: &str = "application/x-pem-file";

/// A Key Vault: URL, credential and HTTP options. Cheap to clone.
#[derive(Clone)]
pub struct Vault {
    url: String,
    credential: Arc<dyn TokenCredential>,
    options: ClientOptions,
}

impl Vault {
    /// `url` must be `https://<name>.vault.azure.net/` (or another cloud's vault host): the
    /// SDK sends bearer tokens over https only, and checks that Key Vault's authentication
    /// challenge names a resource whose host is a suffix of the vault's host. `options`
    /// without a transport gets [`https_transport`](crate::https_transport).
    pub fn new(
        url: &str,
        credential: Arc<dyn TokenCredential>,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        let parsed =
            Url::parse(url).map_err(|e| Error::Config(format!("vault URL {url:?}: {e}")))?;
        if parsed.scheme() != "https" {
            return Err(Error::Config(format!("vault URL {url:?} must use https")));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(Error::Config(format!("vault URL {url:?} has no host")));
        }
        Ok(Self {
            url: url.to_owned(),
            credential,
            options: with_transport(options)?,
        })
    }

    /// The vault URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn secret_client(&self) -> Result<SecretClient, Error> {
        SecretClient::new(
            &self.url,
            self.credential.clone(),
            Some(SecretClientOptions {
                client_options: self.options.clone(),
                ..SecretClientOptions::default()
            }),
        )
        .map_err(|e| Error::Config(format!("secret client for {}: {e}", self.url)))
    }

    pub(crate) fn key_client(&self) -> Result<KeyClient, Error> {
        KeyClient::new(
            &self.url,
            self.credential.clone(),
            Some(KeyClientOptions {
                client_options: self.options.clone(),
                ..KeyClientOptions::default()
            }),
        )
        .map_err(|e| Error::Config(format!("key client for {}: {e}", self.url)))
    }
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The latest value of secret `name`; `None` when it does not exist (404).
pub(crate) async fn get_secret(
    client: &SecretClient,
    vault: &str,
    name: &str,
) -> Result<Option<String>, Error> {
    let response = match client.get_secret(name, None).await {
        Ok(response) => response,
        Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
            debug!(vault, secret = name, "secret not found");
            return Ok(None);
        }
        Err(e) => return Err(key_vault_error(vault, "get", format!("secret {name}"), &e)),
    };
    let secret = response
        .into_model()
        .map_err(|e| key_vault_error(vault, "get", format!("secret {name}"), &e))?;
    match secret.value {
        Some(value) if !value.is_empty() => {
            // Never the value: only that it was read and how long it is.
            debug!(vault, secret = name, len = value.len(), "read secret");
            Ok(Some(value))
        }
        _ => Err(Error::EmptySecret {
            vault: vault.to_owned(),
            name: name.to_owned(),
        }),
    }
}

/// Like [`get_secret`], but a missing secret is an error naming it.
pub(crate) async fn require_secret(
    client: &SecretClient,
    vault: &str,
    name: &str,
) -> Result<String, Error> {
    get_secret(client, vault, name)
        .await?
        .ok_or_else(|| Error::SecretNotFound {
            vault: vault.to_owned(),
            name: name.to_owned(),
        })
}

/// Stores `value` as a new version of secret `name`.
pub(crate) async fn set_secret(
    client: &SecretClient,
    vault: &str,
    name: &str,
    value: &str,
) -> Result<(), Error> {
    let parameters = SetSecretParameters {
        value: Some(value.to_owned()),
        content_type: Some(PEM_CONTENT_TYPE.to_owned()),
        ..SetSecretParameters::default()
    };
    let body = parameters
        .try_into()
        .map_err(|e| key_vault_error(vault, "set", format!("secret {name}"), &e))?;
    client
        .set_secret(name, body, None)
        .await
        .map_err(|e| key_vault_error(vault, "set", format!("secret {name}"), &e))?;
    debug!(vault, secret = name, len = value.len(), "stored secret");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CredentialKind, credential};

    #[test]
    fn vault_url_must_be_https_with_a_host() {
        // Building a managed identity credential needs no network.
        let kind = CredentialKind::ManagedIdentity { client_id: None };
        let cred = credential(kind, ClientOptions::default()).unwrap();
        for (url, want) in [
            ("http://kv.vault.azure.net/", "must use https"),
            ("kv.vault.azure.net", "vault URL"),
            ("https:///", "vault URL"),
        ] {
            let err = Vault::new(url, cred.clone(), ClientOptions::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
        let vault = Vault::new(
            "https://kv.vault.azure.net/",
            cred,
            ClientOptions::default(),
        )
        .unwrap();
        assert_eq!(vault.url(), "https://kv.vault.azure.net/");
        assert_eq!(
            format!("{vault:?}"),
            "Vault { url: \"https://kv.vault.azure.net/\", .. }"
        );
    }
}
