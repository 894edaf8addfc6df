//! Step-up approvals, as durable records in the lease store. A credential request whose policy says
//! `@approval("required")` is held as a `pending` approval; an operator approves or
//! rejects it on any replica; the requester collects the approved request once, on any
//! replica, and it is minted then through the whole flow. Every change is a
//! compare-and-set in the store (`pending → approved | rejected`, `approved →
//! collected`), so two replicas can never both collect one approval. A pending approval
//! expires `APPROVAL_TTL` after it was made, an approved one `COLLECT_TTL` after it was
//! approved. Each principal holds at most `MAX_LIVE_PER_PRINCIPAL` live (pending or
//! approved-uncollected) approvals, so one agent cannot crowd out the others.
//!
//! A retried request identical to a held one (same requester, task and request; for
//! `/v1/token`, the same job and target, hence the same implicit task) finds it by its
//! fingerprint: still pending, the same approval is answered; approved, it is collected.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;
use time::OffsetDateTime;

use crate::action::{Action, Undo};
use crate::anomaly::Quota;
use crate::audit::AuditScope;
use crate::broker::{Broker, BrokerError, Outcome};
use crate::identity::{Principal, VerifiedCaller};
use crate::task::{CredentialRequest, ProviderKind, TaskId};

/// How long a held request waits for an operator.
pub const APPROVAL_TTL: time::Duration = time::Duration::minutes(15);
/// How long an approved request waits to be collected.
pub const COLLECT_TTL: time::Duration = time::Duration::minutes(15);
/// How long a record stays readable after it was made (then the store purges it).
pub const KEEP: time::Duration = time::Duration::hours(2);
/// Live approvals one principal may hold at once.
pub const MAX_LIVE_PER_PRINCIPAL: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    Pending,
    Approved,
    Rejected,
    /// The approved request was collected (minted once).
    Collected,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Rejected => "rejected",
            ApprovalState::Collected => "collected",
        }
    }

    /// Pending or approved: it still counts against its requester's cap.
    pub fn is_live(self) -> bool {
        matches!(self, ApprovalState::Pending | ApprovalState::Approved)
    }
}

impl std::str::FromStr for ApprovalState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "rejected" => Self::Rejected,
            "collected" => Self::Collected,
            _ => return Err(()),
        })
    }
}

/// The held request, in its stored form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRequest {
    pub provider: ProviderKind,
    pub target: String,
    pub actions: Option<BTreeSet<String>>,
    pub resources: Option<BTreeSet<String>>,
    pub ttl_secs: Option<u64>,
}

impl From<&CredentialRequest> for HeldRequest {
    fn from(r: &CredentialRequest) -> Self {
        Self {
            provider: r.provider,
            target: r.target.clone(),
            actions: r.actions.clone(),
            resources: r.resources.clone(),
            ttl_secs: r.ttl.map(|d| d.as_secs()),
        }
    }
}

impl From<&HeldRequest> for CredentialRequest {
    fn from(h: &HeldRequest) -> Self {
        Self {
            provider: h.provider,
            target: h.target.clone(),
            actions: h.actions.clone(),
            resources: h.resources.clone(),
            ttl: h.ttl_secs.map(Duration::from_secs),
            // An approval holds the grant, not the collecting request's RFC 8707
            // resources or DPoP key: a collected token is bound as the caller's
            // certificate allows, and a target requiring a binding refuses otherwise.
            resource: Vec::new(),
            dpop_jkt: None,
        }
    }
}

/// A credential request held for an operator's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub id: String,
    pub task_id: TaskId,
    pub requester: Principal,
    pub request: HeldRequest,
    /// Requester, task and request, hashed: how a retried identical request finds it.
    pub fingerprint: String,
    pub state: ApprovalState,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Pending: decided by then. Approved: collected by then.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The record is purged after this.
    #[serde(with = "time::serde::rfc3339")]
    pub keep_until: OffsetDateTime,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

impl Approval {
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.state.is_live() && self.expires_at <= now
    }
    /// The state as an API client sees it at `now` (`expired` once past its time).
    pub fn status_at(&self, now: OffsetDateTime) -> &'static str {
        if self.is_expired(now) {
            "expired"
        } else {
            self.state.as_str()
        }
    }
}

/// A checked change of an approval's state.
#[derive(Debug, Clone)]
pub struct ApprovalTransition {
    pub id: String,
    pub from: ApprovalState,
    pub to: ApprovalState,
    pub at: OffsetDateTime,
    /// The new `expires_at` (an approval's collection deadline), if it changes.
    pub expires_at: Option<OffsetDateTime>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

/// Applies `t` to `a` (shared by both stores): `Err` with the approval as it is when it
/// is not in `t.from` any more or has expired.
pub fn apply(a: &Approval, t: &ApprovalTransition) -> TransitionOutcome {
    if a.state != t.from || a.is_expired(t.at) {
        return Err(Box::new(a.clone()));
    }
    let mut next = a.clone();
    next.state = t.to;
    if let Some(e) = t.expires_at {
        next.expires_at = e;
    }
    if t.decided_by.is_some() {
        next.decided_by = t.decided_by.clone();
    }
    if t.reason.is_some() {
        next.reason = t.reason.clone();
    }
    Ok(next)
}

/// What a store answers to a transition.
pub type TransitionOutcome = Result<Approval, Box<Approval>>;

pub fn fingerprint(requester: &Principal, task: &TaskId, req: &HeldRequest) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"mayfly approval v1\0");
    h.update(requester.as_str().as_bytes());
    h.update(b"\0");
    h.update(task.as_str().as_bytes());
    h.update(b"\0");
    h.update(serde_json::to_vec(req).unwrap_or_default());
    hex::encode(h.finalize())
}

/// What to do with a request that needs approval.
pub(crate) enum Gate {
    /// Held (a new approval, or the same one still pending).
    Hold(Box<Approval>),
    /// An identical request was approved: collected now, mint.
    Collected,
}

fn closed(a: &Approval, now: OffsetDateTime) -> BrokerError {
    match a.state {
        _ if a.is_expired(now) => BrokerError::ApprovalExpired(a.id.clone()),
        ApprovalState::Rejected => BrokerError::ApprovalRejected(a.id.clone()),
        _ => BrokerError::ApprovalClosed(a.id.clone()),
    }
}

impl Broker {
    /// A request that needs approval: collect an identical approved one, answer an
    /// identical pending one, or hold it as a new approval.
    pub(crate) async fn approval_gate(
        &self,
        caller: &VerifiedCaller,
        task_id: &TaskId,
        req: &CredentialRequest,
        now: OffsetDateTime,
        ev: &AuditScope,
    ) -> Result<Gate, BrokerError> {
        let held = HeldRequest::from(req);
        let fp = fingerprint(caller.principal(), task_id, &held);
        if let Some(a) = self.store.approval_for(&fp).await?
            && !a.is_expired(now)
        {
            match a.state {
                ApprovalState::Pending => {
                    ev.set(|e| {
                        e.decision = Some("pending_approval");
                        e.outcome = Some(format!("still held as {}", a.id));
                    });
                    return Ok(Gate::Hold(Box::new(a)));
                }
                ApprovalState::Approved => {
                    self.collect(&a, now).await?;
                    ev.set(|e| e.outcome = Some(format!("collecting {}", a.id)));
                    return Ok(Gate::Collected);
                }
                // Rejected or collected: a new request is a new approval.
                ApprovalState::Rejected | ApprovalState::Collected => {}
            }
        }
        let approval = Approval {
            id: format!("apr_{}", uuid::Uuid::now_v7().simple()),
            task_id: task_id.clone(),
            requester: caller.principal().clone(),
            request: held,
            fingerprint: fp,
            state: ApprovalState::Pending,
            created_at: now,
            expires_at: now + APPROVAL_TTL,
            keep_until: now + KEEP,
            decided_by: None,
            reason: None,
        };
        if !self
            .store
            .create_approval(&approval, MAX_LIVE_PER_PRINCIPAL)
            .await?
        {
            return Err(BrokerError::QuotaExceeded(Quota::Approvals));
        }
        // A held request nobody has a record of must not become approvable.
        ev.undo_with(Undo::DenyApproval(approval.id.clone()));
        ev.set(|e| {
            e.decision = Some("pending_approval");
            e.outcome = Some(format!("held as {}", approval.id));
        });
        Ok(Gate::Hold(Box::new(approval)))
    }

    /// `approved → collected`, exactly once across replicas.
    async fn collect(&self, a: &Approval, now: OffsetDateTime) -> Result<Approval, BrokerError> {
        let t = ApprovalTransition {
            id: a.id.clone(),
            from: ApprovalState::Approved,
            to: ApprovalState::Collected,
            at: now,
            expires_at: None,
            decided_by: None,
            reason: None,
        };
        self.store
            .transition_approval(&t)
            .await?
            .map_err(|current| closed(&current, now))
    }

    async fn load_approval(&self, id: &str) -> Result<Approval, BrokerError> {
        self.store
            .approval(id)
            .await?
            .ok_or_else(|| BrokerError::ApprovalNotFound(id.to_string()))
    }

    /// Takes back an approval whose record could not be written: a pending or approved
    /// approval becomes rejected (`Broker::commit`).
    pub(crate) async fn withdraw_approval(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let now = OffsetDateTime::now_utc();
        for from in [ApprovalState::Pending, ApprovalState::Approved] {
            let t = ApprovalTransition {
                id: id.to_string(),
                from,
                to: ApprovalState::Rejected,
                at: now,
                expires_at: None,
                decided_by: None,
                reason: Some(reason.to_string()),
            };
            if self.store.transition_approval(&t).await?.is_ok() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// `POST /v1/approvals/{id}` (operators): approve or reject a held request.
    pub async fn decide_approval(
        &self,
        caller: &VerifiedCaller,
        id: &str,
        approve: bool,
        reason: &str,
        ev: &AuditScope,
    ) -> Result<Approval, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::DecideApproval);
            e.outcome = Some(format!(
                "{id}: {}",
                if approve { "approve" } else { "reject" }
            ));
            e.reason = Some(reason.to_string());
        });
        self.require_operator(caller)?;
        crate::broker::check_reason(reason)?;
        let a = self.load_approval(id).await?;
        ev.set(|e| {
            e.task_id = Some(a.task_id.to_string());
            e.principal = Some(caller.principal().to_string());
        });
        let now = OffsetDateTime::now_utc();
        let t = ApprovalTransition {
            id: id.to_string(),
            from: ApprovalState::Pending,
            to: if approve {
                ApprovalState::Approved
            } else {
                ApprovalState::Rejected
            },
            at: now,
            expires_at: approve.then_some(now + COLLECT_TTL),
            decided_by: Some(caller.principal().to_string()),
            reason: Some(reason.to_string()),
        };
        match self.store.transition_approval(&t).await? {
            Ok(a) => {
                if approve {
                    ev.undo_with(Undo::DenyApproval(id.to_string()));
                }
                Ok(a)
            }
            Err(current) if current.is_expired(now) => {
                Err(BrokerError::ApprovalExpired(id.to_string()))
            }
            Err(_) => Err(BrokerError::ApprovalClosed(id.to_string())),
        }
    }

    /// `GET /v1/approvals/{id}` (the requester): still pending, refused, or — once
    /// approved — the credential, minted now through the whole flow (the task must still
    /// be active and the request still inside its scope and policy). Collectable once.
    pub async fn collect_approval(
        &self,
        caller: &VerifiedCaller,
        id: &str,
        ev: &AuditScope,
    ) -> Result<Outcome, BrokerError> {
        ev.set(|e| e.action = Some(Action::CollectApproval));
        let a = self.load_approval(id).await?;
        if &a.requester != caller.principal() {
            return Err(BrokerError::ApprovalNotFound(id.to_string()));
        }
        let now = OffsetDateTime::now_utc();
        // Under an implicit CI task, only a caller with the declaring job's claims (and
        // still allowed to declare it) may see or collect the approval; checked before
        // the approval is touched, so a refused caller cannot use it up.
        let task = self.load_task(&a.task_id).await?;
        match self.reauthorize_implicit(caller, &task, now, ev) {
            Err(BrokerError::TaskClaimsDiffer(_)) => {
                return Err(BrokerError::ApprovalNotFound(id.to_string()));
            }
            other => other?,
        }
        if a.is_expired(now) {
            return Err(BrokerError::ApprovalExpired(id.to_string()));
        }
        match a.state {
            ApprovalState::Pending => return Ok(Outcome::Pending(a)),
            ApprovalState::Rejected => return Err(BrokerError::ApprovalRejected(id.to_string())),
            ApprovalState::Collected => return Err(BrokerError::ApprovalClosed(id.to_string())),
            ApprovalState::Approved => {}
        }
        let a = self.collect(&a, now).await?;
        ev.set(|e| e.outcome = Some(format!("collecting {id}")));
        self.request_credential_inner(
            caller,
            &a.task_id,
            CredentialRequest::from(&a.request),
            ev,
            true,
        )
        .await
    }

    /// `GET /v1/approvals?state=` (operators): approvals, oldest first.
    pub async fn approvals(
        &self,
        caller: &VerifiedCaller,
        state: Option<ApprovalState>,
        limit: usize,
        ev: &AuditScope,
    ) -> Result<Vec<Approval>, BrokerError> {
        ev.set(|e| e.action = Some(Action::ListApprovals));
        self.require_operator(caller)?;
        let now = OffsetDateTime::now_utc();
        let all = self
            .store
            .approvals(state, limit.min(self.max_page()))
            .await?;
        // A live state means still actionable: not past its time.
        Ok(all
            .into_iter()
            .filter(|a| state.is_none() || !a.is_expired(now))
            .collect())
    }
}
