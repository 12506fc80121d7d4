//! The Key Vault data plane: the challenge, secrets and EC P-256 keys.
//!
//! Shapes follow the REST reference (api-version 2025-07-01, which the 1.0 SDK sends):
//! secret bundles `{value, id, contentType, attributes}`, key bundles `{key: JWK,
//! attributes}`, errors `{"error": {"code", "message"}}`. Names are checked as Key Vault
//! does (1–127 of `[0-9a-zA-Z-]`).

use base64::Engine as _;
use hyper::{Method, StatusCode};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{Value, json};

use super::http::{BASE64URL, Incoming, Reply, random_id, unix_now};
use super::{State, TENANT_ID, VAULT_RESOURCE, lock};

/// Operations Key Vault allows on EC keys.
const EC_OPERATIONS: [&str; 2] = ["sign", "verify"];

pub(super) struct SecretVersion {
    version: String,
    pub(super) value: String,
    content_type: Option<String>,
    created: u64,
}

pub(super) struct KeyVersion {
    version: String,
    kty: String,
    /// Stays here: no endpoint returns it.
    key: SigningKey,
    ops: Vec<String>,
    created: u64,
}

pub(super) fn handle(state: &State, request: Incoming) -> Reply {
    // Authentication first, as Key Vault does: without a token the stand-in issued, the
    // answer is the challenge naming the authority and the resource to get a token for.
    let token = request
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = token.is_some_and(|t| lock(&state.tokens).contains(t));
    if !valid {
        state.count("vault.challenge");
        let message = if token.is_some() {
            "AKV10032: Invalid token: it was not issued by this tenant's authority."
        } else {
            "AKV10000: Request is missing a Bearer or PoP token."
        };
        return error(StatusCode::UNAUTHORIZED, "Unauthorized", message).with_header(
            "www-authenticate",
            format!(
                "Bearer authorization=\"{}/{TENANT_ID}\", resource=\"{VAULT_RESOURCE}\"",
                state.authority
            ),
        );
    }
    if request
        .query_param("api-version")
        .is_none_or(|v| v.is_empty())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "The api-version query parameter is missing.",
        );
    }
    let segments = request.segments();
    let reply = match (&request.method, segments.as_slice()) {
        (&Method::GET, ["secrets", name]) => get_secret(state, name, None),
        (&Method::GET, ["secrets", name, version]) => get_secret(state, name, Some(version)),
        (&Method::PUT, ["secrets", name]) => set_secret(state, name, &request.body),
        (&Method::POST, ["keys", name, "create"]) => create_key(state, name, &request.body),
        (&Method::GET, ["keys", name]) => get_key(state, name, None),
        (&Method::GET, ["keys", name, version]) => get_key(state, name, Some(version)),
        (&Method::POST, ["keys", name, "sign"]) => sign(state, name, None, &request.body),
        (&Method::POST, ["keys", name, version, "sign"]) => {
            sign(state, name, Some(version), &request.body)
        }
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            &format!(
                "The stand-in does not serve {} {}.",
                request.method, request.path
            ),
        )),
    };
    reply.unwrap_or_else(|refused| refused)
}

/// Stores a new version of secret `name`.
pub(super) fn store_secret(
    state: &State,
    name: &str,
    value: &str,
    content_type: Option<String>,
) -> Value {
    let version = SecretVersion {
        version: random_id(),
        value: value.to_owned(),
        content_type,
        created: unix_now(),
    };
    let bundle = secret_bundle(state, name, &version);
    lock(&state.secrets)
        .entry(name.to_owned())
        .or_default()
        .push(version);
    bundle
}

fn get_secret(state: &State, name: &str, version: Option<&str>) -> Result<Reply, Reply> {
    state.count("secrets.get");
    check_name(name)?;
    let secrets = lock(&state.secrets);
    let found = secrets.get(name).and_then(|versions| match version {
        None => versions.last(),
        Some(v) => versions.iter().find(|s| s.version == v),
    });
    let Some(found) = found else {
        return Err(not_found("SecretNotFound", "secret", name, version));
    };
    Ok(Reply::json(
        StatusCode::OK,
        &secret_bundle(state, name, found),
    ))
}

fn set_secret(state: &State, name: &str, body: &[u8]) -> Result<Reply, Reply> {
    state.count("secrets.set");
    check_name(name)?;
    let body = json_body(body)?;
    let Some(value) = body.get("value").and_then(Value::as_str) else {
        return Err(bad_parameter("Secret value cannot be null."));
    };
    let content_type = body
        .get("contentType")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let bundle = store_secret(state, name, value, content_type);
    Ok(Reply::json(StatusCode::OK, &bundle))
}

fn secret_bundle(state: &State, name: &str, secret: &SecretVersion) -> Value {
    let mut bundle = json!({
        "value": secret.value,
        "id": format!("{}/secrets/{name}/{}", state.vault_base, secret.version),
        "attributes": attributes(secret.created, None),
        "tags": {},
    });
    if let Some(content_type) = &secret.content_type {
        bundle["contentType"] = json!(content_type);
    }
    bundle
}

fn create_key(state: &State, name: &str, body: &[u8]) -> Result<Reply, Reply> {
    state.count("keys.create");
    check_name(name)?;
    let body = json_body(body)?;
    let kty = body.get("kty").and_then(Value::as_str).unwrap_or_default();
    if kty != "EC" && kty != "EC-HSM" {
        return Err(bad_parameter(&format!(
            "The stand-in creates EC keys only, not {kty:?}."
        )));
    }
    let crv = body.get("crv").and_then(Value::as_str).unwrap_or("P-256");
    if crv != "P-256" {
        return Err(bad_parameter(&format!(
            "The stand-in creates P-256 keys only, not {crv:?}."
        )));
    }
    let ops: Vec<String> = match body.get("key_ops").and_then(Value::as_array) {
        None => EC_OPERATIONS.iter().map(|&op| op.to_owned()).collect(),
        Some(ops) => ops
            .iter()
            .map(|op| op.as_str().unwrap_or_default().to_owned())
            .collect(),
    };
    if let Some(op) = ops.iter().find(|op| !EC_OPERATIONS.contains(&op.as_str())) {
        return Err(bad_parameter(&format!(
            "Key operation {op:?} is not valid for an EC key."
        )));
    }
    if body["attributes"]["exportable"].as_bool() == Some(true) {
        return Err(bad_parameter("Exportable keys must have a release policy."));
    }
    let key = KeyVersion {
        version: random_id(),
        kty: kty.to_owned(),
        key: new_signing_key(),
        ops,
        created: unix_now(),
    };
    let bundle = key_bundle(state, name, &key);
    lock(&state.keys)
        .entry(name.to_owned())
        .or_default()
        .push(key);
    Ok(Reply::json(StatusCode::OK, &bundle))
}

fn get_key(state: &State, name: &str, version: Option<&str>) -> Result<Reply, Reply> {
    state.count("keys.get");
    check_name(name)?;
    let keys = lock(&state.keys);
    let key = find_key(&keys, name, version)?;
    Ok(Reply::json(StatusCode::OK, &key_bundle(state, name, key)))
}

fn sign(state: &State, name: &str, version: Option<&str>, body: &[u8]) -> Result<Reply, Reply> {
    state.count("keys.sign");
    check_name(name)?;
    let keys = lock(&state.keys);
    let key = find_key(&keys, name, version)?;
    if !key.ops.iter().any(|op| op == "sign") {
        return Err(Reply::json(
            StatusCode::FORBIDDEN,
            &json!({"error": {
                "code": "Forbidden",
                "message": "Operation sign is not permitted on this key.",
                "innererror": {"code": "KeyOperationForbidden"},
            }}),
        ));
    }
    let body = json_body(body)?;
    let alg = body.get("alg").and_then(Value::as_str).unwrap_or_default();
    if alg != "ES256" {
        return Err(bad_parameter(&format!(
            "Algorithm {alg:?} is not valid for a P-256 key; use ES256."
        )));
    }
    let digest = body
        .get("value")
        .and_then(Value::as_str)
        .and_then(|v| BASE64URL.decode(v).ok())
        .unwrap_or_default();
    if digest.len() != 32 {
        return Err(bad_parameter(&format!(
            "Invalid digest length {} for ES256: expected 32 bytes.",
            digest.len()
        )));
    }
    let signature: Signature = key
        .key
        .sign_prehash(&digest)
        .map_err(|e| bad_parameter(&format!("signing failed: {e}")))?;
    Ok(Reply::json(
        StatusCode::OK,
        &json!({
            "kid": kid(state, name, key),
            "value": BASE64URL.encode(signature.to_bytes()),
        }),
    ))
}

fn find_key<'a>(
    keys: &'a std::collections::BTreeMap<String, Vec<KeyVersion>>,
    name: &str,
    version: Option<&str>,
) -> Result<&'a KeyVersion, Reply> {
    keys.get(name)
        .and_then(|versions| match version {
            None => versions.last(),
            Some(v) => versions.iter().find(|k| k.version == v),
        })
        .ok_or_else(|| not_found("KeyNotFound", "key", name, version))
}

fn key_bundle(state: &State, name: &str, key: &KeyVersion) -> Value {
    let point = key.key.verifying_key().to_sec1_point(false);
    let coordinate = |c: Option<&p256::FieldBytes>| c.map(|c| BASE64URL.encode(c));
    json!({
        "key": {
            "kid": kid(state, name, key),
            "kty": key.kty,
            "crv": "P-256",
            "key_ops": key.ops,
            "x": coordinate(point.x()),
            "y": coordinate(point.y()),
        },
        "attributes": attributes(key.created, Some(false)),
        "tags": {},
    })
}

fn kid(state: &State, name: &str, key: &KeyVersion) -> String {
    format!("{}/keys/{name}/{}", state.vault_base, key.version)
}

fn attributes(created: u64, exportable: Option<bool>) -> Value {
    let mut attributes = json!({
        "enabled": true,
        "created": created,
        "updated": created,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
    });
    if let Some(exportable) = exportable {
        attributes["exportable"] = json!(exportable);
    }
    attributes
}

fn new_signing_key() -> SigningKey {
    // A random 32-byte string is a valid scalar unless it is zero or >= the group order
    // (probability ~2^-32); draw again then.
    loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(key) = SigningKey::from_slice(&bytes) {
            return key;
        }
    }
}

fn check_name(name: &str) -> Result<(), Reply> {
    let valid = (1..=127).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(bad_parameter(&format!(
            "The name {name:?} is invalid: 1-127 characters of 0-9, a-z, A-Z and -."
        )))
    }
}

fn json_body(body: &[u8]) -> Result<Value, Reply> {
    serde_json::from_slice(body).map_err(|e| bad_parameter(&format!("Invalid JSON body: {e}")))
}

fn not_found(code: &str, kind: &str, name: &str, version: Option<&str>) -> Reply {
    let id = match version {
        Some(version) => format!("{name}/{version}"),
        None => name.to_owned(),
    };
    error(
        StatusCode::NOT_FOUND,
        code,
        &format!(
            "A {kind} with (name/id) {id} was not found in this key vault. If you recently deleted this {kind} you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
    )
}

fn bad_parameter(message: &str) -> Reply {
    error(StatusCode::BAD_REQUEST, "BadParameter", message)
}

fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}
