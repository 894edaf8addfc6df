//! The whole flow, top to bottom. Every credential follows one path:
//!
//! verify (the caller is a `VerifiedCaller`) → authorize (owner, task active, anomaly
//! screen, request ⊆ scope, TTL ≤ the task's remaining life, Cedar `MintCredential`),
//! which yields an `AuthorizedMint`, the only thing `issue` accepts → issue: record
//! (`pending` lease, durable) → mint (provider) → activate (lease `active`) → commit
//! (`Broker::commit` writes the request's audit record before the credential leaves; if
//! it cannot, the lease is revoked and the request fails).
//!
//! A credential minted in process (a JWT Mayfly signs) has no upstream copy a crash could
//! leave behind, so record and activate are one write: mint → record (`active`, durable)
//! → commit. Either way nothing leaves the broker without a durable lease.
//!
//! The other operations live beside the flow: tasks (`tasks`), a CI job's implicit task
//! (`ci_job`), step-up approvals (`approvals`), anomaly verdicts (`verdicts`), operator
//! revocation and listings (`operator`), and the token surface — introspection, JWKS,
//! DPoP (`tokens`). The two ways of minting are in `mint`.

mod approvals;
mod ci_job;
mod error;
mod mint;
mod operator;
mod tasks;
pub mod token_exchange;
mod tokens;
mod verdicts;

use crate::metrics::Handles;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use crate::action::{Action, Undo};
use crate::anomaly::{AnomalyEngine, Quota, Signal};
use crate::audit::{AuditError, AuditEvent, AuditLog, AuditScope};
use crate::identity::{Principal, VerifiedCaller};
use crate::lease::{Joined, Lease, LeaseStore, NewLease};
use crate::policy::{Decision, MintContext, PolicyDecision, PolicyEngine};
use crate::provider::jwt::JwtIssuer;
use crate::provider::{CredentialProvider, ProviderError, Providers};
use crate::revocation::Revoker;
use crate::secret::Secret;
use crate::task::{CredentialRequest, Grant, LeaseId, ProviderKind, Task, TaskId, TaskState};

pub use crate::approval::{Approval, ApprovalState};
pub use approvals::ApprovalDecision;
pub use ci_job::{claims_binding, job_task_id};
pub use error::BrokerError;
pub use operator::BulkSelector;
pub use tokens::Introspection;
pub use verdicts::ExternalSignal;

/// Why `Broker::commit` failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The record could not be written; the request's state changes were taken back.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The store refused the staged lease at commit: nothing was written.
    #[error(transparent)]
    Refused(BrokerError),
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

/// What a credential request produced: a credential, or a request awaiting approval.
#[derive(Debug)]
pub enum Outcome {
    Issued(Issued),
    Pending(Approval),
}

/// A credential ready to hand out, with its (active) lease.
#[derive(Debug)]
pub struct Issued {
    pub lease: Lease,
    pub credential: Secret<serde_json::Value>,
}

/// A credential request that passed every check: the witness `issue` needs. Only
/// `authorize_mint` makes one, so nothing is recorded or minted for a request that was
/// not authorized in full.
struct AuthorizedMint {
    task: Task,
    request: CredentialRequest,
    /// What the request asks for, resolved against and covered by the task's grant.
    grant: Grant,
    ttl: Duration,
    decision: Decision,
    provider: Arc<dyn CredentialProvider>,
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
    /// Keys implicit CI task ids (`job_task_id`): one secret per store, so every replica
    /// finds the same job's task, whatever signing key each holds mid-rotation.
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
    /// The store's shared key of implicit CI task ids (`app::ci_task_key`).
    pub ci_task_key: [u8; 32],
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

fn after(now: OffsetDateTime, d: Duration) -> OffsetDateTime {
    now + time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

fn check_reason(reason: &str) -> Result<(), BrokerError> {
    if reason.trim().is_empty()
        || reason.chars().count() > 512
        || reason.chars().any(char::is_control)
    {
        return Err(BrokerError::Reason);
    }
    Ok(())
}

fn note_decision(ev: &AuditScope, action: Action, d: &PolicyDecision) {
    let decision = if d.is_allowed() { "allow" } else { "deny" };
    static DECISIONS: Handles<(&'static str, &'static str), metrics::Counter> = Handles::new();
    DECISIONS
        .get((action.as_str(), decision), |(action, decision)| {
            metrics::counter!(
                "mayfly_policy_decisions_total",
                "action" => *action,
                "decision" => *decision,
            )
        })
        .increment(1);
    ev.set(|e| {
        e.action = Some(action);
        e.decision = Some(decision);
        e.policies.extend(d.policies.iter().cloned());
        if !d.errors.is_empty() {
            e.detail = Some(format!("policy evaluation errors: {}", d.errors.join("; ")));
        }
    });
}

impl Broker {
    pub fn new(p: BrokerParts) -> Self {
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
            ci_task_key: p.ci_task_key,
            anomaly: p.anomaly,
        }
    }

    fn crash_at(&self, point: FaultPoint, lease: &LeaseId) -> Result<(), BrokerError> {
        match &self.faults {
            Some(hook) if hook(point, lease) => Err(BrokerError::InjectedCrash(point)),
            _ => Ok(()),
        }
    }

    /// Writes the request's audit record. If it cannot be written, every state change the
    /// request registered on its scope is taken back, newest first, and the request
    /// fails: nothing a request granted outlives a missing record. Revocations are not
    /// undone — they only take access away.
    ///
    /// A lease the request staged (a credential minted in process, with a journaling
    /// audit log) is written in the same commit as the record: one durable write. The
    /// store checks, inside that commit, that the lease's DPoP `jti` is unspent and its
    /// task still active; if not, nothing is written and the request is refused
    /// ([`CommitError::Refused`]), to be recorded as such by a second `commit`.
    pub async fn commit(&self, scope: &AuditScope) -> Result<(), CommitError> {
        // The staged lease leaves the scope before the record is copied (it is written
        // once, and not copied with the record).
        let staged = scope.set(|e| e.staged_lease.take());
        let event = scope.snapshot();
        let undo = event.undo.clone();
        // A request that failed after its lease was staged hands out nothing: its
        // record is written without the lease.
        let failed = event.status.is_some_and(|s| s >= 400);
        let result = match staged {
            Some(new) if !failed => return self.commit_with_lease(scope, event, *new).await,
            _ => self.audit.write(event).await,
        };
        let Err(err) = result else {
            return Ok(());
        };
        self.undo_all(&undo).await;
        Err(CommitError::Audit(err))
    }

    /// Takes back a request's state changes, newest first. Boxed: revoking and ending
    /// tasks is a large future, and the commit path every request takes would otherwise
    /// carry it inline.
    fn undo_all<'a>(&'a self, undo: &'a [Undo]) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            for u in undo.iter().rev() {
                self.undo(u).await;
            }
        })
    }

    async fn commit_with_lease(
        &self,
        scope: &AuditScope,
        event: AuditEvent,
        new: NewLease,
    ) -> Result<(), CommitError> {
        let (id, task) = (new.lease.id.clone(), new.lease.task_id.clone());
        let undo = event.undo.clone();
        let refused = |e: BrokerError| {
            scope.set(|ev| ev.credential_fingerprint = None);
            Err(CommitError::Refused(e))
        };
        match self.audit.write_with_lease(event, new).await {
            Ok(Joined::Written) => self
                .crash_at(FaultPoint::AfterActivate, &id)
                .map_err(CommitError::Refused),
            Ok(Joined::Replayed) => refused(BrokerError::Dpop(
                crate::identity::dpop::DpopError::Replayed,
            )),
            Ok(Joined::TaskEnded(TaskState::Expired)) => refused(BrokerError::TaskExpired(task)),
            Ok(Joined::TaskEnded(state)) => refused(BrokerError::TaskNotActive {
                id: task,
                state: state.as_str(),
            }),
            Err(err) => {
                // Neither the lease nor the record was written; undo anything else.
                self.undo_all(&undo).await;
                Err(CommitError::Audit(err))
            }
        }
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

    /// A request has started that will write its record (see `LeaseStore::expect_write`).
    pub fn expect_write(&self) -> crate::lease::WriteIntent {
        self.store.expect_write()
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

    /// The caller owns `task` and, for an implicit CI task, carries the claims it was
    /// declared with (`reauthorize_implicit`).
    fn require_owner(
        &self,
        caller: &VerifiedCaller,
        task: &Task,
        now: OffsetDateTime,
        ev: &AuditScope,
    ) -> Result<(), BrokerError> {
        if &task.owner != caller.principal() {
            return Err(BrokerError::NotTaskOwner(task.id.clone()));
        }
        self.reauthorize_implicit(caller, task, now, ev)
    }

    /// The caller may act under `task` now: it is the owner and the task is active.
    fn require_usable(
        &self,
        caller: &VerifiedCaller,
        task: &Task,
        now: OffsetDateTime,
        ev: &AuditScope,
    ) -> Result<(), BrokerError> {
        self.require_owner(caller, task, now, ev)?;
        Self::require_active(task, now)
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

    /// Authorize → (approval, when policy requires it and it was not given) → issue.
    /// `approved` is set when an approved request is being collected.
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
        let mint = self.authorize_mint(caller, task_id, req, now, ev).await?;
        self.consume_single_use(caller).await?;
        if mint.decision == Decision::AllowAfterApproval && !approved {
            match self
                .approval_gate(caller, task_id, &mint.request, now, ev)
                .await?
            {
                approvals::Gate::Hold(a) => return Ok(Outcome::Pending(*a)),
                approvals::Gate::Collected => {}
            }
        }
        let issued = self.issue(caller, mint, now, ev).await?;
        Ok(Outcome::Issued(issued))
    }

    /// Every check a credential request must pass, in order: the task (owner, implicit
    /// claims, active), anomaly detection's screen, the task's scope, the lease's TTL,
    /// Cedar `MintCredential`, a configured provider.
    async fn authorize_mint(
        &self,
        caller: &VerifiedCaller,
        task_id: &TaskId,
        req: CredentialRequest,
        now: OffsetDateTime,
        ev: &AuditScope,
    ) -> Result<AuthorizedMint, BrokerError> {
        let task = self.load_task(task_id).await?;
        ev.set(|e| e.purpose = Some(task.purpose.clone()));
        self.require_usable(caller, &task, now, ev)?;
        let (risk, signals) = self.screen(caller, &task, now).await?;
        let grant = Self::fit_scope(&task, &req, ev)?;
        let ttl = self.lease_ttl(&task, &req, now)?;
        ev.set(|e| e.risk = Some(risk));
        let context = MintContext {
            task: &task,
            request: &grant,
            ttl,
            risk,
            signals: &signals,
        };
        let d = self.policy.mint(caller, &context, now)?;
        note_decision(ev, Action::MintCredential, &d);
        if !d.is_allowed() {
            return Err(BrokerError::PolicyDenied {
                action: Action::MintCredential,
                detail: Some(format!("{}: {}", grant.key(), d.why)),
            });
        }
        let provider = self.providers.get(req.provider)?.clone();
        Ok(AuthorizedMint {
            task,
            request: req,
            grant,
            ttl,
            decision: d.decision,
            provider,
        })
    }

    /// Anomaly detection's say before policy: the principal's request quota, a deny on
    /// the task, and a change of posture since the task was declared (a signal, whose
    /// verdict may end the task). Returns the caller's risk as policy reads it.
    async fn screen(
        &self,
        caller: &VerifiedCaller,
        task: &Task,
        now: OffsetDateTime,
    ) -> Result<(u8, BTreeSet<String>), BrokerError> {
        let gate = self
            .anomaly
            .request_gate(caller.principal(), &task.id)
            .await?;
        if gate.over_quota {
            return Err(BrokerError::QuotaExceeded(Quota::Requests));
        }
        if gate.denied {
            return Err(BrokerError::AnomalyDenied(task.id.clone()));
        }
        let p = caller.posture();
        let moved = task.origin.as_ref().is_some_and(|o| {
            o.source != p.source || o.credential_fingerprint != p.credential_fingerprint
        });
        if !moved {
            return Ok((gate.risk, gate.signals));
        }
        self.observe(caller.principal(), Some(&task.id), Signal::PostureChange)
            .await;
        let risk = self.anomaly.risk(caller.principal()).await?;
        // An enforced rule may just have ended the task.
        Self::require_active(&self.load_task(&task.id).await?, now)?;
        Ok(risk)
    }

    /// The grant `req` asks for, inside the task's grant for its provider and target.
    /// RFC 8707: every `resource` must be a target the task may reach with the same
    /// actions; together they become the token's audience.
    fn fit_scope(
        task: &Task,
        req: &CredentialRequest,
        ev: &AuditScope,
    ) -> Result<Grant, BrokerError> {
        let held = task
            .scope
            .grant_for(req.provider, &req.target)
            .ok_or_else(|| {
                BrokerError::OutOfScope(format!(
                    "task {} holds no grant for {}:{}",
                    task.id, req.provider, req.target
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
        Ok(wanted)
    }

    /// The lease's life: as asked, or the default; never over the configured maximum
    /// nor the task's remaining life.
    fn lease_ttl(
        &self,
        task: &Task,
        req: &CredentialRequest,
        now: OffsetDateTime,
    ) -> Result<Duration, BrokerError> {
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
        Ok(ttl)
    }

    /// Record → mint → activate an authorized request, carrying its delegation chain into
    /// the credential; registers the lease's revocation as the request's undo.
    async fn issue(
        &self,
        caller: &VerifiedCaller,
        mint: AuthorizedMint,
        now: OffsetDateTime,
        ev: &AuditScope,
    ) -> Result<Issued, BrokerError> {
        let AuthorizedMint {
            task,
            request,
            grant,
            ttl,
            provider,
            ..
        } = mint;
        // Over the provider's request budget: refuse before anything is written.
        self.admit(request.provider, caller.principal()).await?;
        let lease = Lease::pending(&task.id, caller.principal(), &grant, now, after(now, ttl));
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
        let minting = mint::Minting {
            provider: provider.as_ref(),
            task: &task,
            caller,
            delegators: &delegators,
            binding: &request,
        };
        let staged = provider.mints_in_process() && self.stages_leases(ev);
        // The other two paths are boxed: their futures (provider calls, revocation on
        // failure) are several KiB that every request would otherwise carry inline.
        let issued = if staged {
            self.mint_staged(minting, lease, ev).await?
        } else if provider.mints_in_process() {
            Box::pin(self.mint_in_process(minting, lease)).await?
        } else {
            Box::pin(self.mint_upstream(minting, lease)).await?
        };
        ev.set(|e| e.credential_fingerprint = issued.lease.fingerprint.clone());
        static ISSUED: Handles<&'static str, metrics::Counter> = Handles::new();
        ISSUED
            .get(
                issued.lease.provider.as_str(),
                |provider| metrics::counter!("mayfly_leases_issued_total", "provider" => *provider),
            )
            .increment(1);
        if !staged {
            ev.undo_with(Undo::RevokeLease(issued.lease.id.clone()));
            // A staged lease reaches this point in `commit`, after its write.
            self.crash_at(FaultPoint::AfterActivate, &issued.lease.id)?;
        }
        Ok(issued)
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
}
