//! The embedded lease store: one redb file, every operation one ACID transaction,
//! committed durably (fsync) before it returns. Single node; the default for `mayfly dev`.
//!
//! Tables: tasks and leases as JSON; `task_leases` and `children` as `parent/child` key
//! indexes; `due` as an ordered `(unix_nanos, lease_id)` index so the reaper finds due
//! leases in O(log n), with `due_by_lease` mapping back for updates.
//!
//! Tasks read by the request path are kept decoded in memory (`tasks::TaskCache`),
//! coherent with this store's own writes: this process alone writes the file.
//!
//! Control state: single-use keys and flags in `expiring` (key → expiry ns) with the
//! `expiry` index, risk events in `risk` — durable, so a restart keeps them; expired
//! entries are purged a bounded batch at a time on each write. Sliding windows stay in
//! memory (a single node: no caller can restart the broker to reset them), bounded with
//! least-recently-used eviction of one entry at a time, never a clear-all.
//!
//! Writes go through one writer thread that group-commits them (`writer`); each concern
//! keeps its operations in its own file: `tasks` (tasks, leases, due index), `control`,
//! `approvals`, `deny` (deny sets and locks), `anchors`.

mod anchors;
mod approvals;
mod control;
mod deny;
mod hot;
mod journal;
mod tasks;
mod writer;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use time::OffsetDateTime;

use super::{
    AuditAnchor, ControlRead, DenyEntry, Lease, LeaseQuery, LeaseStore, Observation, Observed,
    Page, RiskEvent, StoreError, TaskQuery, Transition,
};
use crate::approval::{Approval, ApprovalState, ApprovalTransition, TransitionOutcome};
use crate::task::{LeaseId, Task, TaskId, TaskState};

pub use control::MAX_WINDOWS;
use control::Windows;
use deny::LocalLocks;
use writer::Op;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const TASK_LEASES: TableDefinition<&str, ()> = TableDefinition::new("task_leases");
const CHILDREN: TableDefinition<&str, ()> = TableDefinition::new("children");
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
const DUE_BY_LEASE: TableDefinition<&str, u64> = TableDefinition::new("due_by_lease");
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
const ANCHORS: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_anchors");
/// Deny sets: `(set, member)` → `(seq, until as unix seconds)`.
const DENY: TableDefinition<(&str, &str), (u64, i64)> = TableDefinition::new("deny");
/// The last `seq` given out per deny set.
const DENY_SEQ: TableDefinition<&str, u64> = TableDefinition::new("deny_seq");
const EXPIRING: TableDefinition<&str, u64> = TableDefinition::new("expiring");
/// Secrets every user of this file shares (`LeaseStore::shared_secret`).
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
/// (subject key, at ns, unique) → `weight|name|unique`.
const RISK: TableDefinition<(&str, u64, &str), &str> = TableDefinition::new("risk");
/// (drop at ns, subject key, unique) → at ns: the purge order of `RISK`.
const RISK_EXPIRY: TableDefinition<(u64, &str, &str), u64> = TableDefinition::new("risk_expiry");
const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
const APPROVAL_FP: TableDefinition<&str, &str> = TableDefinition::new("approval_fp");
/// (requester, id) → deadline ns, while the approval is live (its requester's cap).
const APPROVAL_LIVE: TableDefinition<(&str, &str), u64> = TableDefinition::new("approval_live");
/// (keep-until ns, id): listing order and purge order.
const APPROVAL_KEEP: TableDefinition<(u64, &str), ()> = TableDefinition::new("approval_keep");

/// Expired control entries purged per write (bounded work per request).
const PURGE_BATCH: usize = 64;

pub struct EmbeddedStore {
    db: Arc<Database>,
    windows: std::sync::Mutex<Windows>,
    buckets:
        std::sync::Mutex<std::collections::HashMap<String, Arc<crate::ratelimit::TokenBucket>>>,
    ops: std::sync::Mutex<Option<std::sync::mpsc::Sender<Op>>>,
    journal: Arc<journal::JournalState>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Named locks: one process owns the file, so a local lock serialises every writer.
    locks: std::sync::Mutex<LocalLocks>,
    /// Tasks as last read, so the request path does not decode its task each time.
    task_cache: Arc<tasks::TaskCache>,
    /// Requests that have started and will write soon (`LeaseStore::expect_write`).
    approaching: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for EmbeddedStore {
    /// Closes the queue and waits for the writer, so the file is released (and every
    /// queued write committed) when the store is gone.
    fn drop(&mut self) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.take();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn poisoned() -> StoreError {
    StoreError::Unavailable("lock table poisoned".into())
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Unavailable(e.into().to_string())
}

fn nanos(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos()).unwrap_or(0)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Upper bound for a `prefix/` range scan: '0' sorts right after '/'.
fn prefix_range(prefix: &str) -> (String, String) {
    (format!("{prefix}/"), format!("{prefix}0"))
}

/// redb's page cache unless `store.cache_bytes` says otherwise. redb's own default
/// (1 GiB) is more than the Helm chart's memory limit (512 MiB): a store grown past the
/// limit got the pod killed. 128 MiB holds the pages every write touches (the right
/// edges of the time-ordered tables) many times over; measured in docs/benchmarks.md.
pub const DEFAULT_CACHE_BYTES: usize = 128 << 20;

impl EmbeddedStore {
    /// Opens (creates) the store with the default page cache.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens (creates) the store with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        // The store holds revocation handles (e.g. Vault accessors): owner-only, also
        // when the file already existed with a wider mode.
        crate::secret::create_private(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        // Create every table up front so read transactions never meet a missing table.
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(TASKS).map_err(db_err)?;
            tx.open_table(LEASES).map_err(db_err)?;
            tx.open_table(TASK_LEASES).map_err(db_err)?;
            tx.open_table(CHILDREN).map_err(db_err)?;
            tx.open_table(DUE).map_err(db_err)?;
            tx.open_table(DUE_BY_LEASE).map_err(db_err)?;
            tx.open_table(COUNTS).map_err(db_err)?;
            tx.open_table(ANCHORS).map_err(db_err)?;
            tx.open_table(DENY).map_err(db_err)?;
            tx.open_table(DENY_SEQ).map_err(db_err)?;
            tx.open_table(EXPIRING).map_err(db_err)?;
            tx.open_table(EXPIRY).map_err(db_err)?;
            tx.open_table(RISK).map_err(db_err)?;
            tx.open_table(RISK_EXPIRY).map_err(db_err)?;
            tx.open_table(APPROVALS).map_err(db_err)?;
            tx.open_table(APPROVAL_FP).map_err(db_err)?;
            tx.open_table(APPROVAL_LIVE).map_err(db_err)?;
            tx.open_table(APPROVAL_KEEP).map_err(db_err)?;
            tx.open_table(journal::AUDIT_JOURNAL).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        let db = Arc::new(db);
        let (ops, rx) = std::sync::mpsc::channel();
        let writer_db = db.clone();
        let journal = Arc::new(journal::JournalState::load(&db)?);
        let writer_journal = journal.clone();
        let approaching = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer_approaching = approaching.clone();
        let writer = std::thread::Builder::new()
            .name("mayfly-store-writer".into())
            .spawn(move || writer::run(writer_db, rx, writer_journal, writer_approaching))
            .map_err(|e| StoreError::Unavailable(format!("store writer: {e}")))?;
        Ok(Self {
            db,
            windows: std::sync::Mutex::default(),
            buckets: std::sync::Mutex::default(),
            ops: std::sync::Mutex::new(Some(ops)),
            journal,
            writer: Some(writer),
            locks: std::sync::Mutex::default(),
            task_cache: Arc::default(),
            approaching,
        })
    }

    /// A point read (one key), on the calling task. redb reads are MVCC snapshots that
    /// never wait for the writer and take microseconds with the file in the page cache:
    /// a hop to the blocking pool (two context switches, twice per credential on the hot
    /// path) cost more than the read itself.
    fn get<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&self.db)
    }

    /// Tasks kept decoded in memory (bounded; see `tasks::TaskCache`).
    pub fn cached_tasks(&self) -> usize {
        self.task_cache.len()
    }

    /// Single-use keys and flags held (expired ones included until purged).
    pub fn control_entries(&self) -> Result<usize, StoreError> {
        self.get(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(EXPIRING).map_err(db_err)?;
            let n = table.len().map_err(db_err)?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    /// A scan (lists, counts), on the blocking pool: it may walk many records.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store worker failed: {e}")))?
    }
}

/// Each operation lives with its concern (see the module docs); this impl routes to them.
#[async_trait]
impl LeaseStore for EmbeddedStore {
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

    async fn put_new_once(
        &self,
        lease: &Lease,
        due_at: OffsetDateTime,
        once: &crate::identity::OnceKey,
    ) -> Result<bool, StoreError> {
        tasks::put_new_once(self, lease, due_at, once).await
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
    ) -> Result<Result<(), std::time::Duration>, StoreError> {
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

    fn expect_write(&self) -> crate::lease::WriteIntent {
        crate::lease::WriteIntent::counted(&self.approaching)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            tx.open_table(LEASES).map_err(db_err)?;
            Ok(())
        })
        .await
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

    async fn lock_acquire(
        &self,
        name: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        deny::lock_acquire(self, name, ttl).await
    }

    async fn lock_holds(&self, name: &str, token: u64) -> Result<bool, StoreError> {
        deny::lock_holds(self, name, token).await
    }

    async fn lock_release(&self, name: &str, token: u64) -> Result<(), StoreError> {
        deny::lock_release(self, name, token).await
    }
}
