//! What needs no credential: health, readiness, metrics, and the documents that let a
//! client or resource server find Mayfly's keys and endpoints (OIDC discovery, RFC 8414
//! metadata, the JWKS).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::token::GRANT_TOKEN_EXCHANGE;

pub(super) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Prometheus text format. No client certificate needed (like `/healthz`): the series
/// carry counts and latencies, never identities' secrets.
pub(super) async fn metrics_text() -> Response {
    match crate::metrics::handle() {
        Some(h) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            h.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

pub(super) async fn readyz(State(st): State<AppState>) -> Response {
    match st.broker.ready().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable"})),
            )
                .into_response()
        }
    }
}

pub(super) async fn jwks(State(st): State<AppState>) -> Response {
    Json(st.broker.jwks()).into_response()
}

pub(super) async fn discovery(State(st): State<AppState>) -> Response {
    let iss = st.broker.issuer();
    Json(json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "introspection_endpoint": format!("{iss}/v1/introspect"),
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "access_token_signing_alg_values_supported": st.broker.signing_algorithms(),
    }))
    .into_response()
}

/// RFC 8414 authorization server metadata: what a resource server (an MCP server) or a
/// client needs to use Mayfly as its authorization server. Mayfly has no authorization
/// endpoint (no browser flows): its one grant is token exchange, so
/// `response_types_supported` is empty and `authorization_endpoint` is absent (RFC 8414
/// §2 requires it only when a grant type uses it).
pub(super) async fn authorization_server_metadata(State(st): State<AppState>) -> Response {
    let iss = st.broker.issuer();
    let mut resp = Json(json!({
        "issuer": iss,
        "token_endpoint": format!("{iss}/v1/token"),
        "token_endpoint_auth_methods_supported": ["none", "tls_client_auth"],
        "introspection_endpoint": format!("{iss}/v1/introspect"),
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "grant_types_supported": [GRANT_TOKEN_EXCHANGE],
        "response_types_supported": [],
        "dpop_signing_alg_values_supported": crate::identity::dpop::ALGORITHMS,
        "tls_client_certificate_bound_access_tokens": true,
        "access_token_signing_alg_values_supported": st.broker.signing_algorithms(),
    }))
    .into_response();
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    resp
}
