//! The middleware that gives every `/v1` request one audit record, on every exit path.

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::IpAddr;
use std::sync::Arc;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ErrorCode, OAuthError};
use super::extract::{ConnInfo, ResolvedCaller, resolve_caller};
use crate::audit::{AuditEvent, AuditScope};
use crate::broker::CommitError;
use crate::identity::SingleUse;
use crate::metrics::Handles;

/// What the middleware knows of a request before it runs.
struct Facts {
    request_id: String,
    route: String,
    method: String,
    source_ip: Option<IpAddr>,
    /// The connection presented a client certificate that verified.
    cert_verified: bool,
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
pub(super) async fn audit_request(
    State(st): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    // Counted until the record's commit is queued: the store's writer may wait for it
    // when many are coming (one commit for more of them).
    let intent = st.broker.expect_write();
    let (facts, ev) = open_event(&req);
    let started = std::time::Instant::now();
    let limited = !facts.cert_verified && facts.source_ip.is_some_and(|ip| st.unauth.exhausted(ip));
    let (scope, mut resp) = if limited {
        rate_limited(&facts, ev)
    } else {
        run(&st, &facts, ev, req, next).await
    };
    static DURATION: Handles<String, metrics::Histogram> = Handles::new();
    DURATION
        .get(facts.route.clone(), |route| {
            metrics::histogram!("mayfly_request_duration_seconds", "route" => route.clone())
        })
        .record(started.elapsed().as_secs_f64());
    let code = close_event(&scope, &resp);
    drop(intent);
    if write_in_full(&st, &scope, &facts, code) {
        resp = commit(&st, &scope, &facts, resp).await;
    }
    finish(facts, resp)
}

/// Writes the request's record (and the lease it carries). A lease the store refuses at
/// that point (its DPoP proof was spent meanwhile, its task ended) is never written: the
/// answer becomes that refusal, recorded in place of the credential.
async fn commit(st: &AppState, scope: &AuditScope, facts: &Facts, resp: Response) -> Response {
    let refused = match st.broker.commit(scope).await {
        Ok(()) => return resp,
        Err(CommitError::Refused(e)) => error_response(&facts.route, ApiError::from(e)),
        Err(CommitError::Audit(err)) => {
            return error_response(&facts.route, ApiError::Audit(err));
        }
    };
    close_event(scope, &refused);
    match st.broker.commit(scope).await {
        Ok(()) => refused,
        Err(e) => error_response(&facts.route, commit_error(e)),
    }
}

fn commit_error(e: CommitError) -> ApiError {
    match e {
        CommitError::Audit(err) => ApiError::Audit(err),
        CommitError::Refused(e) => ApiError::from(e),
    }
}

fn open_event(req: &Request) -> (Facts, AuditEvent) {
    let request_id = Uuid::new_v4().simple().to_string();
    let conn = req.extensions().get::<Arc<ConnInfo>>();
    let source_ip = conn.map(|c| c.peer.ip());
    let mut ev = AuditEvent::new("request");
    ev.request_id = Some(request_id.clone());
    ev.method = Some(req.method().to_string());
    ev.route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    ev.source = source_ip.map(|ip| ip.to_string());
    let facts = Facts {
        request_id,
        route: ev.route.clone().unwrap_or_default(),
        method: ev.method.clone().unwrap_or_default(),
        source_ip,
        cert_verified: conn.is_some_and(|c| c.identity.is_ok()),
    };
    (facts, ev)
}

/// `/v1/token` answers in RFC 6749 §5.2 form; every other route with a problem document.
fn error_response(route: &str, err: ApiError) -> Response {
    if route == super::token::ROUTE {
        OAuthError::from(err).into_response()
    } else {
        err.into_response()
    }
}

fn rate_limited(facts: &Facts, mut ev: AuditEvent) -> (AuditScope, Response) {
    ev.detail = Some("unauthenticated requests from this source are rate-limited".into());
    metrics::counter!("mayfly_unauthenticated_rate_limited_total").increment(1);
    let resp = error_response(&facts.route, ApiError::UnauthenticatedRateLimited);
    (AuditScope::new(ev), resp)
}

/// Resolves the caller once (the handler's `Caller` reads it) and runs the handler.
/// `/v1/token` has no transport caller: its subject token is its caller, verified by
/// the broker.
async fn run(
    st: &AppState,
    facts: &Facts,
    mut ev: AuditEvent,
    mut req: Request,
    next: Next,
) -> (AuditScope, Response) {
    let mut single_use = None;
    if facts.route != super::token::ROUTE {
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
    }
    let scope = AuditScope::for_request(ev);
    req.extensions_mut().insert(scope.clone());
    // Every log line of this request carries its id (and the audit record has the same).
    let span = tracing::info_span!("request", request_id = %facts.request_id, route = %facts.route);
    let resp = tracing::Instrument::instrument(next.run(req), span).await;
    let resp = consume_unspent(st, &facts.route, single_use, resp).await;
    (scope, resp)
}

/// A single-use token is consumed by the broker once authorized; a route that
/// succeeded without consuming it (reads, completions) consumes it now, before the
/// answer leaves: a replay is refused on every route.
async fn consume_unspent(
    st: &AppState,
    route: &str,
    single_use: Option<Arc<SingleUse>>,
    resp: Response,
) -> Response {
    if let Some(su) = single_use
        && resp.status().is_success()
        && !su.is_spent()
        && let Err(e) = st.broker.consume(&su).await
    {
        return error_response(route, ApiError::Broker(e));
    }
    resp
}

/// Records the answer (status, code, decision) on the request's event; returns the code.
fn close_event(scope: &AuditScope, resp: &Response) -> Option<&'static str> {
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
    code
}

/// Whether the record is written in full: always, except for an unauthenticated
/// refusal, which charges its source's bucket and is written only as the first of its
/// kind in the summary interval.
fn write_in_full(
    st: &AppState,
    scope: &AuditScope,
    facts: &Facts,
    code: Option<&'static str>,
) -> bool {
    let full =
        scope.read(|e| e.principal.is_some() || !e.status.is_some_and(|s| (400..500).contains(&s)));
    if full {
        return true;
    }
    if let Some(ip) = facts.source_ip {
        st.unauth.charge(ip);
    }
    metrics::counter!("mayfly_unauthenticated_refusals_total").increment(1);
    scope.read(|e| {
        st.refusals.observe(
            e.source.as_deref().unwrap_or("unknown"),
            code.unwrap_or("refused"),
            e.route.as_deref(),
        )
    })
}

fn finish(facts: Facts, mut resp: Response) -> Response {
    static REQUESTS: Handles<(String, String, u16, &'static str), metrics::Counter> =
        Handles::new();
    let code = resp.extensions().get::<ErrorCode>().map_or("", |c| c.0);
    REQUESTS
        .get(
            (facts.route, facts.method, resp.status().as_u16(), code),
            |(route, method, status, code)| {
                metrics::counter!(
                    "mayfly_requests_total",
                    "route" => route.clone(),
                    "method" => method.clone(),
                    "status" => status.to_string(),
                    "code" => *code,
                )
            },
        )
        .increment(1);
    if let Ok(v) = HeaderValue::from_str(&facts.request_id) {
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
