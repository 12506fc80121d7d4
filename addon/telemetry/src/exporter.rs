//! The Application Insights exporter and the HTTPS client under it.
//!
//! reqwest is built with `rustls-no-provider` (its `rustls` feature would bring aws-lc-rs,
//! a cmake and C build), so it is handed a rustls config on the ring provider here, as
//! everywhere in Trellis. Without one, reqwest's own default client panics when built.
//!
//! The connection string holds the instrumentation key, which lets anyone write into the
//! Application Insights resource: it is never logged, and no error here repeats it.
//! (`opentelemetry_application_insights::Exporter`'s `Debug` prints the key: do not log the
//! exporter either.)

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_application_insights::Exporter;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_platform_verifier::BuilderVerifierExt;

use crate::Error;

/// The HTTPS client's time limits.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// Connecting to the ingestion endpoint, TLS handshake included.
    connect: Duration,
    /// One upload request, end to end. The exporter retries 408/429/439/500/503 and
    /// connection errors (with up to 35 s of backoff in all); this stops a hung request
    /// from holding a batch until the gateway's export timeout.
    request: Duration,
}

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(10),
    request: Duration::from_secs(20),
};

/// Builds the Application Insights trace exporter for `connection_string`.
///
/// Servers are verified with the platform verifier (the system's roots) when
/// `extra_roots_pem` is `None`; with `Some(pem)`, ONLY the certificates in `pem` are
/// trusted (a private ingestion endpoint; the stand-in in tests).
///
/// The connection string is checked here first so that errors say what is wrong:
/// `InstrumentationKey` is required, fields are `key=value` separated by `;` (a trailing
/// `;` is fine), `Authorization` may only be `ikey` (Entra ID auth is not supported by the
/// exporter), and an `IngestionEndpoint` must be an `https://` URL.
pub fn app_insights_exporter(
    connection_string: &str,
    extra_roots_pem: Option<&str>,
) -> Result<Exporter<reqwest::Client>, Error> {
    let normalized = check_connection_string(connection_string)?;
    let client = https_client(extra_roots_pem, TIMEOUTS)?;
    let exporter = Exporter::new_from_connection_string(normalized, client)
        // The exporter's parse errors name the problem, never a value.
        .map_err(|e| Error::ConnectionString(e.to_string()))?;
    Ok(exporter.with_retry_notify(|error, delay| {
        tracing::debug!(%error, ?delay, "Application Insights upload failed; retrying");
    }))
}

/// Validates `connection_string` and returns it without empty fields (the exporter's own
/// parser refuses a trailing `;`). Errors name fields by position and key, never by value.
fn check_connection_string(connection_string: &str) -> Result<String, Error> {
    let err = |msg: String| Err(Error::ConnectionString(msg));
    let mut fields = Vec::new();
    let mut has_key = false;
    for (index, field) in connection_string.split(';').enumerate() {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let position = index + 1;
        let Some((key, value)) = field.split_once('=') else {
            return err(format!("field {position} is not key=value"));
        };
        let key = key.trim();
        let value = value.trim();
        if value.contains('=') {
            return err(format!(
                "the value of {key} (field {position}) contains '='"
            ));
        }
        if key.is_empty() || value.is_empty() {
            return err(format!("field {position} has an empty key or value"));
        }
        match key.to_ascii_lowercase().as_str() {
            "instrumentationkey" => has_key = true,
            "authorization" if !value.eq_ignore_ascii_case("ikey") => {
                return err(
                    "Authorization must be ikey (Entra ID authentication is not supported)"
                        .to_owned(),
                );
            }
            "ingestionendpoint" if !value.starts_with("https://") => {
                return err("IngestionEndpoint must be an https:// URL".to_owned());
            }
            _ => {}
        }
        fields.push(format!("{key}={value}"));
    }
    if !has_key {
        return err("missing InstrumentationKey".to_owned());
    }
    Ok(fields.join(";"))
}

/// reqwest over rustls with ring; see [`app_insights_exporter`] for the roots.
fn https_client(
    extra_roots_pem: Option<&str>,
    timeouts: Timeouts,
) -> Result<reqwest::Client, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Transport(e.to_string()))?;
    let config = match extra_roots_pem {
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
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.request)
        // Breeze does not redirect; following one would send the key elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Transport(e.to_string()))
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

    const KEY: &str = "0bb1c0de-0000-4000-8000-00000000beef";

    #[test]
    fn connection_strings_are_checked_with_errors_that_never_repeat_the_key() {
        let ok = check_connection_string(&format!(
            " InstrumentationKey={KEY};IngestionEndpoint=https://x.example/;"
        ))
        .unwrap();
        assert_eq!(
            ok,
            format!("InstrumentationKey={KEY};IngestionEndpoint=https://x.example/")
        );
        for (bad, expected) in [
            (
                "IngestionEndpoint=https://x.example/".to_owned(),
                "missing InstrumentationKey",
            ),
            (KEY.to_owned(), "field 1 is not key=value"),
            (
                format!("InstrumentationKey={KEY};{KEY}"),
                "field 2 is not key=value",
            ),
            (
                format!("InstrumentationKey={KEY}=x"),
                "the value of InstrumentationKey (field 1) contains '='",
            ),
            (
                "InstrumentationKey=".to_owned(),
                "field 1 has an empty key or value",
            ),
            (
                format!("InstrumentationKey={KEY};Authorization=AAD"),
                "Authorization must be ikey",
            ),
            (
                format!("InstrumentationKey={KEY};IngestionEndpoint=http://x.example/"),
                "IngestionEndpoint must be an https:// URL",
            ),
        ] {
            let err = app_insights_exporter(&bad, None).unwrap_err().to_string();
            assert!(
                err.starts_with("Application Insights connection string: "),
                "{err}"
            );
            assert!(err.contains(expected), "{bad:?}: {err}");
            assert!(!err.contains(KEY), "{err} repeats the key");
        }
        // The exporter's own parser still runs, on what passed ours.
        let err = app_insights_exporter(
            &format!("InstrumentationKey={KEY};IngestionEndpoint=https://bad host/"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid endpoint"), "{err}");
        assert!(!err.contains(KEY), "{err}");
    }

    /// A server that accepts TCP connections and never says a word (not even TLS).
    async fn silent_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        (addr, task)
    }

    async fn time_to_fail(timeouts: Timeouts) -> (Duration, reqwest::Error) {
        let (addr, server) = silent_server().await;
        let client = https_client(None, timeouts).unwrap();
        let started = std::time::Instant::now();
        let err = client
            .post(format!("https://{addr}/v2/track"))
            .send()
            .await
            .unwrap_err();
        server.abort();
        (started.elapsed(), err)
    }

    #[tokio::test]
    async fn a_silent_endpoint_hits_the_connect_timeout() {
        let (elapsed, err) = time_to_fail(Timeouts {
            connect: Duration::from_millis(200),
            request: Duration::from_secs(60),
        })
        .await;
        assert!(err.is_connect() && err.is_timeout(), "{err:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_silent_endpoint_hits_the_request_timeout() {
        let (elapsed, err) = time_to_fail(Timeouts {
            connect: Duration::from_secs(60),
            request: Duration::from_millis(200),
        })
        .await;
        assert!(err.is_timeout(), "{err:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    fn builds_with_system_roots_or_only_the_given_ones() {
        let conn = format!("InstrumentationKey={KEY}");
        app_insights_exporter(&conn, None).unwrap();
        let err = app_insights_exporter(&conn, Some("not pem")).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
    }
}
