//! Ending credentials: revoke one lease, end a task tree, and the reaper that expires due
//! leases, revokes stale pending ones and retries failed revocations with backoff.
//!
//! Every lease the reaper touches is first *claimed* through `LeaseStore::claim_due`,
//! which moves its due time forward; a reaper that dies mid-way leaves the claim to lapse
//! and the lease to be picked up again. Each terminal transition is written once (the
//! store checks the current state), so the audit trail shows one revocation per lease.

use futures_util::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use crate::audit::{AuditEvent, AuditLog};
use crate::lease::{Lease, LeaseState, LeaseStore, StoreError, Transition};
use crate::provider::{ProviderError, Providers, Revocation};
use crate::task::{LeaseId, TaskId, TaskState};

/// Claimed leases handled at once by one reaper pass.
const REAP_CONCURRENCY: usize = 64;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// Exponential backoff: base · 2^(attempt-1), capped at `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(20))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[derive(Debug, Clone)]
pub struct ReaperConfig {
    pub interval: Duration,
    pub batch: usize,
    /// How long a claim on a due lease lasts before another reaper may take it.
    pub claim_hold: Duration,
    pub retry: RetryPolicy,
}

/// What one reaper pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapStats {
    pub claimed: usize,
    pub expired: usize,
    pub revoked: usize,
    pub retrying: usize,
    pub irrevocable: usize,
}

/// The leases and tasks a tree revocation ended.
#[derive(Debug, Clone, Default)]
pub struct TreeRevocation {
    pub tasks: Vec<TaskId>,
    pub leases: Vec<LeaseId>,
}

pub struct Revoker {
    store: Arc<dyn LeaseStore>,
    providers: Providers,
    audit: AuditLog,
    config: ReaperConfig,
}

fn after(now: OffsetDateTime, d: Duration) -> OffsetDateTime {
    now + time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

fn lease_event(kind: &'static str, lease: &Lease) -> AuditEvent {
    let mut e = AuditEvent::new(kind);
    e.lease_id = Some(lease.id.to_string());
    e.task_id = Some(lease.task_id.to_string());
    e.principal = Some(lease.principal.to_string());
    e.provider = Some(lease.provider.as_str());
    e.target = Some(lease.target.clone());
    e.reason = lease.reason.clone();
    e
}

impl Revoker {
    pub fn new(
        store: Arc<dyn LeaseStore>,
        providers: Providers,
        audit: AuditLog,
        config: ReaperConfig,
    ) -> Self {
        Self {
            store,
            providers,
            audit,
            config,
        }
    }

    async fn record(&self, event: AuditEvent) {
        // Revocation already happened; failing to record it must not undo or block it.
        // The error is logged loudly and the metric below lets operators alert on it.
        if let Err(e) = self.audit.write(event).await {
            tracing::error!(error = %e, "audit record of a revocation could not be written");
        }
    }

    /// Ends a `pending` lease whose mint the provider refused before anything existed
    /// upstream (validation, an upstream denial): no provider call, straight to `revoked`.
    /// Falls back to a full revocation if the lease moved on meanwhile.
    pub async fn discard_pending(&self, id: &LeaseId, reason: &str) -> Result<Lease, StoreError> {
        let mut t = Transition::new(
            id.clone(),
            &[LeaseState::Pending],
            LeaseState::Revoked,
            OffsetDateTime::now_utc(),
        );
        t.reason = Some(reason.to_string());
        match self.store.transition(t).await {
            Ok(l) => {
                self.record(lease_event("lease.revoked", &l)).await;
                Ok(l)
            }
            Err(StoreError::InvalidTransition { .. }) => self.revoke_lease(id, reason).await,
            Err(e) => Err(e),
        }
    }

    /// Requests revocation of one lease and makes a first attempt. Returns the lease as it
    /// stands afterwards: `revoked`, or `revoking` when the provider failed (the reaper
    /// retries). Terminal leases are returned unchanged.
    pub async fn revoke_lease(&self, id: &LeaseId, reason: &str) -> Result<Lease, StoreError> {
        let now = OffsetDateTime::now_utc();
        let lease = self
            .store
            .lease(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if lease.state.is_terminal() {
            return Ok(lease);
        }
        let mut t = Transition::new(
            id.clone(),
            &[LeaseState::Pending, LeaseState::Active],
            LeaseState::Revoking,
            now,
        );
        t.reason = Some(reason.to_string());
        // If this process dies before the provider answers, the reaper retries from here.
        t.due_at = Some(after(now, self.config.claim_hold));
        let lease = match self.store.transition(t).await {
            Ok(l) => l,
            // Another path ended it in between: nothing left to do.
            Err(StoreError::InvalidTransition { .. }) => {
                return self
                    .store
                    .lease(id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(id.to_string()));
            }
            Err(e) => return Err(e),
        };
        self.attempt(lease).await
    }

    /// One provider revocation attempt for a lease in `revoking`. Boxed: its future
    /// (provider call, failure record) is several KiB, and every caller up to the request
    /// handlers would otherwise carry it inline and copy it at each `.await`, on the
    /// minting path too.
    fn attempt(
        &self,
        lease: Lease,
    ) -> futures_util::future::BoxFuture<'_, Result<Lease, StoreError>> {
        Box::pin(self.attempt_now(lease))
    }

    async fn attempt_now(&self, lease: Lease) -> Result<Lease, StoreError> {
        let now = OffsetDateTime::now_utc();
        let outcome = match self.providers.get(lease.provider) {
            Ok(p) => p.revoke(&lease).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(rev) => self.revoked(lease, rev, now).await,
            Err(ProviderError::Deferred {
                reason,
                retry_after_secs,
            }) => self.deferred(lease, reason, retry_after_secs, now).await,
            Err(err) => self.attempt_failed(lease, err, now).await,
        }
    }

    /// The provider confirmed: the lease is `revoked` (or dies on its own at `dies_at`).
    async fn revoked(
        &self,
        lease: Lease,
        rev: Revocation,
        now: OffsetDateTime,
    ) -> Result<Lease, StoreError> {
        let mut t = Transition::new(
            lease.id.clone(),
            &[LeaseState::Revoking],
            LeaseState::Revoked,
            now,
        );
        if let Revocation::ExpiresOnly { at } = rev {
            t.dies_at = Some(at);
        }
        let done = self.store.transition(t).await?;
        if done.state == LeaseState::Revoked && lease.state == LeaseState::Revoking {
            metrics::counter!("mayfly_lease_transitions_total", "provider" => done.provider.as_str(), "state" => "revoked").increment(1);
            let mut e = lease_event("lease.revoked", &done);
            e.outcome = Some(match rev {
                Revocation::Revoked => "revoked".into(),
                Revocation::ExpiresOnly { at } => format!("expires_only_at {at}"),
            });
            self.record(e).await;
        }
        Ok(done)
    }

    /// Back-pressure (no room upstream yet): not a failed attempt, so it can never run
    /// the lease out of attempts into `irrevocable`.
    async fn deferred(
        &self,
        lease: Lease,
        reason: String,
        retry_after_secs: u64,
        now: OffsetDateTime,
    ) -> Result<Lease, StoreError> {
        let mut t = Transition::new(
            lease.id.clone(),
            &[LeaseState::Revoking],
            LeaseState::Revoking,
            now,
        );
        t.due_at = Some(after(now, Duration::from_secs(retry_after_secs.max(1))));
        let l = self.store.transition(t).await?;
        metrics::counter!("mayfly_revocation_deferred_total", "provider" => l.provider.as_str())
            .increment(1);
        tracing::info!(lease = %l.id, retry_after_secs, reason = %reason, "revocation deferred");
        let mut e = lease_event("lease.revoke_deferred", &l);
        e.detail = Some(reason);
        e.outcome = Some(format!("retry in {retry_after_secs} s"));
        self.record(e).await;
        Ok(l)
    }

    /// A failed attempt: retried with backoff until `max_attempts`, then `irrevocable`.
    async fn attempt_failed(
        &self,
        lease: Lease,
        err: ProviderError,
        now: OffsetDateTime,
    ) -> Result<Lease, StoreError> {
        let attempts = lease.attempts + 1;
        let give_up = attempts >= self.config.retry.max_attempts;
        let mut t = Transition::new(
            lease.id.clone(),
            &[LeaseState::Revoking],
            if give_up {
                LeaseState::Irrevocable
            } else {
                LeaseState::Revoking
            },
            now,
        );
        t.count_attempt = true;
        t.due_at = (!give_up).then(|| after(now, self.config.retry.delay(attempts)));
        let l = self.store.transition(t).await?;
        let mut e = lease_event(
            if give_up {
                "lease.irrevocable"
            } else {
                "lease.revoke_failed"
            },
            &l,
        );
        e.detail = Some(err.to_string());
        e.outcome = Some(format!("attempt {attempts}"));
        tracing::warn!(lease = %l.id, attempts, error = %err, give_up, "revocation attempt failed");
        metrics::counter!("mayfly_revocation_failures_total", "provider" => l.provider.as_str())
            .increment(1);
        if give_up {
            metrics::counter!("mayfly_leases_irrevocable_total", "provider" => l.provider.as_str())
                .increment(1);
        }
        self.record(e).await;
        Ok(l)
    }

    /// Ends `root` and every descendant task as `to`, then revokes all their leases.
    /// Tasks already ended are walked too, so a retried call finishes what a crash left.
    pub async fn end_task_tree(
        &self,
        root: &TaskId,
        to: TaskState,
        reason: &str,
    ) -> Result<TreeRevocation, StoreError> {
        let now = OffsetDateTime::now_utc();
        let mut out = TreeRevocation::default();
        let mut queue = VecDeque::from([root.clone()]);
        while let Some(id) = queue.pop_front() {
            match self.store.end_task(&id, to, reason, now).await {
                Ok(_) | Err(StoreError::TaskEnded { .. }) => {}
                Err(e) => return Err(e),
            }
            for lease in self.store.task_leases(&id).await? {
                if !lease.state.is_terminal() {
                    let l = self.revoke_lease(&lease.id, reason).await?;
                    if matches!(l.state, LeaseState::Revoked | LeaseState::Revoking) {
                        out.leases.push(l.id);
                    }
                }
            }
            queue.extend(self.store.children(&id).await?);
            out.tasks.push(id);
        }
        Ok(out)
    }

    /// One reaper pass over leases due at `now`.
    pub async fn reap_once(&self, now: OffsetDateTime) -> Result<ReapStats, StoreError> {
        let hold = after(now, self.config.claim_hold);
        let due = self.store.claim_due(now, hold, self.config.batch).await?;
        let mut stats = ReapStats {
            claimed: due.len(),
            ..Default::default()
        };
        // Leases are independent: handle them concurrently so their audit records share
        // group commits instead of paying one fsync each.
        let outcomes: Vec<Result<Option<LeaseState>, StoreError>> = futures_util::stream::iter(due)
            .map(|lease| self.reap_lease(lease, now))
            .buffer_unordered(REAP_CONCURRENCY)
            .collect()
            .await;
        for outcome in outcomes {
            match outcome? {
                Some(LeaseState::Expired) => stats.expired += 1,
                Some(state) => count(&mut stats, state),
                None => {}
            }
        }
        Ok(stats)
    }

    /// Handles one claimed lease; returns the state it ended in, if it changed.
    async fn reap_lease(
        &self,
        lease: Lease,
        now: OffsetDateTime,
    ) -> Result<Option<LeaseState>, StoreError> {
        match lease.state {
            LeaseState::Active
                if lease.expires_at <= now
                    && self
                        .providers
                        .get(lease.provider)
                        .is_ok_and(|p| p.outlives_lease(&lease)) =>
            {
                // The credential would outlive its lease (an STS session's 900 s floor,
                // a longer Vault lease): end it at the provider, not just in the record.
                Ok(Some(
                    self.revoke_lease(&lease.id, "ttl_expired").await?.state,
                ))
            }
            LeaseState::Active if lease.expires_at <= now => {
                let t = Transition::new(
                    lease.id.clone(),
                    &[LeaseState::Active],
                    LeaseState::Expired,
                    now,
                );
                match self.store.transition(t).await {
                    Ok(l) if l.state == LeaseState::Expired => {
                        metrics::counter!("mayfly_lease_transitions_total", "provider" => l.provider.as_str(), "state" => "expired").increment(1);
                        self.record(lease_event("lease.expired", &l)).await;
                        Ok(Some(LeaseState::Expired))
                    }
                    Ok(_) | Err(StoreError::InvalidTransition { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            LeaseState::Active => {
                // Claimed early (index and record disagree): look again at its expiry.
                let mut t = Transition::new(
                    lease.id.clone(),
                    &[LeaseState::Active],
                    LeaseState::Active,
                    now,
                );
                t.due_at = Some(lease.expires_at);
                self.store.transition(t).await?;
                Ok(None)
            }
            LeaseState::Pending => {
                // Never activated within the pending timeout: the mint may have happened
                // before a crash, so revoke as if it had.
                Ok(Some(
                    self.revoke_lease(&lease.id, "stale_pending").await?.state,
                ))
            }
            LeaseState::Revoking => Ok(Some(self.attempt(lease).await?.state)),
            _ => Ok(None),
        }
    }

    /// Runs the reaper until the process ends.
    pub fn spawn_reaper(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.config.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = OffsetDateTime::now_utc();
                if let Ok(n) = self.store.due_count(now).await {
                    metrics::gauge!("mayfly_reaper_backlog").set(n as f64);
                }
                if let Ok(counts) = self.store.lease_counts().await {
                    for (key, n) in counts {
                        let (provider, state) = key.split_once('/').unwrap_or((key.as_str(), ""));
                        metrics::gauge!("mayfly_leases", "provider" => provider.to_string(), "state" => state.to_string())
                            .set(n as f64);
                    }
                }
                loop {
                    match self.reap_once(OffsetDateTime::now_utc()).await {
                        // A full batch means more may be due right now.
                        Ok(s) if s.claimed == self.config.batch => continue,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::error!(error = %e, "reaper pass failed; retrying next tick");
                            break;
                        }
                    }
                }
            }
        })
    }
}

fn count(stats: &mut ReapStats, state: LeaseState) {
    match state {
        LeaseState::Revoked => stats.revoked += 1,
        LeaseState::Revoking => stats.retrying += 1,
        LeaseState::Irrevocable => stats.irrevocable += 1,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let r = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        assert_eq!(r.delay(1), Duration::from_secs(1));
        assert_eq!(r.delay(2), Duration::from_secs(2));
        assert_eq!(r.delay(4), Duration::from_secs(8));
        assert_eq!(r.delay(5), Duration::from_secs(10));
        assert_eq!(r.delay(60), Duration::from_secs(10));
    }
}
