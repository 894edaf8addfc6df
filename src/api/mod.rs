//! HTTP API v1 (see `docs/api.md` and the contract in ARCHITECTURE.md): the router, its
//! state, and what every route shares. Handlers are thin (extract and validate, call the
//! broker, shape the JSON) and live with their resource: `tasks`, `leases`, `approvals`,
//! `token` (RFC 8693), `introspection` (RFC 7662), `signals` (bulk revoke, anomaly
//! signals) and `discovery` (health, metrics, keys and metadata). `request_audit` is the
//! middleware that gives every `/v1` request its audit record.

mod approvals;
mod discovery;
pub mod error;
pub mod extract;
mod introspection;
mod leases;
pub mod openapi;
mod request_audit;
pub mod shed;
mod signals;
mod tasks;
pub mod tls;
mod token;
pub mod views;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

use crate::audit::{AuditEvent, AuditScope};
use crate::broker::Broker;
use crate::broker::token_exchange::PresentedProof;
use crate::identity::dpop::DpopError;
use crate::lease::Page;
use error::ApiError;

pub(crate) use approvals::ApprovalBody;
pub(crate) use introspection::IntrospectForm;
pub(crate) use signals::{BulkBody, SignalBody};
pub(crate) use token::TokenForm;
pub use token::{
    GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT,
};

#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl std::ops::Deref for AppState {
    type Target = AppStateInner;
    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// What every handler shares. Behind one `Arc`: axum clones the state for each
/// extractor and middleware of every request, and one reference count is cheaper than
/// one per field.
pub struct AppStateInner {
    pub broker: Arc<Broker>,
    pub max_body_bytes: usize,
    /// A body must arrive within this (also enforced before admission, see `shed`).
    pub body_read_timeout: std::time::Duration,
    /// Verifies `Authorization: Bearer` tokens and `/v1/token` subject tokens.
    pub bearer: Arc<crate::identity::bearer::BearerVerifier>,
    /// Unauthenticated refusals per source (rate limit).
    pub unauth: Arc<shed::SourceBuckets>,
    /// Unauthenticated refusals of the current summary interval.
    pub refusals: Arc<crate::audit::Refusals>,
}

impl AppState {
    /// The state with the edge's default limits (`[limits]` defaults).
    pub fn new(
        broker: Arc<Broker>,
        bearer: Arc<crate::identity::bearer::BearerVerifier>,
        max_body_bytes: usize,
    ) -> Self {
        Self::with_edge(
            broker,
            bearer,
            max_body_bytes,
            &crate::config::EdgeLimits::default(),
        )
    }

    pub fn with_edge(
        broker: Arc<Broker>,
        bearer: Arc<crate::identity::bearer::BearerVerifier>,
        max_body_bytes: usize,
        edge: &crate::config::EdgeLimits,
    ) -> Self {
        Self(Arc::new(AppStateInner {
            broker,
            max_body_bytes,
            body_read_timeout: edge.body_read_timeout,
            bearer,
            unauth: Arc::new(shed::SourceBuckets::new(
                edge.unauth_rate_per_source,
                edge.unauth_burst_per_source,
            )),
            refusals: Arc::new(crate::audit::Refusals::new()),
        }))
    }
}

type ApiResult = Result<Response, ApiError>;

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/tasks",
            post(tasks::declare_task).get(tasks::list_tasks),
        )
        .route("/v1/tasks/{id}", get(tasks::get_task))
        .route(
            "/v1/tasks/{id}/credentials",
            post(tasks::request_credential),
        )
        .route("/v1/tasks/{id}/complete", post(tasks::complete_task))
        .route("/v1/tasks/{id}/delegate", post(tasks::delegate_task))
        .route("/v1/tasks/{id}/revoke", post(tasks::revoke_task))
        .route("/v1/leases", get(leases::list_leases))
        .route("/v1/leases/{id}", get(leases::get_lease))
        .route("/v1/leases/{id}/revoke", post(leases::revoke_lease))
        .route("/v1/revoke", post(signals::bulk_revoke))
        .route("/v1/signals", post(signals::signal))
        .route("/v1/approvals", get(approvals::list_approvals))
        .route(
            "/v1/approvals/{id}",
            post(approvals::decide_approval).get(approvals::collect_approval),
        )
        .route("/v1/introspect", post(introspection::introspect))
        .route(token::ROUTE, post(token::token_exchange))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            request_audit::audit_request,
        ));
    Router::new()
        .route("/healthz", get(discovery::healthz))
        .route("/readyz", get(discovery::readyz))
        .route("/metrics", get(discovery::metrics_text))
        .route("/.well-known/jwks.json", get(discovery::jwks))
        .route("/openapi.json", get(|| async { Json(openapi::spec()) }))
        .route(
            "/.well-known/openid-configuration",
            get(discovery::discovery),
        )
        .route(
            "/.well-known/oauth-authorization-server",
            get(discovery::authorization_server_metadata),
        )
        .merge(v1)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

fn audit_scope(req_ext: &Option<axum::Extension<AuditScope>>) -> AuditScope {
    req_ext
        .as_ref()
        .map(|e| e.0.clone())
        .unwrap_or_else(|| AuditScope::new(AuditEvent::new("request")))
}

type Ev = Option<axum::Extension<AuditScope>>;

fn parse_id<T: std::str::FromStr>(raw: &str, what: &'static str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::BadId(what))
}

/// A list filter's `state`, one of `what`'s states.
fn state_param<T: std::str::FromStr<Err = ()>>(
    raw: Option<&str>,
    what: &str,
) -> Result<Option<T>, ApiError> {
    raw.map(|s| {
        s.parse()
            .map_err(|()| ApiError::Query(format!("unknown {what} state {s:?}")))
    })
    .transpose()
}

/// An id given as a list filter or an `after` cursor.
fn cursor<T: std::str::FromStr>(
    raw: Option<&str>,
    what: &'static str,
) -> Result<Option<T>, ApiError> {
    raw.map(|a| parse_id(a, what)).transpose()
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn page_json<T>(p: &Page<T>, f: impl Fn(&T) -> Value) -> Value {
    json!({"items": p.items.iter().map(f).collect::<Vec<_>>(), "next": p.next})
}

fn page_limit(st: &AppState, limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(100.min(st.broker.max_page())),
        Some(n) if (1..=st.broker.max_page()).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::Query(format!(
            "limit must be 1..={}",
            st.broker.max_page()
        ))),
    }
}

/// The request's DPoP proof (RFC 9449) as presented, for the broker to check against
/// this request (method, Mayfly's public URL for `path`, the bearer token it carries).
fn presented_proof(headers: &HeaderMap, method: &'static str, path: &str) -> PresentedProof {
    let access_token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_string());
    PresentedProof {
        header: dpop_header(headers),
        method,
        path: path.to_string(),
        access_token,
    }
}

/// The one `DPoP` header a request may carry.
fn dpop_header(headers: &HeaderMap) -> Result<Option<String>, DpopError> {
    let mut all = headers.get_all("dpop").iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    let more = all.count();
    if more > 0 {
        return Err(DpopError::MultipleProofs(more + 1));
    }
    first
        .to_str()
        .map(|p| Some(p.to_string()))
        .map_err(|_| DpopError::Malformed("the header is not ASCII"))
}

/// Announces the current server nonce (`DPoP-Nonce`) when nonces are required.
fn with_dpop_nonce(st: &AppState, mut resp: Response) -> Response {
    if let Some(n) = st.broker.dpop_nonce(time::OffsetDateTime::now_utc())
        && let Ok(v) = HeaderValue::from_str(&n)
    {
        resp.headers_mut().insert("dpop-nonce", v);
    }
    resp
}

/// A minted credential's answer, serialised straight from the lease (no intermediate
/// `Value`). Field order is the documented one.
#[derive(serde::Serialize)]
struct IssuedBody<'a> {
    lease_id: &'a crate::task::LeaseId,
    task_id: &'a crate::task::TaskId,
    provider: &'a crate::task::ProviderKind,
    target: &'a str,
    expires_at: String,
    credential: &'a Value,
}

fn outcome_response(outcome: crate::broker::Outcome) -> Response {
    match outcome {
        crate::broker::Outcome::Issued(issued) => {
            let l = &issued.lease;
            let body = IssuedBody {
                lease_id: &l.id,
                task_id: &l.task_id,
                provider: &l.provider,
                target: &l.target,
                expires_at: crate::api_time(l.expires_at),
                credential: issued.credential.expose(),
            };
            (StatusCode::CREATED, Json(body)).into_response()
        }
        crate::broker::Outcome::Pending(a) => (
            StatusCode::ACCEPTED,
            [(
                axum::http::header::LOCATION,
                format!("/v1/approvals/{}", a.id),
            )],
            Json(approvals::approval_json(&a)),
        )
            .into_response(),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeBody {
    pub(crate) reason: String,
}
