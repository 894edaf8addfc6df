//! Credential providers: each mints one kind of credential for a lease and says how that
//! credential dies. Chosen by config, built once, held as `Arc<dyn CredentialProvider>`.

pub mod aws;
mod http;
pub mod jwt;
pub mod vault;

pub use crate::ratelimit::{RateLimit, TokenBucket};

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Arc;
use time::OffsetDateTime;

use crate::identity::VerifiedCaller;
use crate::lease::{Lease, RevocationHandle};
use crate::secret::Secret;
use crate::task::{ProviderKind, Task};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("provider {0} is not configured")]
    NotConfigured(ProviderKind),
    #[error("provider key error: {0}")]
    Key(String),
    #[error("provider could not mint: {0}")]
    Mint(String),
    #[error("provider could not revoke: {0}")]
    Revoke(String),
    #[error("provider unreachable: {0}")]
    Unavailable(String),
    /// The upstream refused Mayfly's request (HTTP 403, `AccessDenied`): its reason.
    #[error("the upstream denied the request: {0}")]
    Denied(String),
    /// The upstream rejected the request as invalid (HTTP 4xx other than 403).
    #[error("the upstream rejected the request: {0}")]
    Rejected(String),
    /// The grant does not fit what the provider's configuration allows for the target
    /// (unknown target, a Vault policy outside the allow-list, …).
    #[error("not allowed by the provider configuration: {0}")]
    NotAllowed(String),
    /// The grant cannot be expressed as this provider's credential.
    #[error("grant cannot be minted by this provider: {0}")]
    InvalidGrant(String),
    /// The generated policy exceeds the upstream's size limit; Mayfly never widens it.
    #[error("generated {what} is {len} characters; the limit is {max}")]
    PolicyTooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// The revocation cannot be completed now for lack of room (a full AWS deny policy)
    /// or a busy role lock: back-pressure, retried after `retry_after_secs` without
    /// counting as a failed attempt.
    #[error("revocation deferred: {reason}; retried in {retry_after_secs} s")]
    Deferred {
        reason: String,
        retry_after_secs: u64,
    },
    /// The target requires a sender-constrained token and the caller offered no key to
    /// bind it to (no client certificate, no DPoP proof).
    #[error("this target requires a bound token: call with a client certificate or a DPoP proof")]
    BindingRequired,
    /// The provider's request budget is spent; retry after the given time.
    #[error("provider {provider} is over its request rate; retry in {retry_after_secs} s")]
    RateLimited {
        provider: ProviderKind,
        retry_after_secs: u64,
    },
}

impl ProviderError {
    /// The error proves no credential exists upstream: the request was refused before
    /// it was sent, or the upstream refused it outright. Anything ambiguous (a timeout,
    /// a failure after the upstream answered) is not.
    pub fn minted_nothing(&self) -> bool {
        matches!(
            self,
            ProviderError::NotConfigured(_)
                | ProviderError::NotAllowed(_)
                | ProviderError::InvalidGrant(_)
                | ProviderError::PolicyTooLarge { .. }
                | ProviderError::BindingRequired
                | ProviderError::RateLimited { .. }
                | ProviderError::Denied(_)
                | ProviderError::Rejected(_)
        )
    }
}

/// What Mayfly knows about how a credential died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The provider confirmed the credential no longer works.
    Revoked,
    /// The provider cannot revoke it one by one: it keeps working until `at`.
    ExpiresOnly { at: OffsetDateTime },
}

/// Everything a provider may use to cut a credential. The lease is already durable
/// (`pending`), except for a provider that mints in process (see `mints_in_process`).
pub struct MintRequest<'a> {
    pub lease: &'a Lease,
    pub task: &'a Task,
    pub caller: &'a VerifiedCaller,
    /// Who delegated this task, nearest first (empty for a task declared by its owner).
    pub delegation: &'a [crate::identity::Principal],
    /// RFC 8707 resources the credential is for besides the lease's target (`jwt`: they
    /// join `aud`). Empty for every other provider.
    pub audience: &'a [String],
    /// RFC 7638 thumbprint of the key whose DPoP proof came with the request, if any.
    pub dpop_jkt: Option<&'a str>,
}

/// A freshly minted credential. `credential` goes to the caller only; the audit trail and
/// the lease get `fingerprint` and `handle`.
#[derive(Debug)]
pub struct Minted {
    pub credential: Secret<serde_json::Value>,
    pub fingerprint: String,
    pub handle: Option<RevocationHandle>,
}

#[async_trait]
pub trait CredentialProvider: Send + Sync + 'static {
    fn kind(&self) -> ProviderKind;
    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError>;
    /// Revokes the credential of `lease`. Must be idempotent, and must work for a lease
    /// that stayed `pending` (the credential may or may not exist).
    async fn revoke(&self, lease: &Lease) -> Result<Revocation, ProviderError>;
    async fn ready(&self) -> Result<(), ProviderError>;
    /// Called once the lease is `active` (durably, with its handle), before the
    /// credential is returned. Providers that mint short-lived first (so a crash before
    /// activation leaves a credential that dies within the pending timeout) extend the
    /// credential to the lease's end here. An error revokes the lease.
    async fn activated(&self, _lease: &Lease) -> Result<(), ProviderError> {
        Ok(())
    }
    /// The credential exists only in this process until the broker returns it (a token
    /// Mayfly signs itself): nothing upstream to revoke after a crash, so the broker
    /// records the lease once, `active`, after minting instead of `pending` before it,
    /// and `activated` is not called.
    fn mints_in_process(&self) -> bool {
        false
    }
    /// Whether the credential of `lease` can outlive the lease's TTL (an STS session's
    /// 900 s floor, a Vault dynamic-secret lease longer than Mayfly's). If so, the reaper
    /// revokes it at expiry instead of only marking it expired.
    fn outlives_lease(&self, _lease: &Lease) -> bool {
        false
    }
}

/// A token bucket from config: `per_second` 0 means no limit.
pub(crate) fn rate_limit(per_second: f64, burst: f64) -> Result<Option<RateLimit>, String> {
    if per_second == 0.0 {
        return Ok(None);
    }
    if !(per_second.is_finite() && per_second > 0.0 && burst.is_finite() && burst >= 1.0) {
        return Err("rate_limit_per_second must be ≥ 0 and rate_limit_burst ≥ 1".into());
    }
    Ok(Some(RateLimit { per_second, burst }))
}

/// The configured providers, by kind, each with its optional request budget.
#[derive(Clone, Default)]
pub struct Providers {
    by_kind: HashMap<ProviderKind, Arc<dyn CredentialProvider>>,
    budgets: HashMap<ProviderKind, RateLimit>,
}

/// The share of a provider's budget one principal may use (`[limits]
/// principal_rate_share`, default 0.5): its own bucket of this fraction of the
/// provider's rate and burst (burst at least 1).
pub fn principal_limit(provider: RateLimit, share: f64) -> RateLimit {
    RateLimit {
        per_second: provider.per_second * share,
        burst: (provider.burst * share).max(1.0),
    }
}

impl Providers {
    pub fn insert(&mut self, p: Arc<dyn CredentialProvider>) {
        self.by_kind.insert(p.kind(), p);
    }
    /// Inserts `p` with a token bucket limiting how fast credentials are minted through it.
    pub fn insert_limited(&mut self, p: Arc<dyn CredentialProvider>, limit: Option<RateLimit>) {
        if let Some(limit) = limit {
            self.budgets.insert(p.kind(), limit);
        }
        self.insert(p);
    }
    pub fn get(&self, kind: ProviderKind) -> Result<&Arc<dyn CredentialProvider>, ProviderError> {
        self.by_kind
            .get(&kind)
            .ok_or(ProviderError::NotConfigured(kind))
    }
    /// The provider's request budget, if it has one.
    pub fn budget(&self, kind: ProviderKind) -> Option<RateLimit> {
        self.budgets.get(&kind).copied()
    }
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn CredentialProvider>> {
        self.by_kind.values()
    }
}
