//! Revocation through the role's deny policy: the entry goes to the role's deny set in
//! the store first, then the one writer of the role (a fenced lock in the store) makes
//! IAM's copy match the rendering of that set. The same sync runs as the reconciler.

use std::collections::BTreeSet;
use std::time::Duration;
use time::OffsetDateTime;

use super::deny_policy::round_up_minute;
use super::errors::sdk_error;
use super::{
    AwsProvider, CUTOFF_MEMBER_PREFIX, DenyPolicy, MAX_ROLE_POLICY_CHARS, OnPolicyFull, Rendered,
    render_from_store,
};
use crate::audit::AuditEvent;
use crate::lease::Lease;
use crate::provider::ProviderError;

/// What this process knows about one role.
pub(super) struct RoleState {
    /// The longest session any target of the role can mint.
    pub(super) max_session: Duration,
    /// Serialises this process's syncs of the role (so only one of its tasks waits for
    /// the shared lock) and remembers what the last sync saw in IAM.
    pub(super) synced: tokio::sync::Mutex<Option<Synced>>,
}

/// What a sync left in IAM, checked by reading it back.
#[derive(Debug, Clone, Default)]
pub(super) struct Synced {
    written: BTreeSet<String>,
    issued_before: Option<i64>,
    next_expiry: Option<i64>,
}

impl Synced {
    /// Whether IAM denies `lease`'s session: it is listed, or a cut-off covers it (its
    /// `AssumeRole` was sent no later than `issued_at + timeout`, before the cut-off).
    fn denies(&self, lease: &Lease, timeout: Duration) -> bool {
        self.written.contains(lease.id.as_str())
            || self
                .issued_before
                .is_some_and(|t| covered_by_cutoff(lease, t, timeout))
    }
}

pub(super) fn covered_by_cutoff(lease: &Lease, cutoff: i64, timeout: Duration) -> bool {
    (lease.issued_at + timeout).unix_timestamp() < cutoff
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncCause {
    Revocation,
    Reconcile,
}

/// A sync stopped because another replica took the role lock from under it.
enum SyncError {
    FenceLost,
    Provider(ProviderError),
}

impl From<ProviderError> for SyncError {
    fn from(e: ProviderError) -> Self {
        SyncError::Provider(e)
    }
}

fn store_err(e: crate::lease::StoreError) -> ProviderError {
    ProviderError::Unavailable(format!("lease store: {e}"))
}

fn deny_set(role: &str) -> String {
    format!("aws-deny:{role}")
}

fn role_lock(role: &str) -> String {
    format!("aws-deny:{role}")
}

/// Rounds of "lock, render, write, check the fence" before a sync gives up.
const FENCE_ROUNDS: usize = 3;

impl AwsProvider {
    async fn read_deny(&self, role: &str) -> Result<DenyPolicy, ProviderError> {
        match self
            .iam
            .get_role_policy()
            .role_name(role)
            .policy_name(&self.cfg.deny_policy_name)
            .send()
            .await
        {
            Ok(out) => DenyPolicy::parse(out.policy_document()).map_err(ProviderError::Revoke),
            Err(e) => {
                let missing = e
                    .as_service_error()
                    .is_some_and(|se| se.is_no_such_entity_exception());
                if missing {
                    Ok(DenyPolicy::default())
                } else {
                    Err(sdk_error("iam GetRolePolicy", e))
                }
            }
        }
    }

    async fn write_deny(&self, role: &str, policy: &DenyPolicy) -> Result<(), ProviderError> {
        if policy.is_empty() {
            return match self
                .iam
                .delete_role_policy()
                .role_name(role)
                .policy_name(&self.cfg.deny_policy_name)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_no_such_entity_exception()) =>
                {
                    Ok(())
                }
                Err(e) => Err(sdk_error("iam DeleteRolePolicy", e)),
            };
        }
        self.iam
            .put_role_policy()
            .role_name(role)
            .policy_name(&self.cfg.deny_policy_name)
            .policy_document(policy.render())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("iam PutRolePolicy", e))
    }

    /// How long a sync may hold the role lock: a store read, three IAM reads and one
    /// write, each bounded by `timeout`, with room to spare. A holder slower than this
    /// finds its fencing token gone and redoes its sync.
    fn lock_ttl(&self) -> Duration {
        self.cfg.timeout * 6 + Duration::from_secs(5)
    }

    /// Waits for the role lock (polling the shared store) up to one lock lifetime, so a
    /// lock left by a crashed holder lapses first. Busy past that: back-pressure.
    async fn lock_role(&self, role: &str) -> Result<u64, ProviderError> {
        let name = role_lock(role);
        let deadline = tokio::time::Instant::now() + self.lock_ttl();
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(token) = self
                .store
                .lock_acquire(&name, self.lock_ttl())
                .await
                .map_err(store_err)?
            {
                return Ok(token);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::Deferred {
                    reason: format!("deny policy of role {role} is locked by another writer"),
                    retry_after_secs: 1,
                });
            }
            // Jitter from the clock's sub-millisecond digits keeps replicas from polling
            // in step.
            let jitter = u64::from(OffsetDateTime::now_utc().nanosecond() % 5_000_000);
            tokio::time::sleep(pause + Duration::from_nanos(jitter)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Makes IAM's copy of `role`'s deny policy what the store says it must be, as the
    /// one writer of the role (its lock in the shared store). A writer whose lock lapsed
    /// mid-way (its fencing token no longer holds after its write) may have overwritten a
    /// newer writer: it takes the lock again and redoes the sync from the store.
    async fn sync_role(&self, role: &str, cause: SyncCause) -> Result<Synced, ProviderError> {
        let state = self
            .roles
            .get(role)
            .ok_or_else(|| ProviderError::NotAllowed(format!("no aws target uses role {role}")))?;
        for _ in 0..FENCE_ROUNDS {
            let token = self.lock_role(role).await?;
            let out = self.sync_locked(role, state, token, cause).await;
            if let Err(e) = self.store.lock_release(&role_lock(role), token).await {
                tracing::warn!(role, error = %e, "role lock release failed; it lapses on its own");
            }
            match out {
                Ok(s) => return Ok(s),
                Err(SyncError::Provider(e)) => return Err(e),
                Err(SyncError::FenceLost) => {
                    metrics::counter!("mayfly_aws_role_lock_fence_lost_total").increment(1);
                    tracing::warn!(
                        role,
                        token,
                        "role lock lapsed during a deny-policy write; redoing it"
                    );
                }
            }
        }
        Err(ProviderError::Revoke(format!(
            "lost the lock of role {role} {FENCE_ROUNDS} times while writing its deny policy"
        )))
    }

    async fn sync_locked(
        &self,
        role: &str,
        state: &RoleState,
        token: u64,
        cause: SyncCause,
    ) -> Result<Synced, SyncError> {
        let set = deny_set(role);
        let now = OffsetDateTime::now_utc();
        self.store.deny_prune(&set, now).await.map_err(store_err)?;
        let entries = self.store.deny_list(&set, now).await.map_err(store_err)?;
        let mut iam = self.read_deny(role).await?;
        let mut want = render_from_store(&entries, iam.foreign.clone(), MAX_ROLE_POLICY_CHARS)?;
        if !want.waiting.is_empty() {
            metrics::counter!("mayfly_aws_deny_policy_full_total").increment(1);
            if self.cfg.on_policy_full == OnPolicyFull::IssuedBeforeDeny
                && self
                    .uncovered(&want.waiting, want.policy.issued_before)
                    .await?
            {
                self.cut_off(role, state, &want.waiting, now).await?;
                let entries = self.store.deny_list(&set, now).await.map_err(store_err)?;
                want = render_from_store(&entries, iam.foreign.clone(), MAX_ROLE_POLICY_CHARS)?;
            }
        }
        metrics::gauge!("mayfly_aws_deny_policy_entries", "role" => role.to_string())
            .set(want.written.len() as f64);
        metrics::gauge!("mayfly_aws_deny_policy_waiting", "role" => role.to_string())
            .set(want.waiting.len() as f64);
        if iam != want.policy {
            // Expired statements still in IAM are not drift; anything else is, when a
            // periodic pass finds it.
            iam.prune(now.unix_timestamp());
            if cause == SyncCause::Reconcile {
                self.report_drift(role, &iam, &want).await;
            }
            self.write_deny(role, &want.policy).await?;
            if !self
                .store
                .lock_holds(&role_lock(role), token)
                .await
                .map_err(store_err)?
            {
                return Err(SyncError::FenceLost);
            }
            // IAM is eventually consistent: give the write a moment to show.
            let mut stuck = true;
            for i in 0..3u32 {
                if self.read_deny(role).await? == want.policy {
                    stuck = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200) * (i + 1)).await;
            }
            if stuck {
                return Err(SyncError::Provider(ProviderError::Revoke(format!(
                    "the deny policy written to role {role} does not read back as written"
                ))));
            }
            metrics::counter!("mayfly_aws_deny_policy_writes_total", "role" => role.to_string())
                .increment(1);
        }
        Ok(Synced {
            next_expiry: want.policy.next_expiry(),
            issued_before: want.policy.issued_before,
            written: want.written,
        })
    }

    /// Whether some waiting lease is not yet covered by the cut-off in force.
    async fn uncovered(
        &self,
        waiting: &[String],
        cutoff: Option<i64>,
    ) -> Result<bool, ProviderError> {
        let Some(cutoff) = cutoff else {
            return Ok(true);
        };
        for id in waiting {
            let lease = match id.parse::<crate::task::LeaseId>() {
                Ok(id) => self.store.lease(&id).await.map_err(store_err)?,
                Err(_) => None,
            };
            // A member that is no lease of this store names no session Mayfly minted:
            // nothing to cut off for it (and no reason to move the cut-off every pass).
            if lease.is_some_and(|l| !covered_by_cutoff(&l, cutoff, self.cfg.timeout)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The `issued_before_deny` fallback: records a cut-off at `now` in the store (it
    /// lasts until every session issued before it has died), audits and alerts.
    async fn cut_off(
        &self,
        role: &str,
        state: &RoleState,
        waiting: &[String],
        now: OffsetDateTime,
    ) -> Result<(), ProviderError> {
        let t = now.unix_timestamp();
        let until = now + state.max_session + self.cfg.timeout;
        self.store
            .deny_add(
                &deny_set(role),
                &format!("{CUTOFF_MEMBER_PREFIX}{t}"),
                until,
            )
            .await
            .map_err(store_err)?;
        metrics::counter!("mayfly_aws_issued_before_deny_total", "role" => role.to_string())
            .increment(1);
        tracing::error!(
            role,
            issued_before = t,
            waiting = waiting.len(),
            "aws deny policy full: denying every session of the role issued before now (on_policy_full = issued_before_deny)"
        );
        let mut e = AuditEvent::new("aws.deny_policy.issued_before");
        e.provider = Some("aws");
        e.outcome = Some(format!("issued_before {t}"));
        e.detail = Some(format!(
            "role {role}: deny policy full with {} revocation(s) waiting; every session of the role issued before {t} is denied until {}",
            waiting.len(),
            until.unix_timestamp()
        ));
        e.revoked = waiting.to_vec();
        self.record(e).await;
        Ok(())
    }

    /// A periodic pass found IAM's policy different from the store's rendering: audit
    /// what a person or another tool changed (revoked leases missing from IAM, entries
    /// the store does not hold, a cut-off added or removed), and count it.
    async fn report_drift(&self, role: &str, iam: &DenyPolicy, want: &Rendered) {
        let have = iam.leases();
        let mut missing = Vec::new();
        for id in want.written.iter().filter(|id| !have.contains(id.as_str())) {
            // An entry whose revocation is still in flight is not drift yet.
            let revoked = match id.parse::<crate::task::LeaseId>() {
                Ok(lid) => self
                    .store
                    .lease(&lid)
                    .await
                    .ok()
                    .flatten()
                    .is_none_or(|l| l.state != crate::lease::LeaseState::Revoking),
                Err(_) => true,
            };
            if revoked {
                missing.push(id.clone());
            }
        }
        let unknown = have
            .iter()
            .filter(|id| !want.written.contains(**id))
            .count();
        let cutoff_changed = iam.issued_before() != want.policy.issued_before();
        if missing.is_empty() && unknown == 0 && !cutoff_changed {
            return;
        }
        metrics::counter!("mayfly_aws_deny_policy_drift_total", "role" => role.to_string())
            .increment(1);
        tracing::warn!(
            role,
            missing = missing.len(),
            unknown,
            cutoff_changed,
            "aws deny policy drifted from the store; rewriting it"
        );
        let mut e = AuditEvent::new("aws.deny_policy.drift");
        e.provider = Some("aws");
        e.outcome = Some("rewritten".into());
        e.detail = Some(format!(
            "role {role}: {} revoked entr(ies) missing from IAM restored, {unknown} unknown entr(ies) removed{}",
            missing.len(),
            if cutoff_changed {
                ", issued-before cut-off restored"
            } else {
                ""
            }
        ));
        e.revoked = missing;
        self.record(e).await;
    }

    async fn record(&self, event: AuditEvent) {
        // The IAM change is made; failing to record it must not undo it. Logged loudly.
        if let Err(e) = self.audit.write(event).await {
            tracing::error!(error = %e, "audit record of an aws deny-policy change could not be written");
        }
    }

    /// Denies the session of `lease` until `until`: records the entry in the store
    /// first (so no later rendering can drop it), then syncs the role's policy, unless a
    /// sync of this process already wrote it.
    pub(super) async fn deny(
        &self,
        lease: &Lease,
        role: &str,
        until: OffsetDateTime,
    ) -> Result<(), ProviderError> {
        let state = self
            .roles
            .get(role)
            .ok_or_else(|| ProviderError::NotAllowed(format!("no aws target uses role {role}")))?;
        // Stored with the expiry of the statement it lands in (rounded up to the
        // minute), so the store and IAM drop it at the same moment.
        let until = OffsetDateTime::from_unix_timestamp(round_up_minute(until.unix_timestamp()))
            .map_err(|e| ProviderError::Revoke(e.to_string()))?;
        self.store
            .deny_add(&deny_set(role), lease.id.as_str(), until)
            .await
            .map_err(store_err)?;
        let mut synced = state.synced.lock().await;
        // A sync that started after the entry was added and read it back covers it.
        if synced
            .as_ref()
            .is_some_and(|s| s.denies(lease, self.cfg.timeout))
        {
            return Ok(());
        }
        let fresh = self.sync_role(role, SyncCause::Revocation).await?;
        let denied = fresh.denies(lease, self.cfg.timeout);
        let next = fresh.next_expiry;
        *synced = Some(fresh);
        if denied {
            return Ok(());
        }
        // No room: look again when the first statement expires, or after the next
        // reconcile pass (which admits waiting entries as soon as room frees), whichever
        // comes first.
        let reconcile = i64::try_from(self.cfg.reconcile_interval.as_secs()).unwrap_or(60);
        let wait = next
            .map_or(60, |t| t - OffsetDateTime::now_utc().unix_timestamp() + 1)
            .min(reconcile)
            .clamp(1, 60);
        Err(ProviderError::Deferred {
            reason: format!("deny policy of role {role} is full"),
            retry_after_secs: u64::try_from(wait).unwrap_or(60),
        })
    }

    /// One reconcile pass over every role (each replica runs it every interval).
    pub async fn reconcile_all(&self) {
        for (role, state) in &self.roles {
            let mut synced = state.synced.lock().await;
            match self.sync_role(role, SyncCause::Reconcile).await {
                Ok(s) => {
                    *synced = Some(s);
                    metrics::counter!("mayfly_aws_deny_policy_reconcile_total", "outcome" => "ok")
                        .increment(1);
                }
                Err(e) => {
                    metrics::counter!("mayfly_aws_deny_policy_reconcile_total", "outcome" => "error")
                        .increment(1);
                    tracing::warn!(role, error = %e, "aws deny-policy reconcile failed; retrying next tick");
                }
            }
        }
    }
}
