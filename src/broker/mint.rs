//! The two ways an authorized request becomes a credential with a durable lease: minted
//! in process (record once, `active`), or upstream (record `pending`, mint, activate).

use time::OffsetDateTime;

use super::{Broker, BrokerError, FaultPoint, Issued, after};
use crate::audit::AuditScope;
use crate::identity::dpop::DpopError;
use crate::identity::{Principal, VerifiedCaller};
use crate::lease::{Lease, LeaseState, NewLease, StoreError, Transition};
use crate::provider::{CredentialProvider, MintRequest};
use crate::task::{CredentialRequest, LeaseId, Task, TaskId};

/// What every mint needs beside the lease: who, under which task, through which chain,
/// bound to which audience and key.
#[derive(Clone, Copy)]
pub(super) struct Minting<'a> {
    pub(super) provider: &'a dyn CredentialProvider,
    pub(super) task: &'a Task,
    pub(super) caller: &'a VerifiedCaller,
    pub(super) delegators: &'a [Principal],
    /// The request's RFC 8707 resources and DPoP key.
    pub(super) binding: &'a CredentialRequest,
}

impl<'a> Minting<'a> {
    fn request<'b>(&self, lease: &'b Lease) -> MintRequest<'b>
    where
        'a: 'b,
    {
        MintRequest {
            lease,
            task: self.task,
            caller: self.caller,
            delegation: self.delegators,
            audience: &self.binding.resource,
            dpop_jkt: self.binding.dpop_jkt.as_deref(),
        }
    }
}

impl Broker {
    /// A credential that exists only in this process until it is returned (a JWT Mayfly
    /// signs): mint first, then record the lease once, already `active`. A crash before
    /// the write loses a credential nobody ever held, so there is nothing to revoke and no
    /// `pending` record is needed; the caller still gets nothing without a durable lease.
    pub(super) async fn mint_in_process(
        &self,
        m: Minting<'_>,
        mut lease: Lease,
    ) -> Result<Issued, BrokerError> {
        let minted = m.provider.mint(m.request(&lease)).await?;
        self.crash_at(FaultPoint::AfterMint, &lease.id)?;
        lease.activate(minted.fingerprint.clone(), minted.handle.clone())?;
        self.record_new(&lease, lease.expires_at, m.binding).await?;
        self.require_still_active(&m.task.id, &lease.id).await?;
        Ok(Issued {
            lease,
            credential: minted.credential,
        })
    }

    /// Whether a lease minted in process waits for the request's commit, to be written
    /// with its audit record: the audit log journals into the store and the request
    /// commits at its end.
    pub(super) fn stages_leases(&self, ev: &AuditScope) -> bool {
        self.audit.joins_leases() && ev.commits_at_end()
    }

    /// `mint_in_process` with the lease staged on the request's audit scope instead of
    /// written now: `Broker::commit` writes lease, DPoP `jti` and audit record in one
    /// commit, checking there that the task is still active. Nothing leaves before.
    pub(super) async fn mint_staged(
        &self,
        m: Minting<'_>,
        mut lease: Lease,
        ev: &AuditScope,
    ) -> Result<Issued, BrokerError> {
        let minted = m.provider.mint(m.request(&lease)).await?;
        self.crash_at(FaultPoint::AfterMint, &lease.id)?;
        lease.activate(minted.fingerprint.clone(), minted.handle.clone())?;
        let new = NewLease {
            lease: lease.clone(),
            due_at: lease.expires_at,
            once: m.binding.dpop_once.clone(),
        };
        ev.set(|e| e.staged_lease = Some(Box::new(new)));
        Ok(Issued {
            lease,
            credential: minted.credential,
        })
    }

    /// Writes a new lease, and with it the request's DPoP `jti` when it carries one: one
    /// store write, and a replayed proof leaves no lease and gets no credential.
    async fn record_new(
        &self,
        lease: &Lease,
        due: OffsetDateTime,
        req: &CredentialRequest,
    ) -> Result<(), BrokerError> {
        let Some(once) = &req.dpop_once else {
            return Ok(self.store.put_new(lease, due).await?);
        };
        if self.store.put_new_once(lease, due, once).await? {
            Ok(())
        } else {
            Err(BrokerError::Dpop(DpopError::Replayed))
        }
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
    pub(super) async fn mint_upstream(
        &self,
        m: Minting<'_>,
        lease: Lease,
    ) -> Result<Issued, BrokerError> {
        let due = after(lease.issued_at, self.limits.pending_timeout);
        self.record_new(&lease, due, m.binding).await?;
        self.crash_at(FaultPoint::AfterPendingWrite, &lease.id)?;
        self.require_still_active(&m.task.id, &lease.id).await?;

        // Mint, carrying the delegation chain into the credential.
        let minted = match m.provider.mint(m.request(&lease)).await {
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
        if let Err(err) = m.provider.activated(&active).await {
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
}
