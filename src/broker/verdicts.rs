//! Anomaly detection's verdicts, carried out. `anomaly` decides which rules fire; the
//! broker records each firing and, in enforce mode, denies, revokes the task or revokes
//! the principal, inside the request that tripped the rule.

use super::{Broker, BrokerError};
use crate::action::Action;
use crate::anomaly::{Action as Countermeasure, Mode, Severity, Signal, Verdict};
use crate::audit::{AuditEvent, AuditScope};
use crate::identity::{Principal, VerifiedCaller};
use crate::task::{TaskId, TaskState};

/// `POST /v1/signals` body, validated.
#[derive(Debug, Clone)]
pub struct ExternalSignal {
    pub task: Option<TaskId>,
    pub principal: Option<Principal>,
    pub kind: String,
    pub severity: Severity,
    pub detail: String,
}

/// The `anomaly.triggered` record of one fired rule.
fn triggered_event(principal: &Principal, task: Option<&TaskId>, v: &Verdict) -> AuditEvent {
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
    e
}

impl Broker {
    /// Reports an observation to anomaly detection and carries out what it decides. The
    /// request's own outcome is already settled; a store failure here is logged and
    /// counted (`mayfly_anomaly_store_errors_total`), the next request re-reads state.
    pub(super) async fn observe(
        &self,
        principal: &Principal,
        task: Option<&TaskId>,
        signal: Signal,
    ) {
        match self.anomaly.observe(principal, task, signal).await {
            Ok(verdicts) if verdicts.is_empty() => {}
            // Boxed: carrying out a verdict (revocations, records) is a large future
            // that every request would otherwise carry inline and copy at each `.await`.
            Ok(verdicts) => Box::pin(self.apply_verdicts(principal, task, verdicts)).await,
            Err(err) => {
                metrics::counter!("mayfly_anomaly_store_errors_total").increment(1);
                tracing::error!(error = %err, "cannot record an anomaly observation");
            }
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
            let e = triggered_event(principal, task, &v);
            metrics::counter!("mayfly_anomaly_triggers_total", "rule" => v.rule.clone(), "mode" => if v.mode == Mode::Enforce { "enforce" } else { "audit" }).increment(1);
            tracing::warn!(rule = %v.rule, action = v.action.as_str(), principal = %principal, "anomaly rule fired");
            if let Err(err) = self.audit.write(e).await {
                tracing::error!(error = %err, "cannot audit an anomaly verdict");
            }
            if v.mode == Mode::Audit {
                continue;
            }
            if let Err(err) = self.enforce(principal, task, &v).await {
                tracing::error!(error = %err, rule = %v.rule, "anomaly action failed");
            }
        }
    }

    /// The countermeasure of an enforced verdict. A task-level action without a task
    /// falls back to the principal.
    async fn enforce(
        &self,
        principal: &Principal,
        task: Option<&TaskId>,
        v: &Verdict,
    ) -> Result<(), crate::lease::StoreError> {
        let reason = format!("anomaly: rule {}", v.rule);
        match (v.action, task) {
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
        }
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
}
