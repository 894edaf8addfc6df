//! Tasks: declare one, read one, delegate a sub-task, complete one. Every use of an
//! implicit CI task is re-authorized as if it were declared again.

use time::OffsetDateTime;

use super::{Broker, BrokerError, after, claims_binding, note_decision, secs};
use crate::action::{Action, Undo};
use crate::anomaly::{Quota, Signal};
use crate::audit::AuditScope;
use crate::identity::VerifiedCaller;
use crate::lease::Lease;
use crate::revocation::TreeRevocation;
use crate::task::{DelegateRequest, Origin, Task, TaskId, TaskRequest, TaskState};

impl Broker {
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
    pub(super) async fn declare_task_as(
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
        let origin = Origin {
            source: caller.posture().source,
            credential_fingerprint: caller.posture().credential_fingerprint.clone(),
            claims_binding,
        };
        let expires_at = after(now, req.ttl);
        let task = Task::declared(id, caller.principal().clone(), req, now, expires_at, origin);
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
            if !d.is_allowed() {
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
            self.require_owner(caller, &task, OffsetDateTime::now_utc(), ev)?;
        }
        let leases = self.store.task_leases(id).await?;
        Ok((task, leases))
    }

    /// `POST /v1/tasks/{id}/delegate`: a sub-task for another principal, never wider
    /// than the parent's scope, never outliving it, never deeper than the limit, and
    /// allowed by Cedar `DelegateTask`.
    pub async fn delegate_task(
        &self,
        caller: &VerifiedCaller,
        parent_id: &TaskId,
        req: DelegateRequest,
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
        self.require_usable(caller, &parent, now, ev)?;
        let depth = self.delegation_depth(caller, &parent, &req, now).await?;
        let d = self
            .policy
            .delegate(caller, &req.principal, &req.task, depth, now)?;
        note_decision(ev, Action::DelegateTask, &d);
        if !d.is_allowed() {
            return Err(BrokerError::PolicyDenied {
                action: Action::DelegateTask,
                detail: Some(format!("{}: {}", req.principal, d.why)),
            });
        }
        let expires_at = after(now, req.task.ttl);
        let child = Task::delegated(&parent, req.principal, req.task, now, expires_at);
        self.store.create_task(&child).await?;
        ev.undo_with(Undo::EndTaskTree(child.id.clone()));
        self.end_if_parent_ended(&child, parent_id).await?;
        ev.set(|e| {
            e.detail = Some(format!("sub-task {} for {}", child.id, child.owner));
            e.expires_at = Some(crate::api_time(child.expires_at));
        });
        Ok(child)
    }

    /// The sub-task's place in the chain, once it is known to fit its parent: no wider
    /// scope (an anomaly signal otherwise), no longer life, no deeper than the limit.
    async fn delegation_depth(
        &self,
        caller: &VerifiedCaller,
        parent: &Task,
        req: &DelegateRequest,
        now: OffsetDateTime,
    ) -> Result<usize, BrokerError> {
        if !parent.scope.covers(&req.task.scope) {
            self.observe(
                caller.principal(),
                Some(&parent.id),
                Signal::DelegationWider,
            )
            .await;
            return Err(BrokerError::DelegationWider(format!(
                "task {} does not hold every grant requested",
                parent.id
            )));
        }
        let remaining = parent.remaining(now);
        if req.task.ttl > remaining {
            return Err(BrokerError::TtlExceedsTask {
                requested: secs(req.task.ttl),
                remaining: secs(remaining),
            });
        }
        let depth = self.delegators(parent).await?.len() + 1;
        if depth > self.limits.max_delegation_depth {
            return Err(BrokerError::DelegationTooDeep {
                depth,
                max: self.limits.max_delegation_depth,
            });
        }
        Ok(depth)
    }

    /// The parent may have ended while the child was being written: end the child too.
    async fn end_if_parent_ended(&self, child: &Task, parent: &TaskId) -> Result<(), BrokerError> {
        let current = self.load_task(parent).await?;
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
        Ok(())
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
        self.require_owner(caller, &task, OffsetDateTime::now_utc(), ev)?;
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
}
