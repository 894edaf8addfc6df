//! Operator routes: revoke a task, a lease, or in bulk (a principal, a provider, a
//! target prefix), and read or list leases and tasks.

use super::{Broker, BrokerError, check_reason};
use crate::action::Action;
use crate::audit::AuditScope;
use crate::identity::VerifiedCaller;
use crate::lease::{Lease, LeaseQuery, Page, StoreError, TaskQuery};
use crate::revocation::TreeRevocation;
use crate::task::{LeaseId, ProviderKind, Task, TaskId, TaskState};

/// What `POST /v1/revoke` selects: exactly one criterion.
#[derive(Debug, Clone)]
pub enum BulkSelector {
    Principal(String),
    Provider(ProviderKind),
    TargetPrefix(String),
}

impl Broker {
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
        let all = LeaseQuery {
            limit: usize::MAX,
            ..Default::default()
        };
        match &sel {
            BulkSelector::Principal(p) => out = self.revoke_principal(p, reason).await?,
            BulkSelector::Provider(p) => {
                let q = LeaseQuery {
                    provider: Some(*p),
                    ..all
                };
                self.revoke_leases(&q, |_| true, reason, &mut out).await?;
            }
            BulkSelector::TargetPrefix(prefix) => {
                let under = |l: &Lease| l.target.starts_with(prefix.as_str());
                self.revoke_leases(&all, under, reason, &mut out).await?;
            }
        }
        ev.set(|e| e.revoked = out.leases.iter().map(ToString::to_string).collect());
        Ok(out)
    }

    /// Ends every active task of `principal` (with sub-tasks) and revokes its leases.
    pub(super) async fn revoke_principal(
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
        self.revoke_leases(&q, |_| true, reason, &mut out).await?;
        Ok(out)
    }

    /// Revokes every lease `q` finds that `selected` keeps and that has not ended.
    async fn revoke_leases(
        &self,
        q: &LeaseQuery,
        selected: impl Fn(&Lease) -> bool,
        reason: &str,
        out: &mut TreeRevocation,
    ) -> Result<(), StoreError> {
        for lease in self.store.leases(q).await?.items {
            if selected(&lease) && !lease.state.is_terminal() {
                out.leases
                    .push(self.revoker.revoke_lease(&lease.id, reason).await?.id);
            }
        }
        Ok(())
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
}
