//! `POST /v1/token`: RFC 8693 token exchange for CI. The handler parses the form; the
//! broker verifies the subject token, authorizes, finds or declares the job's implicit
//! task and issues (`broker::token_exchange`). Errors are RFC 6749 §5.2 JSON.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use super::error::{ApiError, OAuthError};
use super::extract::{ConnInfo, FormBody};
use super::{AppState, Ev, audit_scope, presented_proof, with_dpop_nonce};
use crate::broker::token_exchange::{ExchangeError, PresentedProof, TokenExchange};
use crate::broker::{BrokerError, Issued, Outcome};

/// The route: its caller is its subject token, not the transport (see `request_audit`).
pub(super) const ROUTE: &str = "/v1/token";

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// RFC 8693 request parameters (RFC 6749: each at most once, except RFC 8707's
/// `resource`, which may repeat).
#[derive(Deserialize, utoipa::ToSchema, Default)]
pub(crate) struct TokenForm {
    pub(crate) grant_type: Option<String>,
    pub(crate) subject_token: Option<String>,
    pub(crate) subject_token_type: Option<String>,
    pub(crate) resource: Vec<String>,
    pub(crate) audience: Option<String>,
    pub(crate) scope: Option<String>,
    pub(crate) requested_token_type: Option<String>,
    pub(crate) actor_token: Option<String>,
}

/// `POST /v1/token`: RFC 8693 token exchange for CI. The subject token (an OIDC
/// workload token or JWT-SVID) is the caller's proof; no client certificate is needed.
/// Errors are RFC 6749 §5.2 JSON.
pub(super) async fn token_exchange(
    State(st): State<AppState>,
    ev: Ev,
    conn: Option<axum::Extension<Arc<ConnInfo>>>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<FormBody<Vec<(String, String)>>, ApiError>,
) -> Response {
    let result = async {
        let FormBody(pairs) = form?;
        let proof = presented_proof(&headers, "POST", uri.path());
        let mut exchange = parse_exchange(token_form(pairs)?, proof)?;
        exchange.source = conn.map(|c| c.0.peer.ip());
        let outcome = st
            .broker
            .token_exchange(&st.bearer, exchange, &audit_scope(&ev))
            .await
            .map_err(ApiError::from)?;
        match outcome {
            Outcome::Issued(issued) => Ok(token_response(&issued)),
            // RFC 8693 has no asynchronous answer: the job may retry after approval (the
            // implicit task is reused), as with RFC 8628's polling error.
            Outcome::Pending(a) => Err(OAuthError::authorization_pending(&a.id)),
        }
    }
    .await;
    with_dpop_nonce(&st, result.unwrap_or_else(IntoResponse::into_response))
}

impl From<ExchangeError> for ApiError {
    fn from(e: ExchangeError) -> Self {
        match e {
            ExchangeError::SubjectToken(e) => ApiError::Verify(e),
            ExchangeError::Dpop(e) => ApiError::Dpop(e),
            ExchangeError::Broker(e) => ApiError::from(e),
        }
    }
}

/// The form's parameters, each at most once (RFC 6749 §3.2) except `resource`
/// (RFC 8707 §2); unknown parameters are ignored (RFC 6749 §3.2).
fn token_form(pairs: Vec<(String, String)>) -> Result<TokenForm, OAuthError> {
    let mut f = TokenForm::default();
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "resource" => {
                f.resource.push(v);
                continue;
            }
            "grant_type" => &mut f.grant_type,
            "subject_token" => &mut f.subject_token,
            "subject_token_type" => &mut f.subject_token_type,
            "audience" => &mut f.audience,
            "scope" => &mut f.scope,
            "requested_token_type" => &mut f.requested_token_type,
            "actor_token" => &mut f.actor_token,
            _ => continue,
        };
        if slot.replace(v).is_some() {
            return Err(OAuthError::invalid_request(format!(
                "parameter {k} appears more than once"
            )));
        }
    }
    Ok(f)
}

/// The exchange the form asks for (RFC 8693 §2.1, RFC 8707), checked in the order a
/// client's mistakes are reported; the subject token is verified by the broker.
fn parse_exchange(f: TokenForm, proof: PresentedProof) -> Result<TokenExchange, OAuthError> {
    if f.grant_type.as_deref() != Some(GRANT_TOKEN_EXCHANGE) {
        return Err(OAuthError::unsupported_grant_type());
    }
    let subject_token = f
        .subject_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("subject_token is required"))?;
    check_token_types(
        &f.subject_token_type,
        &f.actor_token,
        &f.requested_token_type,
    )?;
    let (target, resources) = target_of(f.resource, f.audience)?;
    let actions: Vec<String> = f
        .scope
        .as_deref()
        .unwrap_or_default()
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if actions.is_empty() {
        return Err(OAuthError::invalid_request(
            "scope is required: the actions the credential may perform",
        ));
    }
    Ok(TokenExchange {
        subject_token,
        source: None,
        target,
        resources,
        actions,
        proof,
    })
}

/// A subject token Mayfly reads, no actor token (no delegation here), and a token type
/// Mayfly issues.
fn check_token_types(
    subject: &Option<String>,
    actor: &Option<String>,
    requested: &Option<String>,
) -> Result<(), OAuthError> {
    match subject.as_deref() {
        Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ID_TOKEN) => {}
        _ => {
            return Err(OAuthError::invalid_request(format!(
                "subject_token_type must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID_TOKEN}"
            )));
        }
    }
    if actor.is_some() {
        return Err(OAuthError::invalid_request(
            "actor_token (delegation) is not supported here",
        ));
    }
    match requested.as_deref() {
        None | Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ACCESS_TOKEN) => Ok(()),
        Some(other) => Err(OAuthError::invalid_request(format!(
            "requested_token_type {other:?} is not issued; Mayfly issues {TOKEN_TYPE_JWT}"
        ))),
    }
}

/// RFC 8707: each resource an absolute URI without fragment (else invalid_target);
/// together they are the token's audience. `audience` (RFC 8693) names one target.
fn target_of(
    resource: Vec<String>,
    audience: Option<String>,
) -> Result<(String, Vec<String>), OAuthError> {
    let resources =
        crate::task::check_resources(resource).map_err(|e| ApiError::from(BrokerError::from(e)))?;
    match (resources.split_first(), audience) {
        (Some((first, _)), None) => Ok((first.clone(), resources.clone())),
        (None, Some(a)) => Ok((a, Vec::new())),
        (Some((first, rest)), Some(a)) if rest.is_empty() && *first == a => Ok((a, resources)),
        (Some(_), Some(_)) => Err(OAuthError::invalid_request(
            "give one target: resource and audience differ",
        )),
        (None, None) => Err(OAuthError::invalid_request(
            "resource or audience is required",
        )),
    }
}

/// RFC 8693 §2.2.1: the issued token, its type, life and scope, and the task and lease
/// Mayfly holds it under.
fn token_response(issued: &Issued) -> Response {
    let l = &issued.lease;
    let cred = issued.credential.expose();
    let expires_in = (l.expires_at - time::OffsetDateTime::now_utc())
        .whole_seconds()
        .max(0);
    let body = json!({
        "access_token": cred["access_token"],
        "issued_token_type": TOKEN_TYPE_JWT,
        "token_type": cred["token_type"],
        "expires_in": expires_in,
        "scope": l.actions.iter().cloned().collect::<Vec<_>>().join(" "),
        "mayfly_task_id": l.task_id,
        "mayfly_lease_id": l.id,
    });
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}
