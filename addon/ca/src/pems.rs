//! CA material as PEM text in the Istio `cacerts` layout: the one shape every CA source
//! (a mounted Kubernetes Secret, Key Vault secrets, a Key Vault-signed intermediate)
//! hands to the CA, so parsing and validation live in one place
//! (`CaMaterial::from_pems`).

use std::fmt;

/// File (and Secret key) name of the root certificate(s).
pub const ROOT_CERT_PEM: &str = "root-cert.pem";
/// File name of the issuing CA certificate.
pub const CA_CERT_PEM: &str = "ca-cert.pem";
/// File name of the issuing CA's private key.
pub const CA_KEY_PEM: &str = "ca-key.pem";
/// File name of the chain from the issuing CA up to (not including) the root.
pub const CERT_CHAIN_PEM: &str = "cert-chain.pem";

/// The Istio plug-in CA layout as PEM strings.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CaPems {
    /// One or more root certificates (several while a root rotation overlaps).
    pub root_cert: String,
    /// The issuing CA certificate: it signs workload leaves.
    pub ca_cert: String,
    /// The issuing CA's PKCS#8 private key.
    pub ca_key: String,
    /// The issuing certificate and any intermediates up to the root; may be empty.
    pub cert_chain: String,
}

impl fmt::Debug for CaPems {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaPems")
            .field("root_cert_len", &self.root_cert.len())
            .field("ca_cert_len", &self.ca_cert.len())
            .field("cert_chain_len", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}
