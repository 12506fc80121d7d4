//! A stand-in for the Application Insights ingestion endpoint (feature `test-util`; never
//! used by production code).
//!
//! An HTTPS server on 127.0.0.1 (a fresh rcgen test CA per instance, rustls on ring,
//! HTTP/1.1 with hyper) that speaks the documented Breeze track API, so tests run the real
//! Application Insights exporter — gzip, JSON envelopes, status codes, retries — without
//! Azure:
//!
//! - `POST /v2/track` with a JSON array of envelopes, gzip-compressed when
//!   `Content-Encoding: gzip` says so (as the exporter always sends). Each envelope needs
//!   `name`, `time`, `iKey` (this stand-in's key) and `data.baseType` / `data.baseData`.
//!   All valid: `200 {"itemsReceived":n,"itemsAccepted":n,"errors":[]}`. Some invalid:
//!   `206` with an `errors` entry (`index`, `statusCode` 400, `message`) for each, as
//!   Breeze answers; only valid envelopes are stored.
//! - A body that is not gzip (when it says it is) or not a JSON array: `400` with a body
//!   naming the problem. Bodies above [`MAX_BODY_BYTES`] compressed or
//!   [`MAX_JSON_BYTES`] decompressed: `413`.
//! - [`fail_next`](IngestionStandIn::fail_next) answers the next requests with a given
//!   status (429, 503, ...) without storing anything, for retry tests.

use std::convert::Infallible;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Largest request body accepted, as sent (compressed).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Largest request body accepted after decompression.
pub const MAX_JSON_BYTES: usize = 32 << 20;
/// The path the exporter posts to.
pub const TRACK_PATH: &str = "/v2/track";

/// The running stand-in. Dropping it stops the server and closes its connections.
pub struct IngestionStandIn {
    state: Arc<State>,
    addr: SocketAddr,
    ca_pem: String,
    task: JoinHandle<()>,
}

struct State {
    instrumentation_key: String,
    /// Stored envelopes; the watch channel publishes their count to `wait_for`.
    envelopes: Mutex<Vec<Value>>,
    stored: watch::Sender<usize>,
    /// Requests to `/v2/track` answered, failures included.
    requests: Mutex<u64>,
    /// `(remaining, status)` for `fail_next`.
    failing: Mutex<(usize, StatusCode)>,
}

impl IngestionStandIn {
    /// Starts the server on 127.0.0.1 (an ephemeral port) with a fresh test CA and a random
    /// instrumentation key.
    pub async fn start() -> io::Result<Self> {
        let (ca_pem, tls) = tls_config().map_err(io::Error::other)?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            instrumentation_key: random_uuid(),
            envelopes: Mutex::default(),
            stored: watch::Sender::new(0),
            requests: Mutex::default(),
            failing: Mutex::new((0, StatusCode::OK)),
        });
        let task = tokio::spawn(serve(listener, tls, state.clone()));
        Ok(Self {
            state,
            addr,
            ca_pem,
            task,
        })
    }

    /// `InstrumentationKey=<uuid>;IngestionEndpoint=https://127.0.0.1:<port>/`.
    pub fn connection_string(&self) -> String {
        format!(
            "InstrumentationKey={};IngestionEndpoint=https://{}/",
            self.state.instrumentation_key, self.addr
        )
    }

    /// The instrumentation key envelopes must carry (`iKey`).
    pub fn instrumentation_key(&self) -> &str {
        &self.state.instrumentation_key
    }

    /// The test CA that issued the server's certificate (PEM), for the client's roots.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every envelope stored so far, in arrival order.
    pub fn envelopes(&self) -> Vec<Value> {
        lock(&self.state.envelopes).clone()
    }

    /// Requests to `/v2/track` answered so far, including failed and refused ones.
    pub fn requests(&self) -> u64 {
        *lock(&self.state.requests)
    }

    /// Answers the next `n` requests to `/v2/track` with `status` (and a Breeze-style error
    /// body), storing nothing.
    pub fn fail_next(&self, n: usize, status: StatusCode) {
        *lock(&self.state.failing) = (n, status);
    }

    /// Waits until at least `n` envelopes are stored and returns them all; after `timeout`,
    /// a `TimedOut` error saying how many arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> io::Result<Vec<Value>> {
        let mut stored = self.state.stored.subscribe();
        let waited = tokio::time::timeout(timeout, stored.wait_for(|&count| count >= n)).await;
        match waited {
            Ok(Ok(_)) => Ok(self.envelopes()),
            _ => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "waited {timeout:?} for {n} envelopes, {} arrived",
                    self.envelopes().len()
                ),
            )),
        }
    }
}

impl Drop for IngestionStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for IngestionStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestionStandIn")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Accepts TLS connections and serves HTTP/1.1 until aborted; aborting drops the
/// connection set, which closes every open connection too.
async fn serve(listener: TcpListener, tls: TlsAcceptor, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let tls = tls.clone();
        let state = state.clone();
        connections.spawn(async move {
            let Ok(stream) = tls.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(state: &State, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    if parts.uri.path() != TRACK_PATH {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "only POST /v2/track"}),
        );
    }
    if parts.method != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "only POST /v2/track"}),
        );
    }
    *lock(&state.requests) += 1;
    {
        let mut failing = lock(&state.failing);
        if failing.0 > 0 {
            failing.0 -= 1;
            let status = failing.1;
            return reply(
                status,
                json!({"itemsReceived": 0, "itemsAccepted": 0, "errors": [
                    {"index": 0, "statusCode": status.as_u16(), "message": "stand-in: told to fail"}
                ]}),
            );
        }
    }
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("body above {MAX_BODY_BYTES} bytes")}),
            );
        }
    };
    let gzip = parts
        .headers
        .get(CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let json = if gzip {
        match gunzip(&body) {
            Ok(json) => json,
            Err((status, error)) => return reply(status, json!({ "error": error })),
        }
    } else {
        body.to_vec()
    };
    let items: Vec<Value> = match serde_json::from_slice(&json) {
        Ok(Value::Array(items)) => items,
        Ok(_) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "the body must be a JSON array of envelopes"}),
            );
        }
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("the body is not JSON: {e}")}),
            );
        }
    };
    let received = items.len();
    let mut errors = Vec::new();
    let mut accepted = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match check_envelope(&item, &state.instrumentation_key) {
            Ok(()) => accepted.push(item),
            Err(message) => {
                errors.push(json!({"index": index, "statusCode": 400, "message": message}));
            }
        }
    }
    let accepted_count = accepted.len();
    {
        let mut envelopes = lock(&state.envelopes);
        envelopes.extend(accepted);
        state.stored.send_replace(envelopes.len());
    }
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::PARTIAL_CONTENT
    };
    reply(
        status,
        json!({"itemsReceived": received, "itemsAccepted": accepted_count, "errors": errors}),
    )
}

/// Decompresses a gzip body, refusing more than [`MAX_JSON_BYTES`] of output (a small
/// body can inflate to gigabytes).
fn gunzip(body: &[u8]) -> Result<Vec<u8>, (StatusCode, String)> {
    let mut json = Vec::new();
    let limit = u64::try_from(MAX_JSON_BYTES).unwrap_or(u64::MAX);
    let mut decoder = flate2::read::GzDecoder::new(body).take(limit + 1);
    if let Err(e) = decoder.read_to_end(&mut json) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("Content-Encoding is gzip but the body is not: {e}"),
        ));
    }
    if json.len() > MAX_JSON_BYTES {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body above {MAX_JSON_BYTES} bytes once decompressed"),
        ));
    }
    Ok(json)
}

/// The fields Breeze requires of every envelope.
fn check_envelope(item: &Value, instrumentation_key: &str) -> Result<(), String> {
    for field in ["name", "time", "iKey"] {
        if !item.get(field).is_some_and(Value::is_string) {
            return Err(format!("Field '{field}' on type 'Envelope' is required"));
        }
    }
    if item.get("iKey").and_then(Value::as_str) != Some(instrumentation_key) {
        return Err("Invalid instrumentation key".to_owned());
    }
    let data = item.get("data");
    if !data
        .and_then(|d| d.get("baseType"))
        .is_some_and(Value::is_string)
        || !data
            .and_then(|d| d.get("baseData"))
            .is_some_and(Value::is_object)
    {
        return Err("Field 'data' needs 'baseType' and 'baseData'".to_owned());
    }
    Ok(())
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// A fresh test CA and a server certificate for 127.0.0.1 and `localhost`: the CA's PEM
/// and the server's TLS acceptor.
fn tls_config() -> Result<(String, TlsAcceptor), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        "Trellis Application Insights stand-in test CA",
    );
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| err(&e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).map_err(|e| err(&e))?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).map_err(|e| err(&e))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| err(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), TlsAcceptor::from(Arc::new(config))))
}

/// A random version-4 UUID, the shape of a real instrumentation key.
fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A poisoned lock only means another test thread panicked; every critical section is a
/// single update, so the data is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instrumentation_keys_look_like_uuids() {
        let key = random_uuid();
        let parts: Vec<&str> = key.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{key}");
        assert_ne!(key, random_uuid());
    }

    #[test]
    fn envelopes_need_the_breeze_fields_and_our_key() {
        let good = json!({"name": "n", "time": "t", "iKey": "k",
            "data": {"baseType": "RequestData", "baseData": {}}});
        assert_eq!(check_envelope(&good, "k"), Ok(()));
        assert_eq!(
            check_envelope(&good, "other"),
            Err("Invalid instrumentation key".to_owned())
        );
        let mut no_time = good.clone();
        no_time.as_object_mut().unwrap().remove("time");
        assert!(
            check_envelope(&no_time, "k")
                .unwrap_err()
                .contains("'time'")
        );
        let mut no_data = good;
        no_data["data"] = json!({"baseType": "RequestData"});
        assert!(
            check_envelope(&no_data, "k")
                .unwrap_err()
                .contains("baseData")
        );
    }
}
