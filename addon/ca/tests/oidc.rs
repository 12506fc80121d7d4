//! `OidcVerifier` against a stand-in OIDC issuer: a local HTTPS server (rcgen test CA,
//! tokio-rustls, hyper) serving a discovery document and a JWKS the test can change, the
//! way an API server publishes its ServiceAccount token keys.

// Helpers outside `#[test]` functions unwrap too; a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prometheus_client::registry::Registry;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::Code;
use trellis_api::identity::v1::CertifyRequest;
use trellis_api::identity::v1::identity_server::Identity;
use trellis_ca::{
    Caller, CertificateAuthority, DEFAULT_AUDIENCE, IdentityService, Metrics, OidcConfig,
    OidcVerifier, TokenError, TokenVerifier,
};

const RSA_KEY_PEM: &str = include_str!("data/oidc-rsa2048.key.pem");
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
const JWKS_PATH: &str = "/openid/v1/jwks";
/// An AKS-shaped issuer: a path, and a trailing slash.
const ISSUER_PATH: &str = "/tenant/cluster/";

// === the stand-in issuer ===

/// What the stand-in serves, changeable while it runs.
struct Served {
    issuer: String,
    keys: Vec<Value>,
    /// Served instead of the documents when set.
    status: Option<StatusCode>,
    /// Requests per path.
    hits: HashMap<String, usize>,
}

struct StandIn {
    issuer: String,
    roots_pem: String,
    served: Arc<Mutex<Served>>,
    _task: tokio::task::JoinHandle<()>,
}

impl StandIn {
    async fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer = format!("https://{addr}{ISSUER_PATH}");
        let (roots_pem, tls) = tls();
        let served = Arc::new(Mutex::new(Served {
            issuer: issuer.clone(),
            keys: Vec::new(),
            status: None,
            hits: HashMap::new(),
        }));
        let task = tokio::spawn(serve(listener, tls, served.clone(), addr));
        Self {
            issuer,
            roots_pem,
            served,
            _task: task,
        }
    }

    fn set_keys(&self, keys: &[&SigningKey]) {
        self.served.lock().unwrap().keys = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fail_with(&self, status: Option<StatusCode>) {
        self.served.lock().unwrap().status = status;
    }

    /// JWKS downloads so far.
    fn jwks_fetches(&self) -> usize {
        self.hits(JWKS_PATH)
    }

    fn hits(&self, path: &str) -> usize {
        let served = self.served.lock().unwrap();
        served.hits.get(path).copied().unwrap_or(0)
    }

    fn verifier(&self) -> OidcVerifier {
        self.verifier_with(|c| c)
    }

    fn verifier_with(&self, tweak: impl FnOnce(OidcConfig) -> OidcConfig) -> OidcVerifier {
        let config = OidcConfig::new(&self.issuer, DEFAULT_AUDIENCE)
            .with_extra_roots_pem(&self.roots_pem)
            .with_fetch_timeout(Duration::from_secs(5));
        OidcVerifier::new(tweak(config)).unwrap()
    }
}

async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    served: Arc<Mutex<Served>>,
    addr: SocketAddr,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (tls, served) = (tls.clone(), served.clone());
        connections.spawn(async move {
            let Ok(stream) = tls.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let reply = respond(&served, request.uri().path(), addr);
                async move { Ok::<_, Infallible>(reply) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(served: &Mutex<Served>, path: &str, addr: SocketAddr) -> Response<Full<Bytes>> {
    let mut served = served.lock().unwrap();
    let local = path
        .strip_prefix(ISSUER_PATH.trim_end_matches('/'))
        .unwrap_or(path);
    *served.hits.entry(local.to_owned()).or_default() += 1;
    let (status, body) = match (served.status, local) {
        (Some(status), _) => (status, json!({"error": "down"})),
        (None, DISCOVERY_PATH) => (
            StatusCode::OK,
            // What an API server's discovery document holds.
            json!({
                "issuer": served.issuer,
                "jwks_uri": format!("https://{addr}{}{JWKS_PATH}", ISSUER_PATH.trim_end_matches('/')),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }),
        ),
        (None, JWKS_PATH) => (StatusCode::OK, json!({"keys": served.keys})),
        _ => (StatusCode::NOT_FOUND, json!({})),
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}

/// A test CA's PEM and an acceptor serving a certificate for 127.0.0.1 it signed.
fn tls() -> (String, TlsAcceptor) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_cert.pem(), TlsAcceptor::from(Arc::new(config)))
}

// === token signing keys ===

/// A key the stand-in publishes and tests sign tokens with.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    /// The checked-in RSA key: clusters sign with RS256.
    fn rsa(kid: &str) -> Self {
        let der = pem::parse(RSA_KEY_PEM).unwrap().into_contents();
        let pair = ring::rsa::KeyPair::from_der(&der).unwrap();
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        Self {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_der(&der),
            jwk: json!({
                "use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(&public.n),
                "e": URL_SAFE_NO_PAD.encode(&public.e),
            }),
        }
    }

    fn ec(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        Self {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({
                "use": "sig", "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            }),
        }
    }

    /// A projected ServiceAccount token for demo/`sa` from `issuer`, tampered by `tweak`.
    fn token(&self, issuer: &str, sa: &str, tweak: impl FnOnce(&mut Value)) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = json!({
            "iss": issuer,
            "sub": format!("system:serviceaccount:demo:{sa}"),
            "aud": [DEFAULT_AUDIENCE],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "kubernetes.io": {
                "namespace": "demo",
                "pod": {"name": "web-0", "uid": "p"},
                "serviceaccount": {"name": sa, "uid": "u"},
            },
        });
        tweak(&mut claims);
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn web() -> Caller {
    Caller {
        namespace: "demo".into(),
        service_account: "web".into(),
    }
}

// === tests ===

#[tokio::test]
async fn verifies_cluster_tokens_with_the_issuers_keys() {
    let issuer = StandIn::start().await;
    let (rsa, ec) = (SigningKey::rsa("rsa-1"), SigningKey::ec("ec-1"));
    issuer.set_keys(&[&rsa, &ec]);
    let verifier = issuer.verifier();
    assert_eq!(verifier.issuer(), issuer.issuer);
    assert!(verifier.key_ids().is_empty(), "no I/O before it is needed");
    assert_eq!(verifier.refresh().await.unwrap(), ["ec-1", "rsa-1"]);

    for key in [&rsa, &ec] {
        let token = key.token(&issuer.issuer, "web", |_| ());
        assert_eq!(verifier.verify(&token).await.unwrap(), web(), "{}", key.kid);
    }
    // The same claim checks as the local profile's verifier.
    type Tamper = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "audience",
            Box::new(|c| c["aud"] = json!(["kubernetes"])),
            "token audience does not include \"trellis\"",
        ),
        (
            "issuer",
            Box::new(|c| c["iss"] = json!("https://evil.example")),
            "token issuer is not trusted",
        ),
        (
            "expired",
            Box::new(|c| c["exp"] = json!(1_000_000)),
            "token has expired",
        ),
        (
            "claims",
            Box::new(|c| c["kubernetes.io"]["serviceaccount"]["name"] = json!("admin")),
            "token subject does not match its kubernetes.io claims",
        ),
    ];
    for (name, tweak, expected) in cases {
        let token = rsa.token(&issuer.issuer, "web", tweak);
        let err = verifier.verify(&token).await.unwrap_err();
        assert_eq!(err.to_string(), expected, "{name}");
    }
    // The header cannot choose the algorithm: RS256 is tied to the RSA key.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let claims = json!({"iss": issuer.issuer});
    let hs = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"k")).unwrap();
    assert!(matches!(verifier.verify(&hs).await, Err(TokenError::Algorithm(a)) if a == "HS256"));
    let forged = ec.token(&issuer.issuer, "web", |_| ());
    let (_, rest) = forged.split_once('.').unwrap();
    let rs_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"ec-1"}"#);
    assert!(matches!(
        verifier.verify(&format!("{rs_header}.{rest}")).await,
        Err(TokenError::Algorithm(_))
    ));
    assert_eq!(issuer.jwks_fetches(), 1, "all of that from one fetch");

    // And through the CA service: the leaf is for the token's identity.
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
    let service = IdentityService::new(
        ca,
        Arc::new(verifier),
        Metrics::new(&mut Registry::default()),
    );
    let id = trellis_identity::SpiffeId::new("cluster.local", "demo", "web").unwrap();
    let resp = service
        .certify(tonic::Request::new(CertifyRequest {
            csr_der: trellis_identity::generate_csr(&id).unwrap().csr_der,
            token: rsa.token(&issuer.issuer, "web", |_| ()),
            requested_ttl_seconds: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.identity, "spiffe://cluster.local/ns/demo/sa/web");
}

#[tokio::test]
async fn an_unknown_key_id_refetches_at_most_once_per_interval() {
    let issuer = StandIn::start().await;
    let (old, new, newer) = (
        SigningKey::rsa("old"),
        SigningKey::ec("new"),
        SigningKey::ec("newer"),
    );
    issuer.set_keys(&[&old]);
    let pause = Duration::from_millis(600);
    let verifier = issuer.verifier_with(|c| c.with_min_refetch_interval(pause));
    // The first token fetches the keys.
    verifier
        .verify(&old.token(&issuer.issuer, "web", |_| ()))
        .await
        .unwrap();
    assert_eq!(issuer.jwks_fetches(), 1);

    // The issuer rotates: tokens of the new key arrive at once, from many pods. One fetch
    // serves them all.
    tokio::time::sleep(pause).await;
    issuer.set_keys(&[&old, &new]);
    let token = new.token(&issuer.issuer, "web", |_| ());
    let results = futures_util::future::join_all((0..20).map(|_| verifier.verify(&token))).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|c| *c == web())),
        "{results:?}"
    );
    assert_eq!(issuer.jwks_fetches(), 2);
    assert_eq!(verifier.key_ids(), ["new", "old"]);

    // A key id the issuer does not publish (yet): refused, and no second fetch so soon.
    let token = newer.token(&issuer.issuer, "web", |_| ());
    for _ in 0..5 {
        assert!(matches!(
            verifier.verify(&token).await,
            Err(TokenError::UnknownKey)
        ));
    }
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "made-up key ids cannot drive fetches"
    );

    // Once the interval has passed, an unknown key id fetches again.
    issuer.set_keys(&[&new, &newer]);
    tokio::time::sleep(pause).await;
    assert_eq!(verifier.verify(&token).await.unwrap(), web());
    assert_eq!(issuer.jwks_fetches(), 3);
    // The old key is gone from the issuer, so from the verifier too.
    assert!(matches!(
        verifier
            .verify(&old.token(&issuer.issuer, "web", |_| ()))
            .await,
        Err(TokenError::UnknownKey)
    ));
    assert_eq!(
        issuer.hits(DISCOVERY_PATH),
        3,
        "discovery, then the JWKS, each time"
    );
}

#[tokio::test]
async fn keys_are_refreshed_when_old_and_garbage_fetches_nothing() {
    let issuer = StandIn::start().await;
    let key = SigningKey::ec("k");
    issuer.set_keys(&[&key]);
    let refresh = Duration::from_millis(400);
    let verifier = issuer.verifier_with(|c| c.with_refresh_interval(refresh));
    for garbage in ["", "not.a.token", "a.b.c"] {
        assert!(verifier.verify(garbage).await.is_err());
    }
    assert_eq!(
        issuer.hits(DISCOVERY_PATH),
        0,
        "garbage never reaches the issuer"
    );

    let token = key.token(&issuer.issuer, "web", |_| ());
    verifier.verify(&token).await.unwrap();
    verifier.verify(&token).await.unwrap();
    assert_eq!(issuer.jwks_fetches(), 1);
    tokio::time::sleep(refresh + Duration::from_millis(100)).await;
    verifier.verify(&token).await.unwrap();
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "refreshed once older than the interval"
    );
}

#[tokio::test]
async fn an_unreachable_issuer_is_unavailable_not_a_refusal() {
    // Nothing listening.
    let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let url = format!("https://{}/", closed.local_addr().unwrap());
    drop(closed);
    let verifier = OidcVerifier::new(OidcConfig::new(&url, DEFAULT_AUDIENCE)).unwrap();
    let key = SigningKey::ec("k");
    let token = key.token(&url, "web", |_| ());
    let err = verifier.verify(&token).await.unwrap_err();
    assert!(
        matches!(&err, TokenError::Unavailable(m) if m.contains("connecting to")),
        "{err}"
    );

    // The CA service answers UNAVAILABLE, so the proxy retries.
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
    let mut registry = Registry::default();
    let service = IdentityService::new(ca, Arc::new(verifier), Metrics::new(&mut registry));
    let status = service
        .certify(tonic::Request::new(CertifyRequest {
            csr_der: Vec::new(),
            token,
            requested_ttl_seconds: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "token verifier unavailable");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"trellis_ca_requests_failed_total{reason="verifier_unavailable"} 1"#),
        "{text}"
    );

    // An issuer that answers with an error: the same.
    let issuer = StandIn::start().await;
    issuer.set_keys(&[&key]);
    issuer.fail_with(Some(StatusCode::SERVICE_UNAVAILABLE));
    let verifier = issuer.verifier_with(|c| c.with_min_refetch_interval(Duration::ZERO));
    let err = verifier.refresh().await.unwrap_err();
    assert!(
        matches!(&err, TokenError::Unavailable(m) if m.contains("HTTP status 503")),
        "{err}"
    );

    // Once it is back the keys load; when it goes down again the cached keys keep
    // verifying, but a key id only the issuer could vouch for is unavailable, not unknown.
    issuer.fail_with(None);
    let token = key.token(&issuer.issuer, "web", |_| ());
    assert_eq!(verifier.verify(&token).await.unwrap(), web());
    issuer.fail_with(Some(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(verifier.verify(&token).await.unwrap(), web());
    let unknown = SigningKey::ec("rotated").token(&issuer.issuer, "web", |_| ());
    assert!(matches!(
        verifier.verify(&unknown).await,
        Err(TokenError::Unavailable(_))
    ));
    assert_eq!(verifier.verify(&token).await.unwrap(), web());

    // The same without retrying at once: a periodic refresh fails, the cached keys keep
    // verifying, and an unknown key id is unavailable without another fetch.
    issuer.fail_with(None);
    let refresh = Duration::from_millis(300);
    let verifier = issuer.verifier_with(|c| c.with_refresh_interval(refresh));
    assert_eq!(verifier.verify(&token).await.unwrap(), web());
    issuer.fail_with(Some(StatusCode::BAD_GATEWAY));
    tokio::time::sleep(refresh).await;
    let before = issuer.hits(DISCOVERY_PATH);
    assert_eq!(verifier.verify(&token).await.unwrap(), web());
    assert_eq!(
        issuer.hits(DISCOVERY_PATH),
        before + 1,
        "the refresh was tried"
    );
    for _ in 0..3 {
        let err = verifier.verify(&unknown).await.unwrap_err();
        assert!(
            matches!(&err, TokenError::Unavailable(m) if m.contains("HTTP status 502")),
            "{err}"
        );
        assert_eq!(verifier.verify(&token).await.unwrap(), web());
    }
    assert_eq!(
        issuer.hits(DISCOVERY_PATH),
        before + 1,
        "and not again within 30 s"
    );
}

#[tokio::test]
async fn the_issuer_must_be_who_the_tls_and_the_document_say() {
    let issuer = StandIn::start().await;
    let key = SigningKey::ec("k");
    issuer.set_keys(&[&key]);

    // Without the private CA in the extra roots the issuer is not trusted.
    let untrusting = OidcVerifier::new(OidcConfig::new(&issuer.issuer, DEFAULT_AUDIENCE)).unwrap();
    let err = untrusting.refresh().await.unwrap_err();
    assert!(
        matches!(&err, TokenError::Unavailable(m) if m.contains("TLS")),
        "{err}"
    );
    assert_eq!(issuer.hits(DISCOVERY_PATH), 0);

    // A discovery document naming another issuer is refused (OIDC Discovery §4.3).
    issuer.served.lock().unwrap().issuer = "https://evil.example/".into();
    let err = issuer.verifier().refresh().await.unwrap_err();
    assert!(
        matches!(&err, TokenError::Unavailable(m) if m.contains("names issuer \"https://evil.example/\"")),
        "{err}"
    );

    // Configuration mistakes are caught before any I/O.
    for bad in [
        "http://issuer.example",
        "issuer.example",
        "https://issuer.example/?x=1",
    ] {
        let err = OidcVerifier::new(OidcConfig::new(bad, DEFAULT_AUDIENCE)).unwrap_err();
        assert!(matches!(err, TokenError::Config(_)), "{bad}: {err}");
    }
    let err = OidcVerifier::new(
        OidcConfig::new(&issuer.issuer, DEFAULT_AUDIENCE).with_extra_roots_pem("not pem"),
    )
    .unwrap_err();
    assert!(matches!(err, TokenError::Config(_)), "{err}");
}
