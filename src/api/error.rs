//! The one place an error becomes an HTTP status and an RFC 9457 problem document with a
//! stable machine `code`. Clients get the category; the log gets the full chain.
//! The code table is documented in `docs/api-errors.md`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::audit::AuditError;
use crate::broker::BrokerError;
use crate::identity::VerifyError;
use crate::identity::dpop::DpopError;
use crate::lease::StoreError;
use crate::provider::ProviderError;
use crate::task::ScopeError;

/// Problems with a request body, before it reaches the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("Content-Type must be {0}")]
    UnsupportedMediaType(&'static str),
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("request body could not be read: {0}")]
    Read(String),
    #[error("request body did not arrive within {0:?}")]
    Timeout(std::time::Duration),
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request body has an unknown field: {0}")]
    UnknownField(String),
    #[error("request body has a missing or mistyped field: {0}")]
    InvalidField(String),
    #[error("form body is invalid: {0}")]
    InvalidForm(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Broker(BrokerError),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("malformed {0} id")]
    BadId(&'static str),
    #[error("invalid query: {0}")]
    Query(String),
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the audit trail cannot be written; request refused")]
    Audit(#[from] AuditError),
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("too many unauthenticated requests from this source; retry later")]
    UnauthenticatedRateLimited,
    #[error(transparent)]
    Dpop(#[from] DpopError),
}

/// A DPoP refusal the broker made (a replay caught at the lease write) answers exactly
/// as one the api layer made.
impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Dpop(d) => ApiError::Dpop(d),
            other => ApiError::Broker(other),
        }
    }
}

/// The stable code of an error response, kept as a response extension so the audit
/// middleware can record it.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

pub fn verify_code(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::ClientCertRequired => "client_certificate_required",
        VerifyError::Malformed(_) => "svid_malformed",
        VerifyError::UriSanCount(_) => "svid_uri_san_count",
        VerifyError::InvalidSpiffeId(_) => "svid_invalid_spiffe_id",
        VerifyError::LeafWithoutPath => "svid_leaf_without_path",
        VerifyError::LeafIsCa => "svid_leaf_is_ca",
        VerifyError::MissingDigitalSignature => "svid_missing_digital_signature",
        VerifyError::ForbiddenKeyUsage => "svid_forbidden_key_usage",
        VerifyError::UnknownTrustDomain(_) => "svid_unknown_trust_domain",
        VerifyError::Expired => "svid_expired",
        VerifyError::NotYetValid => "svid_not_yet_valid",
        VerifyError::UntrustedChain(_) => "svid_untrusted_chain",
        VerifyError::WrongExtendedKeyUsage => "svid_wrong_extended_key_usage",
        VerifyError::ChainInvalid(_) => "svid_chain_invalid",
        VerifyError::IntermediateNotCa => "svid_intermediate_not_ca",
        VerifyError::IssuerNotCertSigner => "svid_issuer_not_cert_signer",
        VerifyError::PathLenExceeded => "svid_path_len_exceeded",
        VerifyError::NameConstraintViolated => "svid_name_constraint_violated",
        VerifyError::IntermediateExpired => "svid_intermediate_expired",
        VerifyError::IntermediateNotYetValid => "svid_intermediate_not_yet_valid",
        VerifyError::AmbiguousCredentials => "ambiguous_credentials",
        VerifyError::AuthorizationScheme => "authorization_scheme",
        VerifyError::TokenTooLarge(_) => "token_too_large",
        VerifyError::TokenMalformed(_) => "token_malformed",
        VerifyError::JsonMalformed { .. } => "token_json_malformed",
        VerifyError::DuplicateMember { .. } => "token_duplicate_member",
        VerifyError::AlgNone => "token_alg_none",
        VerifyError::AlgSymmetric(_) => "token_alg_symmetric",
        VerifyError::AlgNotAllowed(_) => "token_alg_not_allowed",
        VerifyError::EmbeddedKeyHeader(_) => "token_embedded_key",
        VerifyError::UnsupportedCrit(_) => "token_crit_unsupported",
        VerifyError::TypMismatch(_) => "token_typ_mismatch",
        VerifyError::MissingKid => "token_missing_kid",
        VerifyError::UnknownKid(_) => "token_unknown_kid",
        VerifyError::KeysUnavailable(_) => "token_keys_unavailable",
        VerifyError::KeyAlgMismatch => "token_key_alg_mismatch",
        VerifyError::BadSignature => "token_bad_signature",
        VerifyError::MissingClaim(_) => "token_missing_claim",
        VerifyError::ClaimType(_) => "token_claim_type",
        VerifyError::UnknownIssuer(_) => "token_unknown_issuer",
        VerifyError::AudienceMismatch => "token_audience_mismatch",
        VerifyError::MultipleAudiences(_) => "token_multiple_audiences",
        VerifyError::TokenExpired => "token_expired",
        VerifyError::TokenNotYetValid => "token_not_yet_valid",
        VerifyError::IssuedInFuture => "token_issued_in_future",
    }
}

fn scope_code(e: &ScopeError) -> &'static str {
    match e {
        ScopeError::Duration(_) => "invalid_duration",
        ScopeError::UnknownProvider(_) => "unknown_provider",
        ScopeError::Purpose => "invalid_purpose",
        ScopeError::Delegatee(_) => "invalid_principal",
        ScopeError::IamWildcard(_) => "aws_resource_wildcard",
        ScopeError::Resource(_) => "invalid_target",
        _ => "invalid_scope",
    }
}

fn body_status(b: &BodyError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match b {
        BodyError::UnsupportedMediaType(_) => (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        BodyError::TooLarge(_) => (S::PAYLOAD_TOO_LARGE, "body_too_large"),
        BodyError::Read(_) => (S::BAD_REQUEST, "body_unreadable"),
        BodyError::Timeout(_) => (S::REQUEST_TIMEOUT, "body_timeout"),
        BodyError::MalformedJson(_) => (S::BAD_REQUEST, "malformed_json"),
        BodyError::UnknownField(_) => (S::BAD_REQUEST, "unknown_field"),
        BodyError::InvalidField(_) => (S::BAD_REQUEST, "invalid_field"),
        BodyError::InvalidForm(_) => (S::BAD_REQUEST, "invalid_form"),
    }
}

fn broker_status(b: &BrokerError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match b {
        BrokerError::Invalid(e) => (S::BAD_REQUEST, scope_code(e)),
        BrokerError::NotOperator(_) => (S::FORBIDDEN, "not_operator"),
        BrokerError::TaskNotFound(_) => (S::NOT_FOUND, "task_not_found"),
        BrokerError::NotTaskOwner(_) => (S::FORBIDDEN, "not_task_owner"),
        BrokerError::TaskClaimsDiffer(_) => (S::FORBIDDEN, "task_claims_differ"),
        BrokerError::TaskNotActive { .. } => (S::CONFLICT, "task_not_active"),
        BrokerError::TaskExpired(_) => (S::CONFLICT, "task_expired"),
        BrokerError::OutOfScope(_) => (S::FORBIDDEN, "out_of_scope"),
        BrokerError::InvalidTarget(_) => (S::BAD_REQUEST, "invalid_target"),
        BrokerError::TtlExceedsTask { .. } => (S::BAD_REQUEST, "ttl_exceeds_task"),
        BrokerError::TtlExceedsLimit { .. } => (S::BAD_REQUEST, "ttl_exceeds_limit"),
        BrokerError::PolicyDenied { .. } => (S::FORBIDDEN, "policy_denied"),
        BrokerError::LeaseNotFound(_) => (S::NOT_FOUND, "lease_not_found"),
        BrokerError::RevokedDuringMint(_) => (S::CONFLICT, "lease_revoked"),
        BrokerError::Reason => (S::BAD_REQUEST, "invalid_reason"),
        BrokerError::ApprovalDecision(_) => (S::BAD_REQUEST, "invalid_decision"),
        BrokerError::Selector => (S::BAD_REQUEST, "invalid_selector"),
        BrokerError::DelegationWider(_) => (S::FORBIDDEN, "delegation_wider"),
        BrokerError::AnomalyDenied(_) => (S::FORBIDDEN, "anomaly_denied"),
        BrokerError::ApprovalNotFound(_) => (S::NOT_FOUND, "approval_not_found"),
        BrokerError::ApprovalRejected(_) => (S::FORBIDDEN, "approval_rejected"),
        BrokerError::ApprovalExpired(_) => (S::GONE, "approval_expired"),
        BrokerError::ApprovalClosed(_) => (S::CONFLICT, "approval_closed"),
        BrokerError::SignalTarget => (S::BAD_REQUEST, "invalid_signal"),
        BrokerError::DelegationTooDeep { .. } => (S::FORBIDDEN, "delegation_too_deep"),
        BrokerError::InjectedCrash(_) => (S::INTERNAL_SERVER_ERROR, "injected_fault"),
        BrokerError::NoJobClaims => (S::FORBIDDEN, "no_job_claims"),
        BrokerError::Dpop(e) => (S::BAD_REQUEST, e.code()),
        BrokerError::JobTaskId(_) => (S::INTERNAL_SERVER_ERROR, "job_task_id_unavailable"),
        BrokerError::TokenReplayed => (S::UNAUTHORIZED, "token_replayed"),
        BrokerError::QuotaExceeded(_) => (S::TOO_MANY_REQUESTS, "principal_quota_exceeded"),
        BrokerError::SingleUseUnavailable(_) => {
            (S::SERVICE_UNAVAILABLE, "single_use_store_unavailable")
        }
        BrokerError::Provider(p) => provider_status(p),
        BrokerError::Store(StoreError::Unavailable(_)) => {
            (S::SERVICE_UNAVAILABLE, "store_unavailable")
        }
        BrokerError::Store(_) => (S::INTERNAL_SERVER_ERROR, "store_error"),
        BrokerError::Policy(_) => (S::INTERNAL_SERVER_ERROR, "policy_error"),
    }
}

fn provider_status(p: &ProviderError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match p {
        ProviderError::NotConfigured(_) => (S::BAD_REQUEST, "provider_not_configured"),
        ProviderError::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "provider_unavailable"),
        ProviderError::Denied(_) => (S::BAD_GATEWAY, "upstream_denied"),
        ProviderError::Rejected(_) => (S::BAD_GATEWAY, "upstream_rejected"),
        ProviderError::NotAllowed(_) => (S::FORBIDDEN, "provider_not_allowed"),
        ProviderError::InvalidGrant(_) => (S::BAD_REQUEST, "invalid_provider_grant"),
        ProviderError::PolicyTooLarge { .. } => (S::BAD_REQUEST, "policy_too_large"),
        ProviderError::BindingRequired => (S::BAD_REQUEST, "binding_required"),
        ProviderError::RateLimited { .. } => (S::TOO_MANY_REQUESTS, "rate_limited"),
        _ => (S::BAD_GATEWAY, "provider_error"),
    }
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::Verify(e) => (S::UNAUTHORIZED, verify_code(e)),
            ApiError::Body(b) => body_status(b),
            ApiError::BadId(_) => (S::BAD_REQUEST, "invalid_id"),
            ApiError::Query(_) => (S::BAD_REQUEST, "invalid_query"),
            ApiError::NotFound => (S::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Audit(_) => (S::SERVICE_UNAVAILABLE, "audit_unavailable"),
            ApiError::Overloaded => (S::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::UnauthenticatedRateLimited => {
                (S::TOO_MANY_REQUESTS, "unauthenticated_rate_limited")
            }
            ApiError::Dpop(e) => (S::BAD_REQUEST, e.code()),
            ApiError::Broker(b) => broker_status(b),
        }
    }

    /// What the client may read. Server-side failures say only their category.
    fn detail(&self, status: StatusCode) -> String {
        if status.is_server_error() {
            match self {
                ApiError::Audit(_) | ApiError::Overloaded => self.to_string(),
                ApiError::Broker(BrokerError::Store(_)) => "the lease store is unavailable".into(),
                ApiError::Broker(BrokerError::SingleUseUnavailable(_)) => {
                    "single-use tokens cannot be checked: the store is unavailable".into()
                }
                // The upstream's own reason helps the caller and reveals nothing of ours.
                ApiError::Broker(BrokerError::Provider(
                    e @ (ProviderError::Denied(_) | ProviderError::Rejected(_)),
                )) => e.to_string(),
                ApiError::Broker(BrokerError::Provider(ProviderError::Unavailable(_))) => {
                    "the credential provider is unreachable".into()
                }
                ApiError::Broker(BrokerError::Provider(_)) => {
                    "the credential provider failed".into()
                }
                _ => "internal error".into(),
            }
        } else {
            self.to_string()
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if matches!(
            self,
            ApiError::Overloaded | ApiError::UnauthenticatedRateLimited
        ) {
            // Logging each shed request would add work exactly when there is too much.
        } else if status.is_server_error() {
            tracing::error!(code, error = ?self, "request failed");
        } else {
            tracing::debug!(code, error = %self, "request refused");
        }
        let body = json!({
            "type": format!("urn:mayfly:problem:{code}"),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "code": code,
            "detail": self.detail(status),
        });
        let mut resp = (status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            // Either proof is accepted; a bearer failure says so in the bearer form.
            let challenge = match &self {
                ApiError::Verify(v) if verify_code(v).starts_with("token_") => {
                    "Bearer error=\"invalid_token\""
                }
                _ => "MutualTLS, Bearer",
            };
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(ErrorCode(code));
        resp
    }
}

impl ApiError {
    /// Seconds a client should wait before retrying, for errors that say so.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Broker(BrokerError::Provider(ProviderError::RateLimited {
                retry_after_secs,
                ..
            })) => Some(*retry_after_secs),
            // A shed request: the overload is momentary.
            ApiError::Overloaded | ApiError::UnauthenticatedRateLimited => Some(1),
            _ => None,
        }
    }
}

/// An RFC 6749 §5.2 error, the token endpoint's error format (not problem+json).
/// `code` is Mayfly's specific code (e.g. `token_expired`), kept for the audit record;
/// `error` is the OAuth category the client sees.
#[derive(Debug)]
pub struct OAuthError {
    pub status: StatusCode,
    pub retry_after: Option<u64>,
    pub error: &'static str,
    pub code: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            retry_after: None,
            error: "invalid_request",
            code: "invalid_request",
            description: description.into(),
        }
    }
    /// The credential needs a human approval first (step-up); retry after it.
    pub fn authorization_pending(approval_id: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            retry_after: None,
            error: "authorization_pending",
            code: "approval_required",
            description: format!(
                "approval {approval_id} is pending; retry the exchange once it is approved"
            ),
        }
    }
    pub fn unsupported_grant_type() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            retry_after: None,
            error: "unsupported_grant_type",
            code: "unsupported_grant_type",
            description: "grant_type must be urn:ietf:params:oauth:grant-type:token-exchange"
                .into(),
        }
    }
}

impl From<ApiError> for OAuthError {
    fn from(e: ApiError) -> Self {
        use StatusCode as S;
        let (status, code) = e.status_and_code();
        let (status, error) = match &e {
            ApiError::Verify(_) | ApiError::Broker(BrokerError::TokenReplayed) => {
                (S::BAD_REQUEST, "invalid_grant")
            }
            // Not the client's grant but its connection: keep the transport's status.
            ApiError::Body(BodyError::Timeout(_)) => (S::REQUEST_TIMEOUT, "invalid_request"),
            // RFC 9449 §5 and §8.
            ApiError::Dpop(DpopError::UseNonce) => (S::BAD_REQUEST, "use_dpop_nonce"),
            ApiError::Dpop(_)
            | ApiError::Broker(BrokerError::Provider(ProviderError::BindingRequired)) => {
                (S::BAD_REQUEST, "invalid_dpop_proof")
            }
            ApiError::Broker(BrokerError::Invalid(ScopeError::Resource(_)))
            | ApiError::Broker(BrokerError::InvalidTarget(_)) => (S::BAD_REQUEST, "invalid_target"),
            ApiError::Broker(BrokerError::Invalid(ScopeError::Target)) => {
                (S::BAD_REQUEST, "invalid_target")
            }
            ApiError::Broker(BrokerError::Invalid(ScopeError::Item { .. }))
            | ApiError::Broker(BrokerError::Invalid(ScopeError::ItemCount { .. })) => {
                (S::BAD_REQUEST, "invalid_scope")
            }
            ApiError::Broker(BrokerError::PolicyDenied { .. })
            | ApiError::Broker(BrokerError::OutOfScope(_)) => (S::BAD_REQUEST, "invalid_target"),
            ApiError::Broker(BrokerError::NoJobClaims)
            | ApiError::Broker(BrokerError::NotTaskOwner(_))
            | ApiError::Broker(BrokerError::TaskClaimsDiffer(_)) => {
                (S::BAD_REQUEST, "unauthorized_client")
            }
            _ if status == S::SERVICE_UNAVAILABLE || status == S::TOO_MANY_REQUESTS => {
                (status, "temporarily_unavailable")
            }
            _ if status.is_server_error() => (S::INTERNAL_SERVER_ERROR, "server_error"),
            _ => (S::BAD_REQUEST, "invalid_request"),
        };
        Self {
            status,
            retry_after: e.retry_after(),
            error,
            code,
            description: e.detail(status),
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        tracing::debug!(
            code = self.code,
            error = self.error,
            "token exchange refused"
        );
        let body = json!({"error": self.error, "error_description": self.description});
        let mut resp = (self.status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}
