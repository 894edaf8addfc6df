//! Extractors that turn hostile input into validated values or a specific `ApiError`.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::Arc;
use time::OffsetDateTime;

use super::AppState;
use super::error::{ApiError, BodyError};
use crate::identity::bearer::BearerVerifier;
use crate::identity::{VerifiedCaller, VerifyError};

/// What the TLS layer learned about a connection, attached to each of its requests.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub identity: Result<VerifiedCaller, VerifyError>,
}

/// The verified caller of this request.
pub struct Caller(pub VerifiedCaller);

pub fn caller_of(parts_ext: &axum::http::Extensions) -> Result<VerifiedCaller, VerifyError> {
    let conn = parts_ext
        .get::<Arc<ConnInfo>>()
        .ok_or(VerifyError::ClientCertRequired)?;
    let caller = conn.identity.clone()?;
    // A connection can outlive the certificate it was opened with.
    if caller.posture().credential_not_after <= OffsetDateTime::now_utc() {
        return Err(VerifyError::Expired);
    }
    Ok(caller)
}

/// The caller as resolved once per request by the audit middleware, so a bearer token
/// is verified (and a single-use `jti` consumed) exactly once.
#[derive(Debug, Clone)]
pub struct ResolvedCaller(pub Result<VerifiedCaller, VerifyError>);

/// Who sent this request: the connection's X.509-SVID, or an `Authorization: Bearer`
/// token (JWT-SVID or OIDC), verified now.
///
/// Precedence: none. A request that carries a bearer token on a connection that
/// presented a client certificate is refused (`ambiguous_credentials`): one request,
/// one identity, so a workload cannot borrow a token to act as someone else while its
/// certificate is logged, and no rule has to pick a winner.
pub async fn resolve_caller(
    ext: &axum::http::Extensions,
    headers: &axum::http::HeaderMap,
    bearer: &BearerVerifier,
) -> Result<VerifiedCaller, VerifyError> {
    let Some(auth) = headers.get(header::AUTHORIZATION) else {
        return caller_of(ext);
    };
    let token = auth
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or(VerifyError::AuthorizationScheme)?;
    let conn = ext.get::<Arc<ConnInfo>>();
    if let Some(c) = conn
        && !matches!(c.identity, Err(VerifyError::ClientCertRequired))
    {
        return Err(VerifyError::AmbiguousCredentials);
    }
    let source = conn.map(|c| c.peer.ip());
    bearer
        .verify(token, source, OffsetDateTime::now_utc())
        .await
        .map(|t| t.caller)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        if let Some(ResolvedCaller(r)) = parts.extensions.get::<ResolvedCaller>() {
            return Ok(Caller(r.clone()?));
        }
        Ok(Caller(
            resolve_caller(&parts.extensions, &parts.headers, &st.bearer).await?,
        ))
    }
}

/// A body the edge could not read in full (too large, too slow): the request goes on
/// with an empty body and this marker, so its handler answers with the error and the
/// request is audited like any other.
#[derive(Debug, Clone)]
pub struct BodyRejected(pub Arc<BodyError>);

/// Reads the whole body of `req` (at most `limit` bytes, within `timeout`) before the
/// request is admitted to work; the request continues with the bytes in memory.
pub async fn buffer_body(req: Request, limit: usize, timeout: std::time::Duration) -> Request {
    let (mut parts, body) = req.into_parts();
    match read_body(&parts.headers, body, limit, timeout).await {
        Ok(bytes) => Request::from_parts(parts, Body::from(bytes)),
        Err(e) => {
            if matches!(e, BodyError::Timeout(_)) {
                metrics::counter!("mayfly_body_read_timeouts_total").increment(1);
            }
            parts.extensions.insert(BodyRejected(Arc::new(e)));
            Request::from_parts(parts, Body::empty())
        }
    }
}

async fn read_body(
    headers: &axum::http::HeaderMap,
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<axum::body::Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(BodyError::Timeout(timeout)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(BodyError::TooLarge(limit))
        }
        Ok(Err(e)) => Err(BodyError::Read(e.to_string())),
    }
}

async fn read_limited(
    req: Request,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<axum::body::Bytes, BodyError> {
    if let Some(BodyRejected(e)) = req.extensions().get::<BodyRejected>() {
        return Err(e.as_ref().clone());
    }
    let (parts, body) = req.into_parts();
    read_body(&parts.headers, body, limit, timeout).await
}

fn media_type_is(req: &Request, want: &str) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(want))
}

/// A JSON body: `application/json`, at most `max_body_bytes`, strictly typed.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !media_type_is(&req, "application/json") {
            return Err(BodyError::UnsupportedMediaType("application/json").into());
        }
        let bytes = read_limited(req, state.max_body_bytes, state.body_read_timeout).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            use serde_json::error::Category;
            let msg = e.to_string();
            match e.classify() {
                Category::Data if msg.starts_with("unknown field") => BodyError::UnknownField(msg),
                Category::Data => BodyError::InvalidField(msg),
                _ => BodyError::MalformedJson(msg),
            }
            .into()
        })
    }
}

/// An `application/x-www-form-urlencoded` body (OAuth endpoints).
pub struct FormBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for FormBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !media_type_is(&req, "application/x-www-form-urlencoded") {
            return Err(
                BodyError::UnsupportedMediaType("application/x-www-form-urlencoded").into(),
            );
        }
        let bytes = read_limited(req, state.max_body_bytes, state.body_read_timeout).await?;
        serde_urlencoded::from_bytes(&bytes)
            .map(FormBody)
            .map_err(|e| BodyError::InvalidForm(e.to_string()).into())
    }
}
