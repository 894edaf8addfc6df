//! HTTP API v1 (see `docs/api.md` and the contract in ARCHITECTURE.md).
//! Handlers are thin: extract and validate, call the broker, shape the JSON.

pub mod error;
pub mod extract;
pub mod openapi;
pub mod shed;
pub mod tls;
pub mod views;

use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use uuid::Uuid;

use crate::audit::{AuditEvent, AuditScope};
use crate::broker::{Broker, Introspection};
use crate::lease::{Lease, LeaseQuery, LeaseState, Page, TaskQuery};
use crate::task::{
    CredentialRequest, LeaseId, ProviderKind, RawCredentialRequest, RawTaskRequest, Task, TaskId,
    TaskRequest, TaskState,
};
use error::{ApiError, ErrorCode, OAuthError};
use extract::{Caller, ConnInfo, FormBody, JsonBody, ResolvedCaller, resolve_caller};

#[derive(Clone)]
pub struct AppState {
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
        Self {
            broker,
            max_body_bytes,
            body_read_timeout: edge.body_read_timeout,
            bearer,
            unauth: Arc::new(shed::SourceBuckets::new(
                edge.unauth_rate_per_source,
                edge.unauth_burst_per_source,
            )),
            refusals: Arc::new(crate::audit::Refusals::new()),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/tasks", post(declare_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/credentials", post(request_credential))
        .route("/v1/tasks/{id}/complete", post(complete_task))
        .route("/v1/tasks/{id}/delegate", post(delegate_task))
        .route("/v1/tasks/{id}/revoke", post(revoke_task))
        .route("/v1/leases", get(list_leases))
        .route("/v1/leases/{id}", get(get_lease))
        .route("/v1/leases/{id}/revoke", post(revoke_lease))
        .route("/v1/revoke", post(bulk_revoke))
        .route("/v1/signals", post(signal))
        .route("/v1/approvals", get(list_approvals))
        .route(
            "/v1/approvals/{id}",
            post(decide_approval).get(collect_approval),
        )
        .route("/v1/introspect", post(introspect))
        .route("/v1/token", post(token_exchange))
        .route_layer(middleware::from_fn_with_state(state.clone(), audit_request));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/openapi.json", get(|| async { Json(openapi::spec()) }))
        .route("/.well-known/openid-configuration", get(discovery))
        .route(
            "/.well-known/oauth-authorization-server",
            get(authorization_server_metadata),
        )
        .merge(v1)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

/// One audit record per `/v1` request, on every exit path: opened here, filled in by
/// the broker, written before the response leaves. If it cannot be written, the request
/// fails — and a credential minted for it is revoked, never handed out.
///
/// Unauthenticated refusals are the exception that keeps a flood of junk cheap: the
/// first of each source and code per summary interval is written (capped), the rest are
/// counted into a `refusals.summary` record, and each one charges its source's bucket.
/// A source with an empty bucket has its requests without a verified client
/// certificate refused before any token is verified.
async fn audit_request(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id = Uuid::new_v4().simple().to_string();
    let mut ev = AuditEvent::new("request");
    ev.request_id = Some(request_id.clone());
    ev.method = Some(req.method().to_string());
    ev.route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let conn = req.extensions().get::<Arc<ConnInfo>>().cloned();
    let source_ip = conn.as_ref().map(|c| c.peer.ip());
    ev.source = source_ip.map(|ip| ip.to_string());
    let mut single_use = None;
    let route = ev.route.clone().unwrap_or_default();
    let method = ev.method.clone().unwrap_or_default();
    let cert_verified = conn.as_ref().is_some_and(|c| c.identity.is_ok());
    let limited = !cert_verified && source_ip.is_some_and(|ip| st.unauth.exhausted(ip));

    let started = std::time::Instant::now();
    let scope;
    let mut resp = if limited {
        ev.detail = Some("unauthenticated requests from this source are rate-limited".into());
        scope = AuditScope::new(ev);
        metrics::counter!("mayfly_unauthenticated_rate_limited_total").increment(1);
        if route == "/v1/token" {
            OAuthError::from(ApiError::UnauthenticatedRateLimited).into_response()
        } else {
            ApiError::UnauthenticatedRateLimited.into_response()
        }
    } else {
        let resolved = resolve_caller(req.extensions(), req.headers(), &st.bearer).await;
        match &resolved {
            Ok(c) => {
                ev.principal = Some(c.principal().to_string());
                ev.auth_method = Some(c.method().as_str());
                ev.credential_not_after = Some(crate::api_time(c.posture().credential_not_after));
            }
            Err(e) => ev.detail = Some(format!("identity: {e}")),
        }
        single_use = resolved.as_ref().ok().and_then(|c| c.single_use().cloned());
        req.extensions_mut().insert(ResolvedCaller(resolved));
        scope = AuditScope::new(ev);
        req.extensions_mut().insert(scope.clone());
        // Every log line of this request carries its id (and the audit record has the same).
        let span = tracing::info_span!("request", request_id = %request_id, route = %route);
        tracing::Instrument::instrument(next.run(req), span).await
    };
    metrics::histogram!("mayfly_request_duration_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    // A single-use token is consumed by the broker once authorized; a route that
    // succeeded without consuming it (reads, completions) consumes it now, before the
    // answer leaves: a replay is refused on every route.
    if let Some(su) = single_use
        && resp.status().is_success()
        && !su.is_spent()
        && let Err(e) = st.broker.consume(&su).await
    {
        let err = ApiError::Broker(e);
        resp = if route == "/v1/token" {
            OAuthError::from(err).into_response()
        } else {
            err.into_response()
        };
    }

    let status = resp.status();
    let code = resp.extensions().get::<ErrorCode>().map(|c| c.0);
    scope.set(|e| {
        e.status = Some(status.as_u16());
        e.code = code;
        if status.is_success() {
            e.decision.get_or_insert("allow");
        } else if status.is_server_error() {
            e.decision = Some("error");
        } else {
            e.decision = Some("deny");
        }
    });
    let event = scope.snapshot();
    let unauthenticated_refusal = event.principal.is_none() && status.is_client_error();
    let write_full = if unauthenticated_refusal {
        if let Some(ip) = source_ip {
            st.unauth.charge(ip);
        }
        metrics::counter!("mayfly_unauthenticated_refusals_total").increment(1);
        st.refusals.observe(
            event.source.as_deref().unwrap_or("unknown"),
            code.unwrap_or("refused"),
            event.route.as_deref(),
        )
    } else {
        true
    };
    if write_full && let Err(err) = st.broker.commit(&scope).await {
        resp = if route == "/v1/token" {
            OAuthError::from(ApiError::Audit(err)).into_response()
        } else {
            ApiError::Audit(err).into_response()
        };
    }
    metrics::counter!(
        "mayfly_requests_total",
        "route" => route,
        "method" => method,
        "status" => resp.status().as_u16().to_string(),
        "code" => resp.extensions().get::<ErrorCode>().map_or("", |c| c.0),
    )
    .increment(1);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    // Credentials (minted, exchanged, introspected) must never sit in a cache; no /v1
    // answer is worth caching.
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
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

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn lease_json(l: &Lease) -> Value {
    to_json(&views::LeaseView::from(l))
}

fn task_json(t: &Task, leases: Option<&[Lease]>) -> Value {
    to_json(&views::TaskView::new(t, leases))
}

fn page_json<T>(p: &Page<T>, f: impl Fn(&T) -> Value) -> Value {
    json!({"items": p.items.iter().map(f).collect::<Vec<_>>(), "next": p.next})
}

/// Prometheus text format. No client certificate needed (like `/healthz`): the series
/// carry counts and latencies, never identities' secrets.
async fn metrics_text() -> Response {
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

async fn readyz(State(st): State<AppState>) -> Response {
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

async fn jwks(State(st): State<AppState>) -> Response {
    Json(st.broker.jwks()).into_response()
}

async fn discovery(State(st): State<AppState>) -> Response {
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
async fn authorization_server_metadata(State(st): State<AppState>) -> Response {
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

async fn declare_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    JsonBody(raw): JsonBody<RawTaskRequest>,
) -> ApiResult {
    let req = TaskRequest::try_from(raw).map_err(crate::broker::BrokerError::from)?;
    let task = st
        .broker
        .declare_task(&caller, req, &audit_scope(&ev))
        .await?;
    Ok((StatusCode::CREATED, Json(task_json(&task, None))).into_response())
}

async fn get_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let (task, leases) = st.broker.task_view(&caller, &id, &audit_scope(&ev)).await?;
    Ok(Json(task_json(&task, Some(&leases))).into_response())
}

async fn request_credential(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    JsonBody(raw): JsonBody<RawCredentialRequest>,
) -> Response {
    let result = async {
        let id: TaskId = parse_id(&id, "task")?;
        let mut req = CredentialRequest::try_from(raw).map_err(crate::broker::BrokerError::from)?;
        req.dpop_jkt = dpop_proof(&st, &headers, "POST", uri.path()).await?;
        let outcome = st
            .broker
            .request_credential(&caller, &id, req, &audit_scope(&ev))
            .await?;
        Ok::<_, ApiError>(outcome_response(outcome))
    }
    .await;
    with_dpop_nonce(&st, result.unwrap_or_else(IntoResponse::into_response))
}

/// The request's DPoP proof (RFC 9449), checked against this request (method, Mayfly's
/// public URL for `path`, the bearer token it carries) and consumed: the thumbprint of
/// the key it proves, or `None` when the request carries no proof.
async fn dpop_proof(
    st: &AppState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
) -> Result<Option<String>, ApiError> {
    use crate::identity::dpop::{DpopError, ProofContext};
    let mut all = headers.get_all("dpop").iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    let more = all.count();
    if more > 0 {
        return Err(DpopError::MultipleProofs(more + 1).into());
    }
    let proof = first
        .to_str()
        .map_err(|_| DpopError::Malformed("the header is not ASCII"))?;
    let access_token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let url = format!("{}{path}", st.broker.issuer());
    let ctx = ProofContext {
        method,
        url: &url,
        access_token,
        now: time::OffsetDateTime::now_utc(),
    };
    let proof = st.broker.verify_dpop(proof, ctx).await?;
    Ok(Some(proof.jkt))
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

fn outcome_response(outcome: crate::broker::Outcome) -> Response {
    match outcome {
        crate::broker::Outcome::Issued(issued) => {
            let l = &issued.lease;
            let body = json!({
                "lease_id": l.id,
                "task_id": l.task_id,
                "provider": l.provider,
                "target": l.target,
                "expires_at": crate::api_time(l.expires_at),
                "credential": issued.credential.expose(),
            });
            (StatusCode::CREATED, Json(body)).into_response()
        }
        crate::broker::Outcome::Pending(a) => (
            StatusCode::ACCEPTED,
            [(
                axum::http::header::LOCATION,
                format!("/v1/approvals/{}", a.id),
            )],
            Json(approval_json(&a)),
        )
            .into_response(),
    }
}

fn approval_json(a: &crate::broker::Approval) -> Value {
    to_json(&views::ApprovalView::from(a))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApprovalBody {
    pub(crate) decision: String,
    pub(crate) reason: String,
}

async fn decide_approval(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ApprovalBody>,
) -> ApiResult {
    let decision = crate::broker::ApprovalDecision::parse(&body.decision)?;
    let a = st
        .broker
        .decide_approval(&caller, &id, decision, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(approval_json(&a)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalParams {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/approvals?state=pending` (operators): the approvals every replica shares.
async fn list_approvals(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    params: Result<Query<ApprovalParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::Query(e.body_text()))?;
    let state = p
        .state
        .as_deref()
        .map(|s| {
            s.parse::<crate::approval::ApprovalState>()
                .map_err(|()| ApiError::Query(format!("unknown approval state {s:?}")))
        })
        .transpose()?;
    let limit = page_limit(&st, p.limit)?;
    let items = st
        .broker
        .approvals(&caller, state, limit, &audit_scope(&ev))
        .await?;
    let views: Vec<views::ApprovalView> = items.iter().map(views::ApprovalView::from).collect();
    Ok(Json(to_json(&views::ApprovalList { items: views })).into_response())
}

async fn collect_approval(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let outcome = st
        .broker
        .collect_approval(&caller, &id, &audit_scope(&ev))
        .await?;
    Ok(outcome_response(outcome))
}

async fn delegate_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(raw): JsonBody<crate::task::RawDelegateRequest>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let req =
        crate::task::DelegateRequest::try_from(raw).map_err(crate::broker::BrokerError::from)?;
    let child = st
        .broker
        .delegate_task(&caller, &id, req, &audit_scope(&ev))
        .await?;
    Ok((StatusCode::CREATED, Json(task_json(&child, None))).into_response())
}

async fn complete_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let out = st
        .broker
        .complete_task(&caller, &id, &audit_scope(&ev))
        .await?;
    Ok(Json(json!({
        "task_id": id,
        "state": "completed",
        "revoked": out.leases.len(),
        "revoked_leases": out.leases,
        "tasks": out.tasks,
    }))
    .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeBody {
    pub(crate) reason: String,
}

async fn revoke_task(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RevokeBody>,
) -> ApiResult {
    let id: TaskId = parse_id(&id, "task")?;
    let out = st
        .broker
        .revoke_task(&caller, &id, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(json!({
        "task_id": id,
        "state": "revoked",
        "revoked": out.leases.len(),
        "revoked_leases": out.leases,
        "tasks": out.tasks,
    }))
    .into_response())
}

async fn revoke_lease(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RevokeBody>,
) -> ApiResult {
    let id: LeaseId = parse_id(&id, "lease")?;
    let lease = st
        .broker
        .revoke_lease(&caller, &id, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(lease_json(&lease)).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkBody {
    pub(crate) principal: Option<String>,
    pub(crate) provider: Option<String>,
    pub(crate) target_prefix: Option<String>,
    pub(crate) reason: String,
}

async fn bulk_revoke(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<BulkBody>,
) -> ApiResult {
    use crate::broker::{BrokerError, BulkSelector};
    let sel = match (body.principal, body.provider, body.target_prefix) {
        (Some(p), None, None) if !p.is_empty() => BulkSelector::Principal(p),
        (None, Some(p), None) => {
            BulkSelector::Provider(p.parse::<ProviderKind>().map_err(BrokerError::from)?)
        }
        (None, None, Some(t)) if !t.is_empty() => BulkSelector::TargetPrefix(t),
        _ => return Err(BrokerError::Selector.into()),
    };
    let out = st
        .broker
        .bulk_revoke(&caller, sel, &body.reason, &audit_scope(&ev))
        .await?;
    Ok(Json(json!({
        "revoked": out.leases.len(),
        "revoked_leases": out.leases,
        "tasks": out.tasks,
    }))
    .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignalBody {
    pub(crate) task_id: Option<String>,
    pub(crate) principal: Option<String>,
    pub(crate) kind: String,
    pub(crate) severity: String,
    #[serde(default)]
    pub(crate) detail: String,
}

async fn signal(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<SignalBody>,
) -> ApiResult {
    use crate::broker::BrokerError;
    let task = body
        .task_id
        .as_deref()
        .map(|t| parse_id(t, "task"))
        .transpose()?;
    let principal = body
        .principal
        .as_deref()
        .map(crate::identity::Principal::parse)
        .transpose()
        .map_err(|_| BrokerError::SignalTarget)?;
    let bad_kind = body.kind.is_empty()
        || body.kind.len() > 64
        || !body.kind.bytes().all(|b| b.is_ascii_graphic());
    if bad_kind || body.detail.len() > 1024 {
        return Err(BrokerError::SignalTarget.into());
    }
    let severity = body
        .severity
        .parse()
        .map_err(|e: String| ApiError::Query(e))?;
    let sig = crate::broker::ExternalSignal {
        task,
        principal,
        kind: body.kind,
        severity,
        detail: body.detail,
    };
    let fired = st.broker.signal(&caller, sig, &audit_scope(&ev)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "accepted": true,
            "fired": fired.iter().map(|v| json!({
                "rule": v.rule,
                "action": v.action.as_str(),
                "enforced": v.mode == crate::anomaly::Mode::Enforce,
            })).collect::<Vec<_>>(),
        })),
    )
        .into_response())
}

async fn get_lease(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult {
    let id: LeaseId = parse_id(&id, "lease")?;
    let lease = st.broker.lease(&caller, &id, &audit_scope(&ev)).await?;
    Ok(Json(lease_json(&lease)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseParams {
    task: Option<String>,
    principal: Option<String>,
    provider: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
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

async fn list_leases(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    params: Result<Query<LeaseParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::Query(e.body_text()))?;
    let q = LeaseQuery {
        task: p.task.as_deref().map(|t| parse_id(t, "task")).transpose()?,
        principal: p.principal,
        provider: p
            .provider
            .as_deref()
            .map(|s| {
                s.parse::<ProviderKind>()
                    .map_err(|e| ApiError::Query(e.to_string()))
            })
            .transpose()?,
        state: p
            .state
            .as_deref()
            .map(|s| {
                s.parse::<LeaseState>()
                    .map_err(|()| ApiError::Query(format!("unknown lease state {s:?}")))
            })
            .transpose()?,
        after: p
            .after
            .as_deref()
            .map(|a| parse_id(a, "lease"))
            .transpose()?,
        limit: page_limit(&st, p.limit)?,
    };
    let page = st.broker.leases(&caller, q, &audit_scope(&ev)).await?;
    Ok(Json(page_json(&page, lease_json)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskParams {
    principal: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_tasks(
    State(st): State<AppState>,
    ev: Ev,
    Caller(caller): Caller,
    params: Result<Query<TaskParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(p) = params.map_err(|e| ApiError::Query(e.body_text()))?;
    let q = TaskQuery {
        principal: p.principal,
        state: p
            .state
            .as_deref()
            .map(|s| {
                s.parse::<TaskState>()
                    .map_err(|()| ApiError::Query(format!("unknown task state {s:?}")))
            })
            .transpose()?,
        after: p
            .after
            .as_deref()
            .map(|a| parse_id(a, "task"))
            .transpose()?,
        limit: page_limit(&st, p.limit)?,
        now: None,
    };
    let page = st.broker.tasks(&caller, q, &audit_scope(&ev)).await?;
    Ok(Json(page_json(&page, |t| task_json(t, None))).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct IntrospectForm {
    pub(crate) token: String,
    #[allow(
        dead_code,
        reason = "RFC 7662 allows the hint; Mayfly has one token type"
    )]
    pub(crate) token_type_hint: Option<String>,
}

/// RFC 7662. The caller must hold a valid SVID (resource servers authenticate too).
async fn introspect(
    State(st): State<AppState>,
    ev: Ev,
    Caller(_caller): Caller,
    FormBody(form): FormBody<IntrospectForm>,
) -> ApiResult {
    let answer = st.broker.introspect(&form.token, &audit_scope(&ev)).await?;
    let body = match answer {
        Introspection::Inactive => views::IntrospectionView::default(),
        Introspection::Active { claims } => views::IntrospectionView {
            active: true,
            // RFC 9449 §6.2: a DPoP-bound token introspects as token_type DPoP.
            token_type: Some(
                match claims.cnf {
                    Some(crate::provider::jwt::Confirmation::Jkt(_)) => "DPoP",
                    _ => "Bearer",
                }
                .into(),
            ),
            scope: Some(claims.scope),
            sub: Some(claims.sub),
            aud: Some(claims.aud),
            iss: Some(claims.iss),
            cnf: claims.cnf,
            exp: Some(claims.exp),
            iat: Some(claims.iat),
            nbf: Some(claims.nbf),
            jti: Some(claims.jti),
            task_id: Some(claims.task_id),
            act: claims.act,
        },
    };
    Ok(Json(body).into_response())
}

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
async fn token_exchange(
    State(st): State<AppState>,
    ev: Ev,
    conn: Option<axum::Extension<Arc<ConnInfo>>>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<FormBody<Vec<(String, String)>>, ApiError>,
) -> Response {
    let result = async {
        let FormBody(pairs) = form?;
        let f = token_form(pairs)?;
        token_exchange_inner(&st, ev, conn, f, (&headers, uri.path())).await
    }
    .await;
    with_dpop_nonce(&st, result.unwrap_or_else(IntoResponse::into_response))
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

async fn token_exchange_inner(
    st: &AppState,
    ev: Ev,
    conn: Option<axum::Extension<Arc<ConnInfo>>>,
    f: TokenForm,
    (headers, path): (&HeaderMap, &str),
) -> Result<Response, OAuthError> {
    let ev = audit_scope(&ev);
    if f.grant_type.as_deref() != Some(GRANT_TOKEN_EXCHANGE) {
        return Err(OAuthError::unsupported_grant_type());
    }
    let token = f
        .subject_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("subject_token is required"))?;
    match f.subject_token_type.as_deref() {
        Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ID_TOKEN) => {}
        _ => {
            return Err(OAuthError::invalid_request(format!(
                "subject_token_type must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID_TOKEN}"
            )));
        }
    }
    if f.actor_token.is_some() {
        return Err(OAuthError::invalid_request(
            "actor_token (delegation) is not supported here",
        ));
    }
    match f.requested_token_type.as_deref() {
        None | Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ACCESS_TOKEN) => {}
        Some(other) => {
            return Err(OAuthError::invalid_request(format!(
                "requested_token_type {other:?} is not issued; Mayfly issues {TOKEN_TYPE_JWT}"
            )));
        }
    }
    // RFC 8707: each resource an absolute URI without fragment (else invalid_target);
    // together they are the token's audience. `audience` (RFC 8693) names one target.
    let resources = crate::task::check_resources(f.resource)
        .map_err(|e| ApiError::from(crate::broker::BrokerError::from(e)))?;
    let (target, resources) = match (resources.split_first(), f.audience) {
        (Some((first, _)), None) => (first.clone(), resources.clone()),
        (None, Some(a)) => (a, Vec::new()),
        (Some((first, rest)), Some(a)) if rest.is_empty() && *first == a => (a, resources),
        (Some(_), Some(_)) => {
            return Err(OAuthError::invalid_request(
                "give one target: resource and audience differ",
            ));
        }
        (None, None) => {
            return Err(OAuthError::invalid_request(
                "resource or audience is required",
            ));
        }
    };
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
    ev.set(|e| e.credential_fingerprint = Some(crate::secret::fingerprint(token.as_bytes())));
    let source = conn.map(|c| c.0.peer.ip());
    let verified = st
        .bearer
        .verify(&token, source, time::OffsetDateTime::now_utc())
        .await
        .map_err(ApiError::from)?;
    let caller = verified.caller.clone();
    ev.set(|e| {
        e.principal = Some(caller.principal().to_string());
        e.auth_method = Some(caller.method().as_str());
        e.credential_not_after = Some(crate::api_time(verified.expires_at));
        e.detail = None;
    });
    // After the subject token: an unauthenticated request never writes a jti.
    let dpop_jkt = dpop_proof(st, headers, "POST", path).await?;
    let req = crate::broker::ExchangeRequest {
        target,
        actions,
        job: verified.job.clone().unwrap_or_default(),
        subject_expires_at: verified.expires_at,
        max_task_ttl: verified.max_exchange_ttl,
        resources,
        dpop_jkt,
    };
    let issued = match st
        .broker
        .exchange(&caller, req, &ev)
        .await
        .map_err(ApiError::from)?
    {
        crate::broker::Outcome::Issued(i) => i,
        // RFC 8693 has no asynchronous answer: the job may retry after approval (the
        // implicit task is reused), as with RFC 8628's polling error.
        crate::broker::Outcome::Pending(a) => {
            return Err(OAuthError::authorization_pending(&a.id));
        }
    };
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
    Ok(resp)
}
