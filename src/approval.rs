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
//!
//! This module holds the records and the one transition rule both stores apply
//! ([`apply`]); what the broker does with them (hold, decide, collect, withdraw) is in
//! `broker::approvals`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;
use time::OffsetDateTime;

use crate::identity::Principal;
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
            dpop_once: None,
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
    /// A newly held request, pending from `now` for `APPROVAL_TTL`.
    pub fn pending(
        task_id: &TaskId,
        requester: &Principal,
        request: HeldRequest,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            id: format!("apr_{}", uuid::Uuid::now_v7().simple()),
            task_id: task_id.clone(),
            requester: requester.clone(),
            fingerprint: fingerprint(requester, task_id, &request),
            request,
            state: ApprovalState::Pending,
            created_at: now,
            expires_at: now + APPROVAL_TTL,
            keep_until: now + KEEP,
            decided_by: None,
            reason: None,
        }
    }

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

impl ApprovalTransition {
    /// `from → to` at `at`, changing nothing else.
    pub fn new(id: &str, from: ApprovalState, to: ApprovalState, at: OffsetDateTime) -> Self {
        Self {
            id: id.to_string(),
            from,
            to,
            at,
            expires_at: None,
            decided_by: None,
            reason: None,
        }
    }
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
