//! Stand-ins for Entra ID and Key Vault (feature `test-util`; never used by production
//! code): two HTTPS servers on 127.0.0.1 that speak the documented wire formats, so tests
//! run the real Azure SDK clients, credential and challenge flow included, without Azure.
//!
//! - Entra ID: `POST /{tenant}/oauth2/v2.0/token`, the client-credentials grant with a
//!   federated client assertion (what `WorkloadIdentityCredential` sends). It accepts only
//!   [`TENANT_ID`], [`CLIENT_ID`] and the stand-in's [`federated_token`]; anything else gets
//!   an AADSTS-style error.
//! - Key Vault: the data-plane REST API (`?api-version=`), answering a request without a
//!   bearer token the stand-in issued with 401 and the `WWW-Authenticate` challenge; secrets
//!   (get, get version, set), keys (create EC P-256, get, sign ES256 over a digest). Keys are
//!   generated inside the stand-in and never leave it: no endpoint returns a private key.
//!
//! The vault is served as `https://`[`VAULT_HOST`]`:<port>/`, pinned to 127.0.0.1 by the
//! transport of [`AzureStandIn::client_options`], so the SDK's check that the challenge's
//! resource (`https://vault.azure.net`) matches the vault host runs as it does in Azure.
//! Every operation is counted ([`AzureStandIn::calls`]).
//!
//! [`federated_token`]: AzureStandIn::federated_token

mod entra;
mod http;
mod vault;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::ClientOptions;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{Error, Vault, workload_identity_credential};

/// The tenant the Entra ID stand-in serves.
pub const TENANT_ID: &str = "72f988bf-0000-4000-8000-00000000cafe";
/// The only client (application) id the Entra ID stand-in knows.
pub const CLIENT_ID: &str = "5e1f0000-0000-4000-8000-0000000000c1";
/// The Key Vault stand-in's host name (pinned to 127.0.0.1 by the stand-in's transport).
pub const VAULT_HOST: &str = "trellis-stand-in.vault.azure.net";
/// The resource Key Vault's challenge names, as Azure's does.
pub const VAULT_RESOURCE: &str = "https://vault.azure.net";

/// Both stand-ins, sharing the set of issued tokens. Dropping it stops the servers.
pub struct AzureStandIn {
    state: Arc<State>,
    ca_pem: String,
    entra_addr: SocketAddr,
    vault_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl AzureStandIn {
    /// Starts both servers on 127.0.0.1 (ephemeral ports) with a fresh test CA.
    pub async fn start() -> io::Result<Self> {
        let (ca_pem, tls) = http::tls_config().map_err(io::Error::other)?;
        let entra = TcpListener::bind("127.0.0.1:0").await?;
        let vault = TcpListener::bind("127.0.0.1:0").await?;
        let entra_addr = entra.local_addr()?;
        let vault_addr = vault.local_addr()?;
        let state = Arc::new(State {
            authority: format!("https://{entra_addr}"),
            vault_base: format!("https://{VAULT_HOST}:{}", vault_addr.port()),
            federated_token: format!("stand-in-federated-token-{}", http::random_id()),
            tokens: Mutex::default(),
            secrets: Mutex::default(),
            keys: Mutex::default(),
            calls: Mutex::default(),
        });
        let tasks = vec![
            tokio::spawn(http::serve(
                entra,
                tls.clone(),
                state.clone(),
                entra::handle,
            )),
            tokio::spawn(http::serve(vault, tls, state.clone(), vault::handle)),
        ];
        Ok(Self {
            state,
            ca_pem,
            entra_addr,
            vault_addr,
            tasks,
        })
    }

    /// The Entra ID authority host, `https://127.0.0.1:<port>`.
    pub fn authority_host(&self) -> String {
        format!("https://{}", self.entra_addr)
    }

    /// The vault URL, `https://trellis-stand-in.vault.azure.net:<port>/`.
    pub fn vault_url(&self) -> String {
        format!("{}/", self.state.vault_base)
    }

    /// The test CA that issued both servers' certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The one federated (ServiceAccount) token the Entra ID stand-in accepts.
    pub fn federated_token(&self) -> &str {
        &self.state.federated_token
    }

    /// `ClientOptions` for SDK clients and credentials talking to the stand-ins: a transport
    /// trusting only the test CA with [`VAULT_HOST`] pinned to the vault's address, and a
    /// custom cloud whose authority host is the Entra ID stand-in.
    pub fn client_options(&self) -> Result<ClientOptions, Error> {
        let transport = crate::transport::build_transport(
            Some(&self.ca_pem),
            &[(VAULT_HOST, self.vault_addr)],
        )?;
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = self.authority_host();
        Ok(ClientOptions {
            transport: Some(transport),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..ClientOptions::default()
        })
    }

    /// A temporary file holding `token`, as the kubelet projects a ServiceAccount token.
    pub fn token_file(token: &str) -> io::Result<tempfile::NamedTempFile> {
        let mut file = tempfile::NamedTempFile::new()?;
        io::Write::write_all(&mut file, token.as_bytes())?;
        Ok(file)
    }

    /// A temporary file holding [`federated_token`](Self::federated_token).
    pub fn federated_token_file(&self) -> io::Result<tempfile::NamedTempFile> {
        Self::token_file(self.federated_token())
    }

    /// The real `WorkloadIdentityCredential` for [`TENANT_ID`] / [`CLIENT_ID`] with the
    /// token in `token_file`, talking to the Entra ID stand-in. No environment variables.
    pub fn credential(&self, token_file: &Path) -> Result<Arc<dyn TokenCredential>, Error> {
        workload_identity_credential(
            Some(TENANT_ID.to_owned()),
            Some(CLIENT_ID.to_owned()),
            Some(token_file.to_owned()),
            self.client_options()?,
        )
    }

    /// The stand-in vault, reached with `credential`.
    pub fn vault(&self, credential: Arc<dyn TokenCredential>) -> Result<Vault, Error> {
        Vault::new(&self.vault_url(), credential, self.client_options()?)
    }

    /// How often each operation was served: `entra.token`, `entra.rejected`,
    /// `vault.challenge` (a 401 with the challenge), `secrets.get`, `secrets.set`,
    /// `keys.create`, `keys.get`, `keys.sign`. Only authenticated requests count as
    /// operations; refused ones (404, 403, 400) count too.
    pub fn calls(&self) -> BTreeMap<String, u64> {
        lock(&self.state.calls).clone()
    }

    /// [`calls`](Self::calls) for one operation (0 when never called).
    pub fn calls_to(&self, operation: &str) -> u64 {
        lock(&self.state.calls).get(operation).copied().unwrap_or(0)
    }

    /// The latest value of secret `name`, as stored.
    pub fn secret(&self, name: &str) -> Option<String> {
        lock(&self.state.secrets)
            .get(name)
            .and_then(|versions| versions.last())
            .map(|v| v.value.clone())
    }

    /// Stores a secret directly (not counted), as an operator's `az keyvault secret set`.
    pub fn insert_secret(&self, name: &str, value: &str) {
        vault::store_secret(&self.state, name, value, None);
    }

    /// Deletes a secret and all its versions (not counted).
    pub fn remove_secret(&self, name: &str) {
        lock(&self.state.secrets).remove(name);
    }

    /// How many versions key `name` has.
    pub fn key_versions(&self, name: &str) -> usize {
        lock(&self.state.keys).get(name).map_or(0, Vec::len)
    }
}

impl Drop for AzureStandIn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for AzureStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureStandIn")
            .field("entra", &self.entra_addr)
            .field("vault", &self.vault_addr)
            .finish_non_exhaustive()
    }
}

/// What both servers share.
struct State {
    /// `https://127.0.0.1:<entra port>`, named in Key Vault's challenge.
    authority: String,
    /// `https://<VAULT_HOST>:<port>`, the prefix of object ids.
    vault_base: String,
    federated_token: String,
    /// Access tokens the Entra ID stand-in issued.
    tokens: Mutex<HashSet<String>>,
    secrets: Mutex<BTreeMap<String, Vec<vault::SecretVersion>>>,
    keys: Mutex<BTreeMap<String, Vec<vault::KeyVersion>>>,
    calls: Mutex<BTreeMap<String, u64>>,
}

impl State {
    fn count(&self, operation: &str) {
        *lock(&self.calls).entry(operation.to_owned()).or_default() += 1;
    }
}

/// A poisoned lock only means another test thread panicked; the data is still consistent
/// (every critical section is a single insert or read).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
