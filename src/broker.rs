//! The whole flow, top to bottom. Every credential follows one path:
//!
//! verify (the caller is a `VerifiedCaller`) → authorize (owner, task active, request ⊆
//! scope, TTL ≤ the task's remaining life, Cedar `MintCredential`) → record (`pending`
//! lease, durable) → mint (provider) → activate (lease `active`) → audit (the API layer
//! writes the request's record before the credential leaves; if it cannot, the lease is
//! revoked and the request fails).
//!
//! A credential minted in process (a JWT Mayfly signs) has no upstream copy a crash could
//! leave behind, so record and activate are one write: mint → record (`active`, durable)
//! → audit. Either way nothing leaves the broker without a durable lease.

pub mod token_exchange;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use crate::action::{Action, Undo};
use crate::anomaly::{
    Action as Countermeasure, AnomalyEngine, Mode, Quota, Severity, Signal, Verdict,
};
use crate::audit::{AuditError, AuditEvent, AuditLog, AuditScope};
use crate::identity::{Principal, VerifiedCaller};
use crate::lease::{
    Lease, LeaseQuery, LeaseState, LeaseStore, Page, StoreError, TaskQuery, Transition,
};
use crate::policy::{PolicyDecision, PolicyEngine, PolicyError};
use crate::provider::jwt::JwtIssuer;
use crate::provider::{CredentialProvider, MintRequest, ProviderError, Providers};
use crate::revocation::{Revoker, TreeRevocation};
use crate::secret::Secret;
use crate::task::{
    CredentialRequest, Grant, LeaseId, ProviderKind, ScopeError, Task, TaskId, TaskRequest,
    TaskState,
};

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
    #[error("the caller is over its per-principal quota of {}", .0.as_str())]
    QuotaExceeded(Quota),
    #[error("this single-use token was already presented (jti)")]
    TokenReplayed,
    #[error("the store that records single-use tokens is unreachable: {0}")]
    SingleUseUnavailable(StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Points between "record" and "audit" where a process can die. Fault injection (tests
/// only — never settable from config) stops the flow there as a crash would: nothing
/// after the point runs, no cleanup, no revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    AfterPendingWrite,
    AfterMint,
    AfterActivate,
}

/// Returns true to "crash" at the point, for the lease given.
pub type FaultHook = Arc<dyn Fn(FaultPoint, &LeaseId) -> bool + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_task_ttl: Duration,
    pub max_lease_ttl: Duration,
    pub default_lease_ttl: Duration,
    /// How long a lease may stay `pending` before the reaper revokes it.
    pub pending_timeout: Duration,
    pub max_page: usize,
    /// Longest delegation chain: a task declared directly has depth 0.
    pub max_delegation_depth: usize,
    /// The share of a provider's rate budget one principal may use.
    pub principal_rate_share: f64,
}

pub use crate::approval::{Approval, ApprovalState};

/// What a credential request produced: a credential, or a request awaiting approval.
#[derive(Debug)]
pub enum Outcome {
    Issued(Issued),
    Pending(Approval),
}

/// `POST /v1/signals` body, validated.
#[derive(Debug, Clone)]
pub struct ExternalSignal {
    pub task: Option<TaskId>,
    pub principal: Option<Principal>,
    pub kind: String,
    pub severity: Severity,
    pub detail: String,
}

/// What `POST /v1/revoke` selects: exactly one criterion.
#[derive(Debug, Clone)]
pub enum BulkSelector {
    Principal(String),
    Provider(ProviderKind),
    TargetPrefix(String),
}

/// A credential ready to hand out, with its (active) lease.
#[derive(Debug)]
pub struct Issued {
    pub lease: Lease,
    pub credential: Secret<serde_json::Value>,
}

/// RFC 8693 token exchange for one CI job (`POST /v1/token`), already parsed.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    /// The `resource` / `audience`: the grant's target.
    pub target: String,
    /// The `scope`: the grant's actions.
    pub actions: Vec<String>,
    /// The job's claim values (e.g. `run_id`, `run_attempt`), in configured order.
    pub job: Vec<String>,
    /// The subject token's `exp`: the implicit task ends no later.
    pub subject_expires_at: OffsetDateTime,
    /// The issuer's `max_exchange_ttl`.
    pub max_task_ttl: Duration,
    /// RFC 8707 resources beyond `target` (validated URIs): the implicit task holds a
    /// grant for each, and the token's `aud` covers them all.
    pub resources: Vec<String>,
    /// RFC 7638 thumbprint of the DPoP key proved with the request.
    pub dpop_jkt: Option<String>,
}

/// The fingerprint an implicit CI task is bound to: the caller's principal and every
/// fact about its credential that Cedar can read as `context.posture` and keeps from
/// one token of a job to the next — method, trust domain, issuer and the whole
/// `posture.claims` record (all of `bearer::POSTURE_CLAIMS` the token carries). Not a
/// digest of the claims one policy happens to read: policies are reloaded while tasks
/// live, so every claim any policy could read is bound. Left out: the per-token claims
/// (`iat`, `exp`, `jti`; a retried job gets a fresh token) and the per-request facts
/// (`source_ip`, `credential_remaining_seconds`), which `DeclareTask` judges again
/// on every use instead.
pub fn claims_binding(caller: &VerifiedCaller) -> String {
    use sha2::{Digest, Sha256};
    let p = caller.posture();
    let doc = serde_json::json!({
        "v": 1,
        "principal": caller.principal().as_str(),
        "method": p.method.as_str(),
        "trust_domain": p.trust_domain,
        "issuer": p.issuer,
        "claims": p.claims,
    });
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(doc.to_string().as_bytes()))
    )
}

/// The implicit task of a CI job: the same job, claims and target always map to the same
/// task id, so a retried exchange reuses it instead of declaring another. The id is an
/// HMAC under a broker secret (`key`), so nobody can compute it from the job's public
/// claims; a job whose claims differ maps to another id.
pub fn job_task_id(
    key: &[u8; 32],
    owner: &Principal,
    job: &[String],
    target: &str,
    binding: &str,
) -> TaskId {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    let mut h = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    // Length-prefixed parts: no two different inputs share an encoding.
    let mut part = |b: &[u8]| {
        h.update(&(b.len() as u64).to_be_bytes());
        h.update(b);
    };
    part(b"mayfly ci job v2");
    part(owner.as_str().as_bytes());
    part(&(job.len() as u64).to_be_bytes());
    for j in job {
        part(j.as_bytes());
    }
    part(target.as_bytes());
    part(binding.as_bytes());
    let digest = h.finalize().into_bytes();
    let mut bits = [0u8; 16];
    bits.copy_from_slice(&digest[..16]);
    TaskId::from_bits(bits)
}

/// RFC 7662 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Introspection {
    Inactive,
    Active {
        claims: Box<crate::provider::jwt::AccessClaims>,
    },
}

pub struct Broker {
    pub(crate) store: Arc<dyn LeaseStore>,
    policy: Arc<PolicyEngine>,
    providers: Providers,
    revoker: Arc<Revoker>,
    jwt: Arc<JwtIssuer>,
    audit: AuditLog,
    operators: HashSet<String>,
    limits: Limits,
    faults: Option<FaultHook>,
    anomaly: Arc<AnomalyEngine>,
    dpop: Arc<crate::identity::dpop::DpopVerifier>,
    /// Keys implicit CI task ids (`job_task_id`); derived from the signing key, so every
    /// replica sharing that key finds the same job's task.
    ci_task_key: [u8; 32],
}

pub struct BrokerParts {
    pub store: Arc<dyn LeaseStore>,
    pub policy: Arc<PolicyEngine>,
    pub providers: Providers,
    pub revoker: Arc<Revoker>,
    pub jwt: Arc<JwtIssuer>,
    pub audit: AuditLog,
    pub operators: HashSet<String>,
    pub limits: Limits,
    pub faults: Option<FaultHook>,
    pub anomaly: Arc<AnomalyEngine>,
    /// Checks DPoP proofs (RFC 9449); its `jti` set is in the store.
    pub dpop: Arc<crate::identity::dpop::DpopVerifier>,
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

fn after(now: OffsetDateTime, d: Duration) -> OffsetDateTime {
    now + time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

pub(crate) fn check_reason(reason: &str) -> Result<(), BrokerError> {
    if reason.trim().is_empty()
        || reason.chars().count() > 512
        || reason.chars().any(char::is_control)
    {
        return Err(BrokerError::Reason);
    }
    Ok(())
}

fn note_decision(ev: &AuditScope, action: Action, d: &PolicyDecision) {
    metrics::counter!(
        "mayfly_policy_decisions_total",
        "action" => action.as_str(),
        "decision" => if d.allowed { "allow" } else { "deny" },
    )
    .increment(1);
    ev.set(|e| {
        e.action = Some(action);
        e.decision = Some(if d.allowed { "allow" } else { "deny" });
        e.policies.extend(d.policies.iter().cloned());
        if !d.errors.is_empty() {
            e.detail = Some(format!("policy evaluation errors: {}", d.errors.join("; ")));
        }
    });
}

impl Broker {
    pub fn new(p: BrokerParts) -> Self {
        let ci_task_key = p.jwt.derive_secret("mayfly ci task id v1");
        Self {
            store: p.store,
            policy: p.policy,
            providers: p.providers,
            revoker: p.revoker,
            jwt: p.jwt,
            audit: p.audit,
            operators: p.operators,
            limits: p.limits,
            faults: p.faults,
            dpop: p.dpop,
            ci_task_key,
            anomaly: p.anomaly,
        }
    }

    fn crash_at(&self, point: FaultPoint, lease: &LeaseId) -> Result<(), BrokerError> {
        match &self.faults {
            Some(hook) if hook(point, lease) => Err(BrokerError::InjectedCrash(point)),
            _ => Ok(()),
        }
    }

    pub fn jwt(&self) -> &JwtIssuer {
        &self.jwt
    }

    pub fn dpop(&self) -> &crate::identity::dpop::DpopVerifier {
        &self.dpop
    }

    /// Writes the request's audit record. If it cannot be written, every state change the
    /// request registered on its scope is taken back, newest first, and the request
    /// fails: nothing a request granted outlives a missing record. Revocations are not
    /// undone — they only take access away.
    pub async fn commit(&self, scope: &AuditScope) -> Result<(), AuditError> {
        let event = scope.snapshot();
        let undo = event.undo.clone();
        let Err(err) = self.audit.write(event).await else {
            return Ok(());
        };
        for u in undo.iter().rev() {
            self.undo(u).await;
        }
        Err(err)
    }

    async fn undo(&self, undo: &Undo) {
        const REASON: &str = "audit record could not be written";
        let result = match undo {
            Undo::RevokeLease(id) => self
                .revoker
                .revoke_lease(id, REASON)
                .await
                .map(drop)
                .map_err(BrokerError::from),
            Undo::EndTaskTree(id) => self
                .revoker
                .end_task_tree(id, TaskState::Revoked, REASON)
                .await
                .map(drop)
                .map_err(BrokerError::from),
            Undo::DenyApproval(id) => self.withdraw_approval(id, REASON).await,
        };
        if let Err(e) = result {
            // The lease stays revoke-requested or pending; the reaper finishes it.
            tracing::error!(?undo, error = %e, "cannot undo an unrecorded state change; the reaper will");
        }
    }

    pub fn max_page(&self) -> usize {
        self.limits.max_page
    }

    pub fn is_operator(&self, p: &Principal) -> bool {
        self.operators.contains(p.as_str())
    }

    pub fn require_operator(&self, caller: &VerifiedCaller) -> Result<(), BrokerError> {
        if self.is_operator(caller.principal()) {
            Ok(())
        } else {
            Err(BrokerError::NotOperator(caller.principal().to_string()))
        }
    }

    /// `/readyz`: the store answers and every provider is ready.
    pub async fn ready(&self) -> Result<(), BrokerError> {
        self.store.ping().await?;
        for p in self.providers.all() {
            p.ready().await?;
        }
        Ok(())
    }

    pub(crate) async fn load_task(&self, id: &TaskId) -> Result<Task, BrokerError> {
        self.store
            .task(id)
            .await?
            .ok_or_else(|| BrokerError::TaskNotFound(id.clone()))
    }

    fn require_active(task: &Task, now: OffsetDateTime) -> Result<(), BrokerError> {
        match task.state_at(now) {
            TaskState::Active => Ok(()),
            TaskState::Expired => Err(BrokerError::TaskExpired(task.id.clone())),
            s => Err(BrokerError::TaskNotActive {
                id: task.id.clone(),
                state: s.as_str(),
            }),
        }
    }

    /// `POST /v1/tasks`: Cedar `DeclareTask` for every grant; all must be allowed.
    pub async fn declare_task(
        &self,
        caller: &VerifiedCaller,
        req: TaskRequest,
        ev: &AuditScope,
    ) -> Result<Task, BrokerError> {
        self.declare_task_as(caller, req, TaskId::generate(), None, ev)
            .await
    }

    /// `declare_task` with a chosen id (token exchange derives it from the job).
    async fn declare_task_as(
        &self,
        caller: &VerifiedCaller,
        req: TaskRequest,
        id: TaskId,
        claims_binding: Option<String>,
        ev: &AuditScope,
    ) -> Result<Task, BrokerError> {
        let now = OffsetDateTime::now_utc();
        ev.set(|e| {
            e.action = Some(Action::DeclareTask);
            e.purpose = Some(req.purpose.clone());
        });
        if req.ttl > self.limits.max_task_ttl {
            return Err(BrokerError::TtlExceedsLimit {
                requested: secs(req.ttl),
                max: secs(self.limits.max_task_ttl),
            });
        }
        self.authorize_declare(caller, &req, now, ev)?;
        if !self.anomaly.admit(caller.principal(), Quota::Tasks).await? {
            return Err(BrokerError::QuotaExceeded(Quota::Tasks));
        }
        self.consume_single_use(caller).await?;
        let task = Task {
            id,
            owner: caller.principal().clone(),
            purpose: req.purpose,
            scope: req.scope,
            created_at: now,
            expires_at: after(now, req.ttl),
            parent: None,
            labels: req.labels,
            state: TaskState::Active,
            ended_at: None,
            end_reason: None,
            origin: Some(crate::task::Origin {
                source: caller.posture().source,
                credential_fingerprint: caller.posture().credential_fingerprint.clone(),
                claims_binding,
            }),
        };
        self.store.create_task(&task).await?;
        ev.undo_with(Undo::EndTaskTree(task.id.clone()));
        ev.set(|e| {
            e.task_id = Some(task.id.to_string());
            e.expires_at = Some(crate::api_time(task.expires_at));
        });
        Ok(task)
    }

    /// Cedar `DeclareTask` for every grant of `req`, for this caller now; all must allow.
    fn authorize_declare(
        &self,
        caller: &VerifiedCaller,
        req: &TaskRequest,
        now: OffsetDateTime,
        ev: &AuditScope,
    ) -> Result<(), BrokerError> {
        for grant in req.scope.grants() {
            self.providers.get(grant.provider)?;
            let d = self.policy.declare_task(caller, req, grant, now)?;
            note_decision(ev, Action::DeclareTask, &d);
            if !d.allowed {
                return Err(BrokerError::PolicyDenied {
                    action: Action::DeclareTask,
                    detail: Some(format!("{}: {}", grant.key(), d.why)),
                });
            }
        }
        Ok(())
    }

    /// Every use of an implicit CI task (request, complete, collect, delegate, read): the
    /// caller must carry the claims the task was declared with, and Cedar `DeclareTask`
    /// must still allow the task for this caller now, as if it were declared again.
    /// Tasks declared with `POST /v1/tasks` have no binding and pass untouched.
    pub(crate) fn reauthorize_implicit(
        &self,
        caller: &VerifiedCaller,
        task: &Task,
        now: OffsetDateTime,
        ev: &AuditScope,
    ) -> Result<(), BrokerError> {
        let Some(bound) = task.origin.as_ref().and_then(|o| o.claims_binding.as_ref()) else {
            return Ok(());
        };
        if *bound != claims_binding(caller) {
            return Err(BrokerError::TaskClaimsDiffer(task.id.clone()));
        }
        let req = TaskRequest {
            purpose: task.purpose.clone(),
            scope: task.scope.clone(),
            ttl: task.remaining(now),
            labels: task.labels.clone(),
        };
        self.authorize_declare(caller, &req, now, ev)
    }

    /// `POST /v1/token` (RFC 8693): a CI job's token becomes a `jwt` credential through
    /// the ordinary path — an implicit task (Cedar `DeclareTask`), then
    /// `request_credential` (Cedar `MintCredential`, sign, durable `active` lease).
    /// The task is keyed by the job's claims and the target, so it is declared once per
    /// job; its life is bounded by config and by the subject token's `exp`.
    pub async fn exchange(
        &self,
        caller: &VerifiedCaller,
        req: ExchangeRequest,
        ev: &AuditScope,
    ) -> Result<Outcome, BrokerError> {
        if req.job.is_empty() {
            return Err(BrokerError::NoJobClaims);
        }
        let now = OffsetDateTime::now_utc();
        // Several resources make one task: its key names them all (a URI has no space).
        let mut targets = vec![req.target.clone()];
        targets.extend(req.resources.iter().filter(|r| **r != req.target).cloned());
        let binding = claims_binding(caller);
        let id = job_task_id(
            &self.ci_task_key,
            caller.principal(),
            &req.job,
            &targets.join(" "),
            &binding,
        );
        // An existing task is re-authorized (binding and `DeclareTask`) by
        // `request_credential` below, like every other use of it.
        let task = match self.store.task(&id).await? {
            Some(t) => t,
            None => {
                let left = (req.subject_expires_at - now).max(time::Duration::seconds(1));
                let ttl = Duration::try_from(left)
                    .unwrap_or(Duration::from_secs(1))
                    .min(req.max_task_ttl)
                    .min(self.limits.max_task_ttl);
                let job = req.job.join("/");
                let raw = crate::task::RawTaskRequest {
                    purpose: format!("CI job {job}"),
                    scope: targets
                        .iter()
                        .map(|t| crate::task::RawGrant {
                            provider: ProviderKind::Jwt.as_str().to_string(),
                            target: t.clone(),
                            actions: req.actions.clone(),
                            resources: Vec::new(),
                        })
                        .collect(),
                    ttl: serde_json::Value::from(ttl.as_secs().max(1)),
                    labels: [
                        ("mayfly.exchange".to_string(), "rfc8693".to_string()),
                        ("ci.job".to_string(), job.chars().take(64).collect()),
                    ]
                    .into_iter()
                    .collect(),
                };
                let treq = TaskRequest::try_from(raw)?;
                match self
                    .declare_task_as(caller, treq, id.clone(), Some(binding), ev)
                    .await
                {
                    Ok(t) => t,
                    // A concurrent exchange for the same job declared it first.
                    Err(BrokerError::Store(StoreError::AlreadyExists(_))) => {
                        self.load_task(&id).await?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let creq = CredentialRequest {
            provider: ProviderKind::Jwt,
            target: req.target,
            actions: Some(req.actions.into_iter().collect()),
            resources: None,
            ttl: None,
            resource: targets,
            dpop_jkt: req.dpop_jkt,
        };
        self.request_credential(caller, &task.id, creq, ev).await
    }

    /// `GET /v1/tasks/{id}`: the owner or an operator.
    pub async fn task_view(
        &self,
        caller: &VerifiedCaller,
        id: &TaskId,
        ev: &AuditScope,
    ) -> Result<(Task, Vec<Lease>), BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::ReadTask);
            e.task_id = Some(id.to_string());
        });
        let task = self.load_task(id).await?;
        if !self.is_operator(caller.principal()) {
            if &task.owner != caller.principal() {
                return Err(BrokerError::NotTaskOwner(id.clone()));
            }
            self.reauthorize_implicit(caller, &task, OffsetDateTime::now_utc(), ev)?;
        }
        let leases = self.store.task_leases(id).await?;
        Ok((task, leases))
    }

    /// `POST /v1/tasks/{id}/credentials`: the heart of Mayfly. Every outcome is also an
    /// observation for anomaly detection, whose verdicts are applied before returning.
    pub async fn request_credential(
        &self,
        caller: &VerifiedCaller,
        task_id: &TaskId,
        req: CredentialRequest,
        ev: &AuditScope,
    ) -> Result<Outcome, BrokerError> {
        let result = self
            .request_credential_inner(caller, task_id, req, ev, false)
            .await;
        let signal = match &result {
            Ok(_) => Some(Signal::Request),
            Err(BrokerError::OutOfScope(_)) => Some(Signal::OutOfScope),
            Err(BrokerError::PolicyDenied { .. }) => Some(Signal::PolicyDenied),
            Err(BrokerError::TaskNotActive { .. } | BrokerError::TaskExpired(_)) => {
                Some(Signal::EndedTaskUse)
            }
            _ => None,
        };
        if let Some(signal) = signal {
            self.observe(caller.principal(), Some(task_id), signal)
                .await;
        }
        result
    }

    /// Takes one request from the provider's global budget and from the principal's share
    /// of it (both buckets in the store), or refuses with how long to wait.
    async fn admit(&self, kind: ProviderKind, principal: &Principal) -> Result<(), BrokerError> {
        let Some(limit) = self.providers.budget(kind) else {
            return Ok(());
        };
        let own = crate::provider::principal_limit(limit, self.limits.principal_rate_share);
        // The principal's bucket first: an agent over its share does not spend the
        // provider's budget that others need.
        let taken = match self
            .store
            .take_token(&format!("principal:{kind}:{principal}"), own)
            .await?
        {
            Ok(()) => {
                self.store
                    .take_token(&format!("provider:{kind}"), limit)
                    .await?
            }
            refused => refused,
        };
        taken.map_err(|wait| {
            metrics::counter!("mayfly_provider_rate_limited_total", "provider" => kind.as_str())
                .increment(1);
            BrokerError::Provider(ProviderError::RateLimited {
                provider: kind,
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            })
        })
    }

    /// Reports an observation to anomaly detection and carries out what it decides. The
    /// request's own outcome is already settled; a store failure here is logged and
    /// counted (`mayfly_anomaly_store_errors_total`), the next request re-reads state.
    async fn observe(&self, principal: &Principal, task: Option<&TaskId>, signal: Signal) {
        match self.anomaly.observe(principal, task, signal).await {
            Ok(verdicts) => self.apply_verdicts(principal, task, verdicts).await,
            Err(err) => {
                metrics::counter!("mayfly_anomaly_store_errors_total").increment(1);
                tracing::error!(error = %err, "cannot record an anomaly observation");
            }
        }
    }

    /// Consumes the caller's single-use `jti` in the shared store — once per request,
    /// and only once the request has passed authorization, so a refused request never
    /// burns it and a token nobody authorized never takes room in the store. Fails
    /// closed when the store cannot answer.
    pub async fn consume_single_use(&self, caller: &VerifiedCaller) -> Result<(), BrokerError> {
        match caller.single_use() {
            Some(su) => self.consume(su).await,
            None => Ok(()),
        }
    }

    /// `consume_single_use` for a token's `SingleUse` (the API layer's last check).
    pub async fn consume(&self, su: &crate::identity::SingleUse) -> Result<(), BrokerError> {
        if !su.claim() {
            return Ok(());
        }
        match self.store.insert_once(&su.key, su.until).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                metrics::counter!("mayfly_single_use_replays_total").increment(1);
                Err(BrokerError::TokenReplayed)
            }
            Err(e) => Err(BrokerError::SingleUseUnavailable(e)),
        }
    }

    /// Records each fired rule and, in enforce mode, carries out its action. A revocation
    /// happens here, inside the request that tripped the rule.
    async fn apply_verdicts(
        &self,
        principal: &Principal,
        task: Option<&TaskId>,
        verdicts: Vec<Verdict>,
    ) {
        for v in verdicts {
            let mut e = AuditEvent::new("anomaly.triggered");
            e.rule = Some(v.rule.clone());
            e.principal = Some(principal.to_string());
            e.task_id = task.map(ToString::to_string);
            e.outcome = Some(format!(
                "{} ({})",
                v.action.as_str(),
                if v.mode == Mode::Enforce {
                    "enforced"
                } else {
                    "audit only"
                }
            ));
            e.detail = Some(format!(
                "{} x{}{}",
                v.signal,
                v.count,
                if v.per_principal {
                    " (across the principal's tasks)"
                } else {
                    ""
                }
            ));
            metrics::counter!("mayfly_anomaly_triggers_total", "rule" => v.rule.clone(), "mode" => if v.mode == Mode::Enforce { "enforce" } else { "audit" }).increment(1);
            tracing::warn!(rule = %v.rule, action = v.action.as_str(), principal = %principal, "anomaly rule fired");
            if let Err(err) = self.audit.write(e).await {
                tracing::error!(error = %err, "cannot audit an anomaly verdict");
            }
            if v.mode == Mode::Audit {
                continue;
            }
            let reason = format!("anomaly: rule {}", v.rule);
            let outcome = match (v.action, task) {
                (Countermeasure::Audit, _) => Ok(()),
                (Countermeasure::Deny, Some(t)) => self.anomaly.deny(t).await,
                (Countermeasure::RevokeTask, Some(t)) => self
                    .revoker
                    .end_task_tree(t, TaskState::Revoked, &reason)
                    .await
                    .map(|_| ()),
                (Countermeasure::RevokePrincipal, _)
                | (Countermeasure::RevokeTask | Countermeasure::Deny, None) => self
                    .revoke_principal(principal.as_str(), &reason)
                    .await
                    .map(|_| ()),
            };
            if let Err(err) = outcome {
                tracing::error!(error = %err, rule = %v.rule, "anomaly action failed");
            }
        }
    }

    /// Ends every active task of `principal` (with sub-tasks) and revokes its leases.
    async fn revoke_principal(
        &self,
        principal: &str,
        reason: &str,
    ) -> Result<TreeRevocation, StoreError> {
        let mut out = TreeRevocation::default();
        let q = TaskQuery {
            principal: Some(principal.to_string()),
            state: Some(TaskState::Active),
            limit: usize::MAX,
            ..Default::default()
        };
        for task in self.store.tasks(&q).await?.items {
            let t = self
                .revoker
                .end_task_tree(&task.id, TaskState::Revoked, reason)
                .await?;
            out.tasks.extend(t.tasks);
            out.leases.extend(t.leases);
        }
        let q = LeaseQuery {
            principal: Some(principal.to_string()),
            limit: usize::MAX,
            ..Default::default()
        };
        for lease in self.store.leases(&q).await?.items {
            if !lease.state.is_terminal() {
                out.leases
                    .push(self.revoker.revoke_lease(&lease.id, reason).await?.id);
            }
        }
        Ok(out)
    }

    /// `POST /v1/signals` (operators): an external anomaly signal about a task or a
    /// principal. Returns the rules it made fire (already applied).
    pub async fn signal(
        &self,
        caller: &VerifiedCaller,
        sig: ExternalSignal,
        ev: &AuditScope,
    ) -> Result<Vec<Verdict>, BrokerError> {
        let ExternalSignal {
            task,
            principal,
            kind,
            severity,
            detail,
        } = sig;
        ev.set(|e| {
            e.action = Some(Action::Signal);
            e.task_id = task.as_ref().map(ToString::to_string);
            e.detail = Some(format!("{kind} ({severity:?}): {detail}"));
        });
        self.require_operator(caller)?;
        let principal = match (&task, principal) {
            (Some(t), None) => self.load_task(t).await?.owner,
            (None, Some(p)) => p,
            _ => return Err(BrokerError::SignalTarget),
        };
        ev.set(|e| e.principal = Some(principal.to_string()));
        let verdicts = self
            .anomaly
            .observe(
                &principal,
                task.as_ref(),
                Signal::External { kind, severity },
            )
            .await?;
        self.apply_verdicts(&principal, task.as_ref(), verdicts.clone())
            .await;
        Ok(verdicts)
    }

    pub(crate) async fn request_credential_inner(
        &self,
        caller: &VerifiedCaller,
        task_id: &TaskId,
        req: CredentialRequest,
        ev: &AuditScope,
        approved: bool,
    ) -> Result<Outcome, BrokerError> {
        let now = OffsetDateTime::now_utc();
        ev.set(|e| {
            e.action = Some(Action::MintCredential);
            e.task_id = Some(task_id.to_string());
            e.provider = Some(req.provider.as_str());
            e.target = Some(req.target.clone());
        });

        // Authorize: owner, active, inside the scope, inside the task's life, policy.
        let task = self.load_task(task_id).await?;
        ev.set(|e| e.purpose = Some(task.purpose.clone()));
        if &task.owner != caller.principal() {
            return Err(BrokerError::NotTaskOwner(task_id.clone()));
        }
        self.reauthorize_implicit(caller, &task, now, ev)?;
        Self::require_active(&task, now)?;
        let gate = self
            .anomaly
            .request_gate(caller.principal(), task_id)
            .await?;
        if gate.over_quota {
            return Err(BrokerError::QuotaExceeded(Quota::Requests));
        }
        if gate.denied {
            return Err(BrokerError::AnomalyDenied(task_id.clone()));
        }
        let mut risk_now = (gate.risk, gate.signals);
        if let Some(origin) = &task.origin {
            let p = caller.posture();
            if origin.source != p.source
                || origin.credential_fingerprint != p.credential_fingerprint
            {
                self.observe(caller.principal(), Some(task_id), Signal::PostureChange)
                    .await;
                risk_now = self.anomaly.risk(caller.principal()).await?;
                // An enforced rule may just have ended the task.
                Self::require_active(&self.load_task(task_id).await?, now)?;
            }
        }
        let held = task
            .scope
            .grant_for(req.provider, &req.target)
            .ok_or_else(|| {
                BrokerError::OutOfScope(format!(
                    "task {task_id} holds no grant for {}:{}",
                    req.provider, req.target
                ))
            })?;
        let wanted: Grant = req.resolve(held);
        ev.set(|e| e.actions = Some(wanted.actions.iter().cloned().collect()));
        if !held.covers(&wanted) {
            return Err(BrokerError::OutOfScope(format!(
                "requested actions/resources exceed the task's grant for {}",
                held.key()
            )));
        }
        // RFC 8707: every resource must be a target the task may reach with these
        // actions; together they become the token's audience.
        for r in &req.resource {
            let fits = req.provider == ProviderKind::Jwt
                && task.scope.grant_for(ProviderKind::Jwt, r).is_some_and(|g| {
                    g.covers(&Grant {
                        target: r.clone(),
                        ..wanted.clone()
                    })
                });
            if !fits {
                return Err(BrokerError::InvalidTarget(r.clone()));
            }
        }
        let remaining = task.remaining(now);
        let ttl = req
            .ttl
            .unwrap_or_else(|| self.limits.default_lease_ttl.min(remaining));
        if ttl > self.limits.max_lease_ttl {
            return Err(BrokerError::TtlExceedsLimit {
                requested: secs(ttl),
                max: secs(self.limits.max_lease_ttl),
            });
        }
        if ttl > remaining {
            return Err(BrokerError::TtlExceedsTask {
                requested: secs(ttl),
                remaining: secs(remaining),
            });
        }
        let (risk, signals) = risk_now;
        ev.set(|e| e.risk = Some(risk));
        let d = self.policy.mint(
            caller,
            &crate::policy::MintContext {
                task: &task,
                request: &wanted,
                ttl,
                risk,
                signals: &signals,
            },
            now,
        )?;
        note_decision(ev, Action::MintCredential, &d);
        if !d.allowed {
            return Err(BrokerError::PolicyDenied {
                action: Action::MintCredential,
                detail: Some(format!("{}: {}", wanted.key(), d.why)),
            });
        }
        let provider = self.providers.get(req.provider)?.clone();
        self.consume_single_use(caller).await?;
        if d.needs_approval && !approved {
            match self.approval_gate(caller, task_id, &req, now, ev).await? {
                crate::approval::Gate::Hold(a) => return Ok(Outcome::Pending(*a)),
                crate::approval::Gate::Collected => {}
            }
        }

        // Over the provider's request budget: refuse before anything is written.
        self.admit(req.provider, caller.principal()).await?;

        let lease = Lease::pending(&task.id, caller.principal(), &wanted, now, after(now, ttl));
        ev.set(|e| {
            e.lease_id = Some(lease.id.to_string());
            e.expires_at = Some(crate::api_time(lease.expires_at));
        });
        let delegators = self.delegators(&task).await?;
        if !delegators.is_empty() {
            let (sub, act) =
                crate::provider::jwt::delegation_claims(caller.principal(), &delegators);
            ev.set(|e| {
                e.subject = Some(sub);
                e.act = act;
            });
        }
        let issued = if provider.mints_in_process() {
            self.mint_in_process(provider.as_ref(), lease, &task, caller, &delegators, &req)
                .await?
        } else {
            self.mint_upstream(provider.as_ref(), lease, &task, caller, &delegators, &req)
                .await?
        };
        ev.undo_with(Undo::RevokeLease(issued.lease.id.clone()));
        ev.set(|e| e.credential_fingerprint = issued.lease.fingerprint.clone());
        metrics::counter!("mayfly_leases_issued_total", "provider" => issued.lease.provider.as_str())
            .increment(1);
        self.crash_at(FaultPoint::AfterActivate, &issued.lease.id)?;
        Ok(Outcome::Issued(issued))
    }

    /// A credential that exists only in this process until it is returned (a JWT Mayfly
    /// signs): mint first, then record the lease once, already `active`. A crash before
    /// the write loses a credential nobody ever held, so there is nothing to revoke and no
    /// `pending` record is needed; the caller still gets nothing without a durable lease.
    async fn mint_in_process(
        &self,
        provider: &dyn CredentialProvider,
        mut lease: Lease,
        task: &Task,
        caller: &VerifiedCaller,
        delegators: &[Principal],
        binding: &CredentialRequest,
    ) -> Result<Issued, BrokerError> {
        let minted = provider
            .mint(MintRequest {
                lease: &lease,
                task,
                caller,
                delegation: delegators,
                audience: &binding.resource,
                dpop_jkt: binding.dpop_jkt.as_deref(),
            })
            .await?;
        self.crash_at(FaultPoint::AfterMint, &lease.id)?;
        lease.state = LeaseState::Active;
        lease.fingerprint = Some(minted.fingerprint.clone());
        lease.handle = minted.handle.clone();
        self.store.put_new(&lease, lease.expires_at).await?;
        self.require_still_active(&task.id, &lease.id).await?;
        Ok(Issued {
            lease,
            credential: minted.credential,
        })
    }

    /// A completion that committed before our lease was written would not have seen it:
    /// look again now that the lease is visible to any later completion, and revoke it if
    /// the task has ended meanwhile.
    async fn require_still_active(
        &self,
        task: &TaskId,
        lease: &LeaseId,
    ) -> Result<(), BrokerError> {
        let current = self.load_task(task).await?;
        if let Err(e) = Self::require_active(&current, OffsetDateTime::now_utc()) {
            self.revoker
                .revoke_lease(lease, "task ended during mint")
                .await?;
            return Err(e);
        }
        Ok(())
    }

    /// A credential created upstream (Vault, STS): the lease exists, durably and
    /// `pending`, before the credential does, so a crash at any point leaves a record
    /// the reaper revokes.
    async fn mint_upstream(
        &self,
        provider: &dyn CredentialProvider,
        lease: Lease,
        task: &Task,
        caller: &VerifiedCaller,
        delegators: &[Principal],
        binding: &CredentialRequest,
    ) -> Result<Issued, BrokerError> {
        self.store
            .put_new(&lease, after(lease.issued_at, self.limits.pending_timeout))
            .await?;
        self.crash_at(FaultPoint::AfterPendingWrite, &lease.id)?;
        self.require_still_active(&task.id, &lease.id).await?;

        // Mint, carrying the delegation chain into the credential.
        let minted = match provider
            .mint(MintRequest {
                lease: &lease,
                task,
                caller,
                delegation: delegators,
                audience: &binding.resource,
                dpop_jkt: binding.dpop_jkt.as_deref(),
            })
            .await
        {
            Ok(m) => m,
            Err(err) if err.minted_nothing() => {
                self.revoker
                    .discard_pending(&lease.id, "mint refused")
                    .await?;
                return Err(err.into());
            }
            Err(err) => {
                // The provider may have minted before failing: revoke as if it had.
                self.revoker.revoke_lease(&lease.id, "mint failed").await?;
                return Err(err.into());
            }
        };

        self.crash_at(FaultPoint::AfterMint, &lease.id)?;

        // Activate.
        let mut t = Transition::new(
            lease.id.clone(),
            &[LeaseState::Pending],
            LeaseState::Active,
            OffsetDateTime::now_utc(),
        );
        t.fingerprint = Some(minted.fingerprint.clone());
        t.handle = minted.handle.clone();
        t.due_at = Some(lease.expires_at);
        let active = match self.store.transition(t).await {
            Ok(l) if l.state == LeaseState::Active => l,
            Ok(_) | Err(StoreError::InvalidTransition { .. }) => {
                return Err(BrokerError::RevokedDuringMint(lease.id));
            }
            Err(e) => {
                // Not activated: the pending lease stays and the reaper revokes it.
                return Err(e.into());
            }
        };
        // Providers that minted short-lived (crash safety) extend the credential now that
        // the lease and its handle are durable.
        if let Err(err) = provider.activated(&active).await {
            self.revoker
                .revoke_lease(&active.id, "activation at the provider failed")
                .await?;
            return Err(err.into());
        }
        Ok(Issued {
            lease: active,
            credential: minted.credential,
        })
    }

    /// Owners of the tasks above `task`, nearest first.
    async fn delegators(&self, task: &Task) -> Result<Vec<Principal>, BrokerError> {
        let mut out = Vec::new();
        let mut parent = task.parent.clone();
        while let Some(id) = parent {
            // A chain longer than the limit cannot exist; stop at it regardless.
            if out.len() > self.limits.max_delegation_depth {
                break;
            }
            let p = self.load_task(&id).await?;
            out.push(p.owner.clone());
            parent = p.parent.clone();
        }
        Ok(out)
    }

    /// `POST /v1/tasks/{id}/delegate`: a sub-task for another principal, never wider
    /// than the parent's scope, never outliving it, never deeper than the limit, and
    /// allowed by Cedar `DelegateTask`.
    pub async fn delegate_task(
        &self,
        caller: &VerifiedCaller,
        parent_id: &TaskId,
        req: crate::task::DelegateRequest,
        ev: &AuditScope,
    ) -> Result<Task, BrokerError> {
        let now = OffsetDateTime::now_utc();
        ev.set(|e| {
            e.action = Some(Action::DelegateTask);
            e.task_id = Some(parent_id.to_string());
            e.purpose = Some(req.task.purpose.clone());
            e.detail = Some(format!("to {}", req.principal));
        });
        let parent = self.load_task(parent_id).await?;
        if &parent.owner != caller.principal() {
            return Err(BrokerError::NotTaskOwner(parent_id.clone()));
        }
        self.reauthorize_implicit(caller, &parent, now, ev)?;
        Self::require_active(&parent, now)?;
        if !parent.scope.covers(&req.task.scope) {
            self.observe(caller.principal(), Some(parent_id), Signal::DelegationWider)
                .await;
            return Err(BrokerError::DelegationWider(format!(
                "task {parent_id} does not hold every grant requested"
            )));
        }
        let remaining = parent.remaining(now);
        if req.task.ttl > remaining {
            return Err(BrokerError::TtlExceedsTask {
                requested: secs(req.task.ttl),
                remaining: secs(remaining),
            });
        }
        let depth = self.delegators(&parent).await?.len() + 1;
        if depth > self.limits.max_delegation_depth {
            return Err(BrokerError::DelegationTooDeep {
                depth,
                max: self.limits.max_delegation_depth,
            });
        }
        let d = self
            .policy
            .delegate(caller, &req.principal, &req.task, depth, now)?;
        note_decision(ev, Action::DelegateTask, &d);
        if !d.allowed {
            return Err(BrokerError::PolicyDenied {
                action: Action::DelegateTask,
                detail: Some(format!("{}: {}", req.principal, d.why)),
            });
        }
        let child = Task {
            id: TaskId::generate(),
            owner: req.principal,
            purpose: req.task.purpose,
            scope: req.task.scope,
            created_at: now,
            expires_at: after(now, req.task.ttl).min(parent.expires_at),
            parent: Some(parent.id.clone()),
            labels: req.task.labels,
            state: TaskState::Active,
            ended_at: None,
            end_reason: None,
            origin: None,
        };
        self.store.create_task(&child).await?;
        ev.undo_with(Undo::EndTaskTree(child.id.clone()));
        // The parent may have ended while the child was being written: end the child too.
        let current = self.load_task(parent_id).await?;
        if let Err(e) = Self::require_active(&current, OffsetDateTime::now_utc()) {
            self.revoker
                .end_task_tree(
                    &child.id,
                    TaskState::Revoked,
                    "parent ended during delegation",
                )
                .await?;
            return Err(e);
        }
        ev.set(|e| {
            e.detail = Some(format!("sub-task {} for {}", child.id, child.owner));
            e.expires_at = Some(crate::api_time(child.expires_at));
        });
        Ok(child)
    }

    /// `POST /v1/tasks/{id}/complete`: the owner ends its task; every lease of the task
    /// and of its sub-tasks is revoked.
    pub async fn complete_task(
        &self,
        caller: &VerifiedCaller,
        id: &TaskId,
        ev: &AuditScope,
    ) -> Result<TreeRevocation, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::CompleteTask);
            e.task_id = Some(id.to_string());
        });
        let task = self.load_task(id).await?;
        if &task.owner != caller.principal() {
            return Err(BrokerError::NotTaskOwner(id.clone()));
        }
        self.reauthorize_implicit(caller, &task, OffsetDateTime::now_utc(), ev)?;
        if matches!(task.state, TaskState::Revoked) {
            return Err(BrokerError::TaskNotActive {
                id: id.clone(),
                state: task.state.as_str(),
            });
        }
        let out = self
            .revoker
            .end_task_tree(id, TaskState::Completed, "task completed")
            .await?;
        ev.set(|e| e.revoked = out.leases.iter().map(ToString::to_string).collect());
        Ok(out)
    }

    /// `POST /v1/tasks/{id}/revoke` (operators): cascades to sub-tasks.
    pub async fn revoke_task(
        &self,
        caller: &VerifiedCaller,
        id: &TaskId,
        reason: &str,
        ev: &AuditScope,
    ) -> Result<TreeRevocation, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::RevokeTask);
            e.task_id = Some(id.to_string());
            e.reason = Some(reason.to_string());
        });
        self.require_operator(caller)?;
        check_reason(reason)?;
        self.load_task(id).await?;
        let out = self
            .revoker
            .end_task_tree(id, TaskState::Revoked, reason)
            .await?;
        ev.set(|e| e.revoked = out.leases.iter().map(ToString::to_string).collect());
        Ok(out)
    }

    /// `POST /v1/leases/{id}/revoke` (operators).
    pub async fn revoke_lease(
        &self,
        caller: &VerifiedCaller,
        id: &LeaseId,
        reason: &str,
        ev: &AuditScope,
    ) -> Result<Lease, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::RevokeLease);
            e.lease_id = Some(id.to_string());
            e.reason = Some(reason.to_string());
        });
        self.require_operator(caller)?;
        check_reason(reason)?;
        let lease = match self.revoker.revoke_lease(id, reason).await {
            Err(StoreError::NotFound(_)) => return Err(BrokerError::LeaseNotFound(id.clone())),
            other => other?,
        };
        ev.set(|e| e.task_id = Some(lease.task_id.to_string()));
        Ok(lease)
    }

    /// `POST /v1/revoke` (operators): everything of a principal (its tasks, their sub-tasks
    /// and its leases), or every lease of a provider or under a target prefix.
    pub async fn bulk_revoke(
        &self,
        caller: &VerifiedCaller,
        sel: BulkSelector,
        reason: &str,
        ev: &AuditScope,
    ) -> Result<TreeRevocation, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::BulkRevoke);
            e.reason = Some(reason.to_string());
            e.detail = Some(format!("{sel:?}"));
        });
        self.require_operator(caller)?;
        check_reason(reason)?;
        let mut out = TreeRevocation::default();
        if let BulkSelector::Principal(p) = &sel {
            let q = TaskQuery {
                principal: Some(p.clone()),
                state: Some(TaskState::Active),
                limit: usize::MAX,
                ..Default::default()
            };
            for task in self.store.tasks(&q).await?.items {
                let t = self
                    .revoker
                    .end_task_tree(&task.id, TaskState::Revoked, reason)
                    .await?;
                out.tasks.extend(t.tasks);
                out.leases.extend(t.leases);
            }
        }
        let q = LeaseQuery {
            principal: match &sel {
                BulkSelector::Principal(p) => Some(p.clone()),
                _ => None,
            },
            provider: match &sel {
                BulkSelector::Provider(p) => Some(*p),
                _ => None,
            },
            limit: usize::MAX,
            ..Default::default()
        };
        for lease in self.store.leases(&q).await?.items {
            let selected = match &sel {
                BulkSelector::TargetPrefix(prefix) => lease.target.starts_with(prefix.as_str()),
                _ => true,
            };
            if selected && !lease.state.is_terminal() {
                let l = self.revoker.revoke_lease(&lease.id, reason).await?;
                out.leases.push(l.id);
            }
        }
        ev.set(|e| e.revoked = out.leases.iter().map(ToString::to_string).collect());
        Ok(out)
    }

    /// `GET /v1/leases/{id}` (operators).
    pub async fn lease(
        &self,
        caller: &VerifiedCaller,
        id: &LeaseId,
        ev: &AuditScope,
    ) -> Result<Lease, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::ReadLease);
            e.lease_id = Some(id.to_string());
        });
        self.require_operator(caller)?;
        self.store
            .lease(id)
            .await?
            .ok_or_else(|| BrokerError::LeaseNotFound(id.clone()))
    }

    /// `GET /v1/leases` (operators).
    pub async fn leases(
        &self,
        caller: &VerifiedCaller,
        q: LeaseQuery,
        ev: &AuditScope,
    ) -> Result<Page<Lease>, BrokerError> {
        ev.set(|e| e.action = Some(Action::ListLeases));
        self.require_operator(caller)?;
        Ok(self.store.leases(&q).await?)
    }

    /// `GET /v1/tasks` (operators).
    pub async fn tasks(
        &self,
        caller: &VerifiedCaller,
        q: TaskQuery,
        ev: &AuditScope,
    ) -> Result<Page<Task>, BrokerError> {
        ev.set(|e| e.action = Some(Action::ListTasks));
        self.require_operator(caller)?;
        Ok(self.store.tasks(&q).await?)
    }

    /// `POST /v1/introspect` (RFC 7662): active only while the token's lease is active,
    /// unexpired and its task is active.
    pub async fn introspect(
        &self,
        token: &str,
        ev: &AuditScope,
    ) -> Result<Introspection, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::Introspect);
            e.credential_fingerprint = Some(crate::secret::fingerprint(token.as_bytes()));
        });
        let Ok(claims) = self.jwt.verify(token) else {
            return Ok(Introspection::Inactive);
        };
        let Ok(lease_id) = claims.jti.parse::<LeaseId>() else {
            return Ok(Introspection::Inactive);
        };
        ev.set(|e| e.lease_id = Some(lease_id.to_string()));
        let now = OffsetDateTime::now_utc();
        let Some(lease) = self.store.lease(&lease_id).await? else {
            return Ok(Introspection::Inactive);
        };
        let live = lease.is_live(now)
            && lease.provider == ProviderKind::Jwt
            && claims.holder() == Some(lease.principal.as_str())
            && now.unix_timestamp() < claims.exp;
        if !live {
            return Ok(Introspection::Inactive);
        }
        let task = self.load_task(&lease.task_id).await?;
        if task.state_at(now) != TaskState::Active {
            return Ok(Introspection::Inactive);
        }
        ev.set(|e| {
            e.subject = Some(claims.sub.clone());
            e.act = claims.act.clone();
        });
        Ok(Introspection::Active {
            claims: Box::new(claims),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AuthMethod, Posture};

    fn ci_caller(token_fp: &str, workflow: &str) -> VerifiedCaller {
        let principal =
            Principal::parse("https://token.actions.example#repo:acme/app:ref:refs/heads/main")
                .expect("principal");
        let claims = [
            ("run_id", "79"),
            ("run_attempt", "1"),
            ("job_workflow_ref", workflow),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        VerifiedCaller::for_tests(
            principal,
            Posture {
                method: AuthMethod::Oidc,
                trust_domain: String::new(),
                source: None,
                credential_not_after: OffsetDateTime::UNIX_EPOCH,
                credential_fingerprint: token_fp.to_string(),
                issuer: Some("https://token.actions.example".into()),
                claims,
            },
        )
    }

    /// The binding covers the claims Cedar reads, not the token: a fresh token of the
    /// same job binds the same, another job of the run (same `sub`) does not.
    #[test]
    fn the_claims_binding_follows_the_claims_not_the_token() {
        let deploy = ci_caller("sha256:aa", "deploy.yml");
        let deploy_fresh_token = ci_caller("sha256:bb", "deploy.yml");
        let tests = ci_caller("sha256:aa", "tests.yml");
        assert_eq!(claims_binding(&deploy), claims_binding(&deploy_fresh_token));
        assert_ne!(claims_binding(&deploy), claims_binding(&tests));
    }

    /// Implicit task ids are keyed: stable for one key and one job, different under
    /// another key (nobody without the key computes them) and for other claims.
    #[test]
    fn implicit_task_ids_need_the_key_and_follow_the_binding() {
        let caller = ci_caller("sha256:aa", "deploy.yml");
        let job = vec!["79".to_string(), "1".to_string()];
        let b = claims_binding(&caller);
        let id = |key: [u8; 32], binding: &str| {
            job_task_id(&key, caller.principal(), &job, "https://t", binding)
        };
        assert_eq!(id([1; 32], &b), id([1; 32], &b));
        assert_ne!(id([1; 32], &b), id([2; 32], &b));
        assert_ne!(id([1; 32], &b), id([1; 32], "sha256:other"));
        // Part boundaries are length-prefixed: moving bytes between parts changes the id.
        let split = |a: &str, b: &str| {
            job_task_id(
                &[1; 32],
                caller.principal(),
                &[a.into(), b.into()],
                "t",
                "x",
            )
        };
        assert_ne!(split("7", "91"), split("79", "1"));
        assert!(id([1; 32], &b).as_str().parse::<TaskId>().is_ok());
    }
}
