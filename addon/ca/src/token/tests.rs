//! The token accept/reject matrix.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap()
}

/// Claims a valid token for demo/web would carry, to be tampered with per case.
fn claims(ns: &str, sa: &str) -> Value {
    let now = now();
    json!({
        "iss": LOCAL_ISSUER,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": [DEFAULT_AUDIENCE],
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
    })
}

fn setup() -> (LocalIssuer, JwksVerifier) {
    let issuer = LocalIssuer::generate().unwrap();
    let verifier = issuer.verifier(DEFAULT_AUDIENCE).unwrap();
    (issuer, verifier)
}

fn forge(issuer: &LocalIssuer, claims: &Value) -> String {
    issuer.encode(issuer.key_id(), claims).unwrap()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[test]
fn minted_token_is_accepted() {
    let (issuer, verifier) = setup();
    let token = issuer.mint("demo", "web", DEFAULT_AUDIENCE, HOUR).unwrap();
    let caller = verifier.verify_now(&token).unwrap();
    assert_eq!(
        caller,
        Caller {
            namespace: "demo".into(),
            service_account: "web".into()
        }
    );
}

#[test]
fn minted_token_has_service_account_shape() {
    let (issuer, _) = setup();
    let token = issuer.mint("demo", "web", DEFAULT_AUDIENCE, HOUR).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], issuer.key_id());
    let c: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(c["iss"], LOCAL_ISSUER);
    assert_eq!(c["sub"], "system:serviceaccount:demo:web");
    assert_eq!(c["aud"], json!([DEFAULT_AUDIENCE]));
    assert_eq!(c["kubernetes.io"]["namespace"], "demo");
    assert_eq!(c["kubernetes.io"]["serviceaccount"]["name"], "web");
    assert!(c["kubernetes.io"]["serviceaccount"]["uid"].is_string());
    let (iat, nbf, exp) = (
        c["iat"].as_i64().unwrap(),
        c["nbf"].as_i64().unwrap(),
        c["exp"].as_i64().unwrap(),
    );
    assert_eq!(iat, nbf);
    assert_eq!(exp - iat, 3600);
}

#[test]
fn jwks_is_standard_ec_key() {
    let (issuer, _) = setup();
    let jwks: Value = serde_json::from_str(&issuer.jwks_json()).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["kid"], issuer.key_id());
    for c in ["x", "y"] {
        let bytes = URL_SAFE_NO_PAD.decode(key[c].as_str().unwrap()).unwrap();
        assert_eq!(bytes.len(), 32, "{c}");
    }
}

#[test]
fn string_audience_is_accepted() {
    let (issuer, verifier) = setup();
    let mut c = claims("demo", "web");
    c["aud"] = json!(DEFAULT_AUDIENCE);
    assert!(verifier.verify_now(&forge(&issuer, &c)).is_ok());
}

#[test]
fn leeway_tolerates_small_skew() {
    let (issuer, verifier) = setup();
    let mut c = claims("demo", "web");
    c["exp"] = json!(now() - 30);
    c["nbf"] = json!(now() + 30);
    assert!(verifier.verify_now(&forge(&issuer, &c)).is_ok());
}

#[test]
fn rejects_bad_claims() {
    let (issuer, verifier) = setup();
    type Tamper = fn(&mut Value);
    type Expect = fn(&TokenError) -> bool;
    let cases: &[(&str, Tamper, Expect)] = &[
        (
            "expired",
            |c| c["exp"] = json!(now() - 3600),
            |e| matches!(e, TokenError::Expired),
        ),
        (
            "not yet valid",
            |c| c["nbf"] = json!(now() + 3600),
            |e| matches!(e, TokenError::NotYetValid),
        ),
        (
            "wrong iss",
            |c| c["iss"] = json!("https://evil.example"),
            |e| matches!(e, TokenError::Issuer),
        ),
        (
            "iss array",
            |c| c["iss"] = json!([LOCAL_ISSUER]),
            |e| matches!(e, TokenError::Malformed),
        ),
        (
            "wrong aud",
            |c| c["aud"] = json!(["kubernetes"]),
            |e| matches!(e, TokenError::Audience(_)),
        ),
        (
            "no aud",
            |c| drop(c.as_object_mut().unwrap().remove("aud")),
            |e| matches!(e, TokenError::Malformed),
        ),
        (
            "no exp",
            |c| drop(c.as_object_mut().unwrap().remove("exp")),
            |e| matches!(e, TokenError::Malformed),
        ),
        (
            "sub not a service account",
            |c| c["sub"] = json!("admin"),
            |e| matches!(e, TokenError::Subject),
        ),
        (
            "sub with extra colon",
            |c| c["sub"] = json!("system:serviceaccount:demo:web:x"),
            |e| matches!(e, TokenError::Subject),
        ),
        (
            "sub names another sa",
            |c| c["sub"] = json!("system:serviceaccount:demo:db"),
            |e| matches!(e, TokenError::ClaimsMismatch),
        ),
        (
            "claims name another ns",
            |c| c["kubernetes.io"]["namespace"] = json!("prod"),
            |e| matches!(e, TokenError::ClaimsMismatch),
        ),
        (
            "claims name another sa",
            |c| c["kubernetes.io"]["serviceaccount"]["name"] = json!("db"),
            |e| matches!(e, TokenError::ClaimsMismatch),
        ),
        (
            "no kubernetes.io",
            |c| drop(c.as_object_mut().unwrap().remove("kubernetes.io")),
            |e| matches!(e, TokenError::Malformed),
        ),
    ];
    for (name, tamper, expected) in cases {
        let mut c = claims("demo", "web");
        tamper(&mut c);
        let err = verifier.verify_now(&forge(&issuer, &c)).unwrap_err();
        assert!(expected(&err), "{name}: got {err:?}");
    }
}

#[test]
fn rejects_invalid_names() {
    let (issuer, verifier) = setup();
    for (ns, sa) in [
        ("Demo", "web"),
        ("demo", "we_b"),
        ("de/mo", "web"),
        ("demo", ".."),
    ] {
        let c = claims(ns, sa);
        let err = verifier.verify_now(&forge(&issuer, &c)).unwrap_err();
        assert!(
            matches!(err, TokenError::InvalidName(_)),
            "{ns}/{sa}: got {err:?}"
        );
    }
    assert!(matches!(
        issuer.mint("Demo", "web", DEFAULT_AUDIENCE, HOUR),
        Err(TokenError::InvalidName(_))
    ));
}

#[test]
fn rejects_alg_none() {
    let (issuer, verifier) = setup();
    let header = json!({"alg": "none", "kid": issuer.key_id(), "typ": "JWT"});
    let token = format!("{}.{}.", b64(&header), b64(&claims("demo", "web")));
    assert!(matches!(verifier.verify_now(&token), Err(TokenError::Algorithm(a)) if a == "none"));
}

#[test]
fn rejects_hs256_signed_with_public_key() {
    let (issuer, verifier) = setup();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(issuer.key_id().to_owned());
    // The classic confusion: HMAC keyed with the (public) verification key.
    let jwks: Value = serde_json::from_str(&issuer.jwks_json()).unwrap();
    let x = jwks["keys"][0]["x"].as_str().unwrap().to_owned();
    for secret in [issuer.jwks_json().into_bytes(), x.into_bytes()] {
        let key = jsonwebtoken::EncodingKey::from_secret(&secret);
        let token = jsonwebtoken::encode(&header, &claims("demo", "web"), &key).unwrap();
        assert!(
            matches!(verifier.verify_now(&token), Err(TokenError::Algorithm(a)) if a == "HS256")
        );
    }
}

#[test]
fn rejects_rs256_header() {
    let (issuer, verifier) = setup();
    let token = forge(&issuer, &claims("demo", "web"));
    let rest = token.split_once('.').unwrap().1;
    let header = json!({"alg": "RS256", "kid": issuer.key_id()});
    let token = format!("{}.{rest}", b64(&header));
    assert!(matches!(
        verifier.verify_now(&token),
        Err(TokenError::Algorithm(_))
    ));
}

#[test]
fn rejects_other_key_with_same_kid() {
    let (issuer, verifier) = setup();
    let impostor = LocalIssuer::generate().unwrap();
    let token = impostor
        .encode(issuer.key_id(), &claims("demo", "web"))
        .unwrap();
    assert!(matches!(
        verifier.verify_now(&token),
        Err(TokenError::Signature)
    ));
}

#[test]
fn rejects_unknown_and_missing_kid() {
    let (issuer, verifier) = setup();
    let token = issuer
        .encode("someone-else", &claims("demo", "web"))
        .unwrap();
    assert!(matches!(
        verifier.verify_now(&token),
        Err(TokenError::UnknownKey)
    ));

    let good = forge(&issuer, &claims("demo", "web"));
    let rest = good.split_once('.').unwrap().1;
    let token = format!("{}.{rest}", b64(&json!({"alg": "ES256"})));
    assert!(matches!(
        verifier.verify_now(&token),
        Err(TokenError::MissingKeyId)
    ));
}

#[test]
fn rejects_tampered_payload() {
    let (issuer, verifier) = setup();
    let token = forge(&issuer, &claims("demo", "web"));
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims("demo", "admin")),
        parts[2]
    );
    assert!(matches!(
        verifier.verify_now(&forged),
        Err(TokenError::Signature)
    ));
}

#[test]
fn rejects_crit_header() {
    let (issuer, verifier) = setup();
    let good = forge(&issuer, &claims("demo", "web"));
    let rest = good.split_once('.').unwrap().1;
    let header = json!({"alg": "ES256", "kid": issuer.key_id(), "crit": ["exp"]});
    let token = format!("{}.{rest}", b64(&header));
    assert!(matches!(
        verifier.verify_now(&token),
        Err(TokenError::Malformed)
    ));
}

#[test]
fn rejects_oversize_and_garbage_without_echoing() {
    let (_, verifier) = setup();
    let secretish = "s3cr3t-".repeat(2000);
    let err = verifier.verify_now(&secretish).unwrap_err();
    assert!(matches!(err, TokenError::TooLong { .. }));
    for garbage in [
        "",
        "a.b",
        "a.b.c.d",
        "s3cr3t.s3cr3t.s3cr3t",
        "..",
        "eyJhbGciOiJFUzI1NiJ9.%%%.x",
    ] {
        let err = verifier.verify_now(garbage).unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{garbage:?}: {err}");
        assert!(
            !matches!(err, TokenError::Jwks(_) | TokenError::Io { .. }),
            "{garbage:?}: {err:?}"
        );
    }
}

#[test]
fn long_alg_is_truncated_in_errors() {
    let (_, verifier) = setup();
    let header = json!({"alg": "X".repeat(500), "kid": "k"});
    let token = format!("{}.e30.sig", b64(&header));
    let err = verifier.verify_now(&token).unwrap_err();
    assert!(err.to_string().len() < 100, "{err}");
}

#[test]
fn jwks_validation() {
    let (issuer, _) = setup();
    for bad in [
        "",
        "{}",
        r#"{"keys": []}"#,
        r#"{"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]}"#,
        r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": "AA", "y": "AA"}]}"#,
        r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#,
    ] {
        assert!(
            matches!(
                JwksVerifier::new(bad, LOCAL_ISSUER, DEFAULT_AUDIENCE),
                Err(TokenError::Jwks(_))
            ),
            "{bad}"
        );
    }
    // Duplicate kids are ambiguous.
    let jwks: Value = serde_json::from_str(&issuer.jwks_json()).unwrap();
    let key = jwks["keys"][0].clone();
    let dup = json!({"keys": [key.clone(), key]}).to_string();
    assert!(JwksVerifier::new(&dup, LOCAL_ISSUER, DEFAULT_AUDIENCE).is_err());
    // Foreign key types beside a usable key are skipped, as in a cluster's JWKS.
    let mixed =
        json!({"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}, key]}).to_string();
    assert!(JwksVerifier::new(&mixed, LOCAL_ISSUER, DEFAULT_AUDIENCE).is_ok());
}

#[test]
fn subject_parsing() {
    assert_eq!(
        parse_subject("system:serviceaccount:demo:web"),
        Some(("demo", "web"))
    );
    for bad in [
        "system:serviceaccount:demo",
        "system:serviceaccount::web",
        "system:serviceaccount:demo:",
        "system:serviceaccount:demo:web:x",
        "system:serviceaccounts:demo:web",
        "demo:web",
    ] {
        assert_eq!(parse_subject(bad), None, "{bad}");
    }
}
