//! Why the broker refused or failed a request.

use crate::action::Action;
use crate::anomaly::Quota;
use crate::lease::StoreError;
use crate::policy::PolicyError;
use crate::provider::ProviderError;
use crate::task::{LeaseId, ScopeError, TaskId};

use super::FaultPoint;

/// Why the broker refused or failed a request. `api::error` maps each to a status and code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid request: {0}")]
    Invalid(#[from] ScopeError),
    #[error("this route is for operators; {0} is not one")]
    NotOperator(String),
    #[error("task {0} does not exist")]
    TaskNotFound(TaskId),
    #[error("task {0} belongs to another principal")]
    NotTaskOwner(TaskId),
    #[error("task {0} was declared by a CI job whose claims differ from this caller's")]
    TaskClaimsDiffer(TaskId),
    #[error("task {id} is {state}")]
    TaskNotActive { id: TaskId, state: &'static str },
    #[error("task {0} has expired")]
    TaskExpired(TaskId),
    #[error("{0}")]
    OutOfScope(String),
    /// RFC 8707: a `resource` the task holds no fitting grant for.
    #[error("resource {0:?} is not a target of this task's scope for these actions")]
    InvalidTarget(String),
    #[error("requested ttl {requested}s exceeds the task's remaining {remaining}s")]
    TtlExceedsTask { requested: u64, remaining: u64 },
    #[error("requested ttl {requested}s exceeds the configured maximum {max}s")]
    TtlExceedsLimit { requested: u64, max: u64 },
    #[error("policy denied {action}{}", detail.as_deref().map(|d| format!(" for {d}")).unwrap_or_default())]
    PolicyDenied {
        action: Action,
        detail: Option<String>,
    },
    #[error("lease {0} does not exist")]
    LeaseNotFound(LeaseId),
    #[error("lease {0} was revoked while its credential was being minted")]
    RevokedDuringMint(LeaseId),
    #[error("reason must be 1..=512 printable characters")]
    Reason,
    #[error("decision must be \"approve\" or \"reject\", got {0:?}")]
    ApprovalDecision(String),
    #[error("give exactly one of principal, provider, target_prefix")]
    Selector,
    #[error("approval {0} does not exist")]
    ApprovalNotFound(String),
    #[error("approval {0} was rejected")]
    ApprovalRejected(String),
    #[error("approval {0} has expired")]
    ApprovalExpired(String),
    #[error("approval {0} was already used or decided")]
    ApprovalClosed(String),
    #[error("requests under task {0} are blocked by anomaly detection")]
    AnomalyDenied(TaskId),
    #[error("a signal needs exactly one of task_id, principal, and a kind")]
    SignalTarget,
    #[error("delegated scope is wider than the task holds: {0}")]
    DelegationWider(String),
    #[error("delegation chain would be {depth} deep; the limit is {max}")]
    DelegationTooDeep { depth: usize, max: usize },
    #[error("injected crash at {0:?}")]
    InjectedCrash(FaultPoint),
    #[error(
        "this token's issuer does not name CI jobs (no job_claims configured), or the token lacks them"
    )]
    NoJobClaims,
    /// The keyed digest behind an implicit CI task's id could not be computed; the
    /// exchange fails rather than declare a task under an id another job could share.
    #[error("cannot derive the CI job's task id: {0}")]
    JobTaskId(String),
    #[error("the caller is over its per-principal quota of {}", .0.as_str())]
    QuotaExceeded(Quota),
    #[error("this single-use token was already presented (jti)")]
    TokenReplayed,
    /// A DPoP proof refused where the broker consumes its `jti` (a replay); mapped like
    /// every other DPoP refusal.
    #[error(transparent)]
    Dpop(crate::identity::dpop::DpopError),
    #[error("the store that records single-use tokens is unreachable: {0}")]
    SingleUseUnavailable(StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}
