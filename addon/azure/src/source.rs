//! The two Key Vault sources as `trellis_ca::source::CaSource`s, so the CA's source loop
//! (re-read, stage, activate, retire) drives them like any other source.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use trellis_ca::CaPems;
use trellis_ca::source::{CaSource, SourceError};

use crate::{KeyVaultKeySource, KeyVaultSecretsSource};

/// Default lifetime of a Key Vault-signed intermediate.
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl CaSource for KeyVaultSecretsSource {
    fn label(&self) -> String {
        format!("keyvault-secret {}", self.vault_url())
    }

    fn load(&self) -> BoxFuture<'_, Result<CaPems, SourceError>> {
        Box::pin(async move {
            KeyVaultSecretsSource::load(self)
                .await
                .map_err(|e| SourceError(e.to_string()))
        })
    }
}

/// `keyvault-key` as a source: the intermediate is issued on the first read and again
/// once half its lifetime has passed; every read in between returns the same material, so
/// Key Vault sees one `sign` per intermediate whatever the reload interval or the number
/// of workloads.
pub struct KeyVaultKeyCa {
    source: KeyVaultKeySource,
    trust_domain: String,
    lifetime: Duration,
    current: Mutex<Option<(CaPems, SystemTime, SystemTime)>>,
}

impl KeyVaultKeyCa {
    /// Issues intermediates for `trust_domain` valid for `lifetime` from `source`.
    pub fn new(source: KeyVaultKeySource, trust_domain: &str, lifetime: Duration) -> Self {
        Self {
            source,
            trust_domain: trust_domain.to_owned(),
            lifetime,
            current: Mutex::new(None),
        }
    }

    fn cached(&self, now: SystemTime) -> Option<CaPems> {
        let guard = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (pems, issued, not_after) = guard.as_ref()?;
        let half = not_after.duration_since(*issued).unwrap_or_default() / 2;
        (now < *issued + half).then(|| pems.clone())
    }
}

impl std::fmt::Debug for KeyVaultKeyCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultKeyCa")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl CaSource for KeyVaultKeyCa {
    fn label(&self) -> String {
        format!("keyvault-key {}", self.source.label())
    }

    fn load(&self) -> BoxFuture<'_, Result<CaPems, SourceError>> {
        Box::pin(async move {
            let now = SystemTime::now();
            if let Some(pems) = self.cached(now) {
                return Ok(pems);
            }
            let (pems, not_after) = self
                .source
                .issue_intermediate(&self.trust_domain, self.lifetime)
                .await
                .map_err(|e| SourceError(e.to_string()))?;
            *self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((pems.clone(), now, not_after));
            Ok(pems)
        })
    }
}
