//! The HTTPS client under every Azure SDK client this crate builds.
//!
//! azure_core's default client is reqwest with its `rustls` feature, which means aws-lc-rs
//! (cmake and a C build). We build reqwest with `rustls-no-provider` instead and hand it a
//! rustls config using ring, like the rest of Trellis. Without a provider reqwest's own
//! default client panics when built, so every constructor here fills in this transport when
//! the caller's `ClientOptions` has none ([`with_transport`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use azure_core::http::{ClientOptions, Transport};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_platform_verifier::BuilderVerifierExt;

use crate::Error;

/// Same limits as azure_core's own default client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the HTTPS transport for Azure SDK clients: reqwest over rustls with ring.
///
/// With `trusted_roots_pem = None` servers are verified with the platform verifier (the
/// system's roots, as azure_core's default client does). With `Some(pem)` ONLY the
/// certificates in `pem` are trusted, for endpoints behind a private CA.
pub fn https_transport(trusted_roots_pem: Option<&str>) -> Result<Transport, Error> {
    build_transport(trusted_roots_pem, &[])
}

/// `ClientOptions` with [`https_transport`] over the system's roots and everything else at
/// the SDK's defaults.
pub fn client_options() -> Result<ClientOptions, Error> {
    Ok(ClientOptions {
        transport: Some(https_transport(None)?),
        ..ClientOptions::default()
    })
}

/// Environment variable naming a PEM file of extra roots for the Entra ID and Key Vault
/// endpoints (a private endpoint behind a corporate CA; the stand-ins in tests). When set,
/// ONLY these roots are trusted.
pub const EXTRA_ROOTS_ENV: &str = "TRELLIS_AZURE_EXTRA_ROOTS";
/// Environment variable pinning host names to addresses, `host=ip:port[,host=ip:port]`,
/// like `curl --resolve` (private endpoints without DNS; the stand-ins in tests).
pub const RESOLVE_ENV: &str = "TRELLIS_AZURE_RESOLVE";

/// [`client_options`], adjusted by [`EXTRA_ROOTS_ENV`] and [`RESOLVE_ENV`]; the authority
/// host comes from `AZURE_AUTHORITY_HOST` as the SDK reads it. Errors name the variable.
pub fn client_options_from_env() -> Result<ClientOptions, Error> {
    let roots = match std::env::var_os(EXTRA_ROOTS_ENV) {
        Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
            Error::Config(format!("{EXTRA_ROOTS_ENV}={}: {e}", path.to_string_lossy()))
        })?),
        None => None,
    };
    let resolve = match std::env::var(RESOLVE_ENV) {
        Ok(v) => parse_resolve(&v)?,
        Err(_) => Vec::new(),
    };
    let pins: Vec<(&str, SocketAddr)> = resolve.iter().map(|(h, a)| (h.as_str(), *a)).collect();
    Ok(ClientOptions {
        transport: Some(build_transport(roots.as_deref(), &pins)?),
        ..ClientOptions::default()
    })
}

/// Parses `host=ip:port[,host=ip:port]`.
fn parse_resolve(value: &str) -> Result<Vec<(String, SocketAddr)>, Error> {
    value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|pair| {
            let (host, addr) = pair.trim().split_once('=').ok_or_else(|| {
                Error::Config(format!(
                    "{RESOLVE_ENV}: expected host=ip:port, got {pair:?}"
                ))
            })?;
            let addr = addr.parse::<SocketAddr>().map_err(|e| {
                Error::Config(format!("{RESOLVE_ENV}: {addr:?} is not ip:port: {e}"))
            })?;
            Ok((host.to_owned(), addr))
        })
        .collect()
}

/// Fills in [`https_transport`] when `options` has no transport of its own.
pub(crate) fn with_transport(mut options: ClientOptions) -> Result<ClientOptions, Error> {
    if options.transport.is_none() {
        options.transport = Some(https_transport(None)?);
    }
    Ok(options)
}

/// `resolve` pins host names to addresses (the stand-ins serve Key Vault host names from
/// 127.0.0.1, so the SDK's challenge-resource check runs as it does against Azure).
pub(crate) fn build_transport(
    trusted_roots_pem: Option<&str>,
    resolve: &[(&str, SocketAddr)],
) -> Result<Transport, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Transport(e.to_string()))?;
    let config = match trusted_roots_pem {
        None => builder
            .with_platform_verifier()
            .map_err(|e| Error::Transport(format!("platform verifier: {e}")))?
            .with_no_client_auth(),
        Some(pem_text) => {
            let mut roots = RootCertStore::empty();
            for cert in parse_certificates(pem_text)? {
                roots
                    .add(cert)
                    .map_err(|e| Error::Transport(format!("trusted root: {e}")))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    let mut client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        // Azure REST guidelines discourage redirects; azure_core's client does not follow them.
        .redirect(reqwest::redirect::Policy::none());
    for (host, addr) in resolve {
        client = client.resolve(host, *addr);
    }
    let client = client
        .build()
        .map_err(|e| Error::Transport(e.to_string()))?;
    Ok(Transport::new(Arc::new(client)))
}

fn parse_certificates(pem_text: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Transport(format!("trusted roots: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Transport(
            "trusted roots: no CERTIFICATE block".to_owned(),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_with_system_roots_and_fills_a_missing_transport() {
        assert!(client_options().unwrap().transport.is_some());
        let filled = with_transport(ClientOptions::default()).unwrap();
        assert!(filled.transport.is_some());
    }

    #[test]
    fn private_roots_must_hold_a_certificate() {
        let err = https_transport(Some("not pem")).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
        let ca = rcgen::generate_simple_self_signed(["ca.test".to_owned()]).unwrap();
        https_transport(Some(&ca.cert.pem())).unwrap();
    }

    #[test]
    fn resolve_pins_parse_and_bad_ones_name_the_variable() {
        let pins = parse_resolve("a.vault.azure.net=127.0.0.1:8443, b=[::1]:9").unwrap();
        assert_eq!(
            pins[0],
            (
                "a.vault.azure.net".to_owned(),
                "127.0.0.1:8443".parse().unwrap()
            )
        );
        assert_eq!(pins[1].1, "[::1]:9".parse::<SocketAddr>().unwrap());
        assert!(parse_resolve("").unwrap().is_empty());
        for bad in ["nohost", "h=127.0.0.1", "h=name:80"] {
            let err = parse_resolve(bad).unwrap_err().to_string();
            assert!(err.contains(RESOLVE_ENV), "{err}");
        }
    }
}
