//! The Redis lease store, shared by every broker replica.
//!
//! Every key carries the hash tag `{prefix}`, so all of Mayfly's keys live in one hash
//! slot: multi-key Lua scripts stay atomic on Redis Cluster too (at the price of one
//! shard holding all lease state — a lease is ~1 KiB, so 1M leases ≈ 1 GiB).
//!
//! Keys: `{p}:task:ID` and `{p}:lease:ID` (JSON), `{p}:tl:TASK` (set: the task's leases),
//! `{p}:ch:TASK` (set: sub-tasks), `{p}:tasks` and `{p}:leases` (sorted sets by id for
//! pagination), `{p}:due` (sorted set: lease id by due time in ms — the reaper's O(log n)
//! expiry index). Provider revocation state: `{p}:deny:SET` (hash: member → `seq:until`)
//! with `{p}:denyseq:SET` (its counter), `{p}:lock:NAME` (the holder's fencing token, with
//! a TTL) with `{p}:fence:NAME` (the last token given out, never reset). Audit anchors:
//! `{p}:anchor:NODE` (hash: each replica's published chain head), `{p}:anchors` (set of
//! anchored nodes). Control state, each key with its own Redis expiry (no clear-all):
//! `{p}:once:KEY` (single-use keys, `SET NX PXAT`), `{p}:flag:KEY` (value: expiry ms),
//! `{p}:win:KEY` (sorted set of events by ms: one sliding window), `{p}:risk:KEY`
//! (sorted set of `weight|name|unique` by ms). Approvals: `{p}:apr:ID` (JSON, expiring
//! at its `keep_until`), `{p}:aprfp:FINGERPRINT` (→ id), `{p}:aprlive:PRINCIPAL`
//! (sorted set: the requester's live approvals by deadline, for its cap), `{p}:aprs`
//! (sorted set: every approval by `keep_until`, for listing). Buckets: `{p}:bucket:KEY`
//! (GCRA theoretical arrival time, µs on the server's clock).
//!
//! State transitions are compare-and-set: the new record is computed by the same Rust
//! code as the embedded store (`apply_transition`, `ending::end`) and written by a Lua
//! script only if the stored record is still the one it was computed from; otherwise it
//! is re-read and re-checked. Claims on due leases are one Lua script, so a lease is claimed by exactly
//! one replica per claim period.
//!
//! Each concern keeps its scripts and operations in its own file: `connection`
//! (connecting, timeouts, durability), `tasks` (tasks, leases, due index), `control`,
//! `approvals`, `deny` (deny sets and locks), `anchors`.

mod anchors;
mod approvals;
mod connection;
mod control;
mod deny;
mod tasks;

use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use super::{
    AuditAnchor, ControlRead, DenyEntry, Lease, LeaseQuery, LeaseStore, Observation, Observed,
    Page, RiskEvent, StoreError, TaskQuery, Transition,
};
use crate::approval::{Approval, ApprovalState, ApprovalTransition, TransitionOutcome};
use crate::task::{LeaseId, Task, TaskId, TaskState};

/// What a write must reach before Mayfly treats it as durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// Whatever the server does (fine for dev; a crash of Redis may lose recent leases).
    Server,
    /// The server must run with `appendonly yes` and `appendfsync always`; checked at
    /// start-up with `CONFIG GET` unless `verify` is false (managed Redis without CONFIG).
    Aof { verify: bool },
    /// After each write, `WAIT replicas timeout`: fewer acknowledgements fail the write.
    Wait { replicas: u32, timeout: Duration },
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://`, `redis+sentinel://h1:p1,h2:p2/master`, `redis+cluster://h1:p1,h2:p2`
    pub url: String,
    pub key_prefix: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) to verify a `rediss://` server; the system roots otherwise.
    pub tls_ca_file: Option<PathBuf>,
    pub durability: Durability,
    /// Upper bound on any single store operation; past it the request fails closed.
    pub op_timeout: Duration,
}

pub struct RedisStore {
    backend: connection::Backend,
    prefix: String,
    durability: Durability,
    op_timeout: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// How many CAS retries before giving up under contention (each retry re-reads).
const CAS_RETRIES: usize = 16;

const SCAN_BATCH: usize = 500;

impl RedisStore {
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{{{}}}:{kind}:{id}", self.prefix)
    }

    fn index(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.prefix)
    }
}

/// Each operation lives with its concern (see the module docs); this impl routes to them.
#[async_trait]
impl LeaseStore for RedisStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        tasks::create_task(self, task).await
    }

    async fn task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        tasks::task(self, id).await
    }

    async fn tasks(&self, q: &TaskQuery) -> Result<Page<Task>, StoreError> {
        tasks::tasks(self, q).await
    }

    async fn end_task(
        &self,
        id: &TaskId,
        to: TaskState,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<Task, StoreError> {
        tasks::end_task(self, id, to, reason, at).await
    }

    async fn children(&self, id: &TaskId) -> Result<Vec<TaskId>, StoreError> {
        tasks::children(self, id).await
    }

    async fn put_new(&self, lease: &Lease, due_at: OffsetDateTime) -> Result<(), StoreError> {
        tasks::put_new(self, lease, due_at).await
    }

    async fn lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        tasks::lease(self, id).await
    }

    async fn leases(&self, q: &LeaseQuery) -> Result<Page<Lease>, StoreError> {
        tasks::leases(self, q).await
    }

    async fn transition(&self, t: Transition) -> Result<Lease, StoreError> {
        tasks::transition(self, t).await
    }

    async fn claim_due(
        &self,
        now: OffsetDateTime,
        hold_until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        tasks::claim_due(self, now, hold_until, limit).await
    }

    async fn lease_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        tasks::lease_counts(self).await
    }

    async fn due_count(&self, now: OffsetDateTime) -> Result<usize, StoreError> {
        tasks::due_count(self, now).await
    }

    async fn insert_once(&self, key: &str, expires_at: OffsetDateTime) -> Result<bool, StoreError> {
        control::insert_once(self, key, expires_at).await
    }

    async fn shared_secret(&self, name: &str, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
        control::shared_secret(self, name, candidate).await
    }

    async fn set_flag(&self, key: &str, until: OffsetDateTime) -> Result<(), StoreError> {
        control::set_flag(self, key, until).await
    }

    async fn flags(&self, keys: &[String], now: OffsetDateTime) -> Result<Vec<bool>, StoreError> {
        control::flags(self, keys, now).await
    }

    async fn observe(&self, obs: &Observation) -> Result<Vec<u64>, StoreError> {
        control::observe(self, obs).await
    }

    async fn observe_and_read(
        &self,
        obs: &Observation,
        read: &ControlRead,
    ) -> Result<Observed, StoreError> {
        control::observe_and_read(self, obs, read).await
    }

    async fn risk_events(
        &self,
        keys: &[String],
        since: OffsetDateTime,
    ) -> Result<Vec<RiskEvent>, StoreError> {
        control::risk_events(self, keys, since).await
    }

    async fn take_token(
        &self,
        key: &str,
        limit: crate::ratelimit::RateLimit,
    ) -> Result<Result<(), Duration>, StoreError> {
        control::take_token(self, key, limit).await
    }

    async fn create_approval(&self, a: &Approval, cap: usize) -> Result<bool, StoreError> {
        approvals::create_approval(self, a, cap).await
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        approvals::approval(self, id).await
    }

    async fn approval_for(&self, fingerprint: &str) -> Result<Option<Approval>, StoreError> {
        approvals::approval_for(self, fingerprint).await
    }

    async fn transition_approval(
        &self,
        t: &ApprovalTransition,
    ) -> Result<TransitionOutcome, StoreError> {
        approvals::transition_approval(self, t).await
    }

    async fn approvals(
        &self,
        state: Option<ApprovalState>,
        limit: usize,
    ) -> Result<Vec<Approval>, StoreError> {
        approvals::approvals(self, state, limit).await
    }

    async fn put_anchor(&self, anchor: &AuditAnchor) -> Result<bool, StoreError> {
        anchors::put_anchor(self, anchor).await
    }

    async fn anchors(&self) -> Result<Vec<AuditAnchor>, StoreError> {
        anchors::anchors(self).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        connection::ping(self).await
    }

    async fn deny_add(
        &self,
        set: &str,
        member: &str,
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        deny::deny_add(self, set, member, until).await
    }

    async fn deny_list(
        &self,
        set: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<DenyEntry>, StoreError> {
        deny::deny_list(self, set, now).await
    }

    async fn deny_prune(&self, set: &str, now: OffsetDateTime) -> Result<usize, StoreError> {
        deny::deny_prune(self, set, now).await
    }

    async fn lock_acquire(&self, name: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        deny::lock_acquire(self, name, ttl).await
    }

    async fn lock_holds(&self, name: &str, token: u64) -> Result<bool, StoreError> {
        deny::lock_holds(self, name, token).await
    }

    async fn lock_release(&self, name: &str, token: u64) -> Result<(), StoreError> {
        deny::lock_release(self, name, token).await
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("durability", &self.durability)
            .finish()
    }
}

/// Exposed for tests that need raw access (fault injection).
pub fn shared(store: RedisStore) -> Arc<dyn LeaseStore> {
    Arc::new(store)
}
