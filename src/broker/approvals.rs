//! Step-up approvals as the broker runs them: hold a request whose policy requires an
//! operator, let an operator decide it, let the requester collect it once, and withdraw
//! one whose record could not be written. The records and their transition rule are in
//! `crate::approval`; every change here is one compare-and-set in the store.

use time::OffsetDateTime;

use super::{Broker, BrokerError, Outcome};
use crate::action::{Action, Undo};
use crate::anomaly::Quota;
use crate::approval::{
    Approval, ApprovalState, ApprovalTransition, COLLECT_TTL, HeldRequest, MAX_LIVE_PER_PRINCIPAL,
    fingerprint,
};
use crate::audit::AuditScope;
use crate::identity::VerifiedCaller;
use crate::task::{CredentialRequest, TaskId};

/// What to do with a request that needs approval.
pub(super) enum Gate {
    /// Held (a new approval, or the same one still pending).
    Hold(Box<Approval>),
    /// An identical request was approved: collected now, mint.
    Collected,
}

/// An operator's answer to a held request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalDecision {
    Approve,
    Reject,
}

impl ApprovalDecision {
    /// Parses the API's `decision` field; anything else is `BrokerError::ApprovalDecision`.
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        match s {
            "approve" => Ok(Self::Approve),
            "reject" => Ok(Self::Reject),
            other => Err(BrokerError::ApprovalDecision(
                other.chars().take(32).collect(),
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Reject => "reject",
        }
    }
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
    pub(super) async fn approval_gate(
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
        let approval = Approval::pending(task_id, caller.principal(), held, now);
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
        let t = ApprovalTransition::new(
            &a.id,
            ApprovalState::Approved,
            ApprovalState::Collected,
            now,
        );
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
    pub(super) async fn withdraw_approval(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let now = OffsetDateTime::now_utc();
        for from in [ApprovalState::Pending, ApprovalState::Approved] {
            let mut t = ApprovalTransition::new(id, from, ApprovalState::Rejected, now);
            t.reason = Some(reason.to_string());
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
        decision: ApprovalDecision,
        reason: &str,
        ev: &AuditScope,
    ) -> Result<Approval, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::DecideApproval);
            e.outcome = Some(format!("{id}: {}", decision.as_str()));
            e.reason = Some(reason.to_string());
        });
        self.require_operator(caller)?;
        super::check_reason(reason)?;
        let a = self.load_approval(id).await?;
        ev.set(|e| {
            e.task_id = Some(a.task_id.to_string());
            e.principal = Some(caller.principal().to_string());
        });
        let now = OffsetDateTime::now_utc();
        let approve = decision == ApprovalDecision::Approve;
        let to = if approve {
            ApprovalState::Approved
        } else {
            ApprovalState::Rejected
        };
        let mut t = ApprovalTransition::new(id, ApprovalState::Pending, to, now);
        t.expires_at = approve.then_some(now + COLLECT_TTL);
        t.decided_by = Some(caller.principal().to_string());
        t.reason = Some(reason.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the two words are decisions; anything else is its own error (never the
    /// reason's), showing at most 32 characters of what was sent.
    #[test]
    fn a_decision_is_approve_or_reject_and_nothing_else() {
        assert_eq!(
            ApprovalDecision::parse("approve").ok(),
            Some(ApprovalDecision::Approve)
        );
        assert_eq!(
            ApprovalDecision::parse("reject").ok(),
            Some(ApprovalDecision::Reject)
        );
        let long = "x".repeat(100);
        match ApprovalDecision::parse(&long) {
            Err(BrokerError::ApprovalDecision(shown)) => assert_eq!(shown.len(), 32),
            other => panic!("expected ApprovalDecision, got {other:?}"),
        }
        assert!(matches!(
            ApprovalDecision::parse("Approve"),
            Err(BrokerError::ApprovalDecision(_))
        ));
    }
}
