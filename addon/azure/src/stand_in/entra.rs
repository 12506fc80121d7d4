//! The Entra ID token endpoint, as `WorkloadIdentityCredential` uses it: the
//! client-credentials grant with a federated client assertion
//! (`POST /{tenant}/oauth2/v2.0/token`, form-encoded). azure_identity 1.0 calls nothing else
//! (no instance discovery, no metadata).

use hyper::{Method, StatusCode};
use serde_json::json;

use super::http::{Incoming, Reply, parse_form, random_id};
use super::{CLIENT_ID, State, TENANT_ID, lock};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of issued tokens, as Entra ID reports it.
const EXPIRES_IN: u64 = 3599;

pub(super) fn handle(state: &State, request: Incoming) -> Reply {
    let segments = request.segments();
    match (&request.method, segments.as_slice()) {
        (&Method::POST, [tenant, "oauth2", "v2.0", "token"]) => token(state, tenant, &request),
        _ => {
            state.count("entra.rejected");
            aadsts(
                StatusCode::NOT_FOUND,
                "invalid_request",
                90_010,
                "The request is not supported by this endpoint.",
            )
        }
    }
}

fn token(state: &State, tenant: &str, request: &Incoming) -> Reply {
    let reject = |status, error, code, message: &str| {
        state.count("entra.rejected");
        aadsts(status, error, code, message)
    };
    if tenant != TENANT_ID {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            90_002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    let form = parse_form(&request.body);
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return reject(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70_003,
            "The app requested an unsupported grant type.",
        );
    }
    if field("client_assertion_type") != Some(JWT_BEARER) {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90_014,
            "The required field 'client_assertion_type' is missing or invalid.",
        );
    }
    let client_id = field("client_id").unwrap_or_default();
    if client_id != CLIENT_ID {
        return reject(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700_016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'."
            ),
        );
    }
    // The assertion is a credential: never echoed back.
    if field("client_assertion") != Some(state.federated_token.as_str()) {
        return reject(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            70_021,
            "No matching federated identity record found for presented assertion.",
        );
    }
    if !field("scope").is_some_and(|scope| scope.ends_with("/.default")) {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1_002_012,
            "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
        );
    }
    let access_token = format!("stand-in-access-{}{}", random_id(), random_id());
    lock(&state.tokens).insert(access_token.clone());
    state.count("entra.token");
    Reply::json(
        StatusCode::OK,
        &json!({
            "token_type": "Bearer",
            "expires_in": EXPIRES_IN,
            "ext_expires_in": EXPIRES_IN,
            "access_token": access_token,
        }),
    )
}

/// An Entra ID error body: `error`, an `AADSTS<code>:` description and `error_codes`.
fn aadsts(status: StatusCode, error: &str, code: u32, message: &str) -> Reply {
    let trace_id = random_id();
    Reply::json(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {message} Trace ID: {trace_id}"),
            "error_codes": [code],
            "trace_id": trace_id,
            "correlation_id": random_id(),
        }),
    )
}
