//! The embedded lease store: one redb file, every operation one ACID transaction,
//! committed durably (fsync) before it returns. Single node; the default for `mayfly dev`.
//!
//! Tables: tasks and leases as JSON; `task_leases` and `children` as `parent/child` key
//! indexes; `due` as an ordered `(unix_nanos, lease_id)` index so the reaper finds due
//! leases in O(log n), with `due_by_lease` mapping back for updates.

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use time::OffsetDateTime;

use super::{
    AuditAnchor, DenyEntry, Lease, LeaseQuery, LeaseStore, Page, StoreError, TaskQuery, Transition,
    apply_transition, lease_matches, task_matches,
};
use crate::task::{LeaseId, Task, TaskId, TaskState};

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const TASK_LEASES: TableDefinition<&str, ()> = TableDefinition::new("task_leases");
const CHILDREN: TableDefinition<&str, ()> = TableDefinition::new("children");
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
const DUE_BY_LEASE: TableDefinition<&str, u64> = TableDefinition::new("due_by_lease");
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
/// `insert_once` keys → expiry (unix nanos), with `ONCE_DUE` ordering them by expiry so
/// expired keys are swept a few at a time by later inserts.
const ONCE: TableDefinition<&str, u64> = TableDefinition::new("once");
const ONCE_DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("once_due");
/// Expired `insert_once` keys removed per insert: more than one, so the table shrinks
/// whenever inserts keep coming.
const ONCE_SWEEP: usize = 8;
const ANCHORS: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_anchors");
/// Deny sets: `(set, member)` → `(seq, until as unix seconds)`.
const DENY: TableDefinition<(&str, &str), (u64, i64)> = TableDefinition::new("deny");
/// The last `seq` given out per deny set.
const DENY_SEQ: TableDefinition<&str, u64> = TableDefinition::new("deny_seq");

fn bump(tx: &redb::WriteTransaction, key: &str, up: bool) -> Result<(), StoreError> {
    let mut t = tx.open_table(COUNTS).map_err(db_err)?;
    let cur = t.get(key).map_err(db_err)?.map_or(0, |v| v.value());
    let next = if up {
        cur.saturating_add(1)
    } else {
        cur.saturating_sub(1)
    };
    t.insert(key, next).map_err(db_err)?;
    Ok(())
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    ops: std::sync::Mutex<Option<std::sync::mpsc::Sender<Op>>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Named locks: one process owns the file, so a local lock serialises every writer.
    locks: std::sync::Mutex<LocalLocks>,
}

#[derive(Default)]
struct LocalLocks {
    next_token: u64,
    held: std::collections::HashMap<String, (u64, std::time::Instant)>,
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

/// Delivers one write's result once its group's commit outcome is known.
type Completion = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// One write, applied inside a shared transaction (or failed when none could be begun).
/// Returns its completion and whether it hit a storage failure that must abort the group.
type Op = Box<dyn FnOnce(Result<&redb::WriteTransaction, StoreError>) -> (Completion, bool) + Send>;

/// Writes committed together: one fsync for up to this many operations.
const MAX_GROUP: usize = 256;

/// Group commit: every write waits for the commit (fsync) of the transaction it joined,
/// so durability per operation is unchanged, but concurrent writers share one fsync.
/// Each operation checks its preconditions before it writes anything, so a refused
/// operation leaves no trace in the shared transaction; a storage error aborts the group.
fn writer(db: Arc<Database>, rx: std::sync::mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let err = db_err(e);
                for op in group {
                    let (done, _) = op(Err(err.clone()));
                    done(Some(err.clone()));
                }
                continue;
            }
        };
        let mut completions = Vec::with_capacity(group.len());
        let mut fatal = false;
        for op in group {
            let (done, failed) = op(Ok(&txn));
            fatal |= failed;
            completions.push(done);
        }
        let outcome = if fatal {
            let _ = txn.abort();
            Some(StoreError::Unavailable(
                "storage error; write group aborted".into(),
            ))
        } else {
            crate::metrics::timed("mayfly_store_commit_seconds", || txn.commit())
                .err()
                .map(db_err)
        };
        metrics::histogram!("mayfly_store_group_commit_ops").record(completions.len() as f64);
        for done in completions {
            done(outcome.clone());
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

fn set_due(
    due: &mut redb::Table<(u64, &str), ()>,
    by_lease: &mut redb::Table<&str, u64>,
    id: &str,
    at: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    if let Some(old) = by_lease.remove(id).map_err(db_err)? {
        due.remove((old.value(), id)).map_err(db_err)?;
    }
    if let Some(at) = at {
        let n = nanos(at);
        due.insert((n, id), ()).map_err(db_err)?;
        by_lease.insert(id, n).map_err(db_err)?;
    }
    Ok(())
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        // The store holds revocation handles (e.g. Vault accessors): owner-only, also
        // when the file already existed with a wider mode.
        crate::secret::create_private(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let db = Database::create(path)
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
            tx.open_table(ONCE).map_err(db_err)?;
            tx.open_table(ONCE_DUE).map_err(db_err)?;
            tx.open_table(ANCHORS).map_err(db_err)?;
            tx.open_table(DENY).map_err(db_err)?;
            tx.open_table(DENY_SEQ).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        let db = Arc::new(db);
        let (ops, rx) = std::sync::mpsc::channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("mayfly-store-writer".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(|e| StoreError::Unavailable(format!("store writer: {e}")))?;
        Ok(Self {
            db,
            ops: std::sync::Mutex::new(Some(ops)),
            writer: Some(writer),
            locks: std::sync::Mutex::default(),
        })
    }

    /// Runs `f` in the next group-committed write transaction; returns after the commit.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, StoreError>>();
        let op: Op = Box::new(move |txn| {
            let result = match txn {
                Ok(t) => f(t),
                Err(e) => Err(e),
            };
            let fatal = matches!(
                result,
                Err(StoreError::Unavailable(_) | StoreError::Corrupt(_))
            );
            let done: Completion = Box::new(move |commit| {
                let _ = tx.send(match commit {
                    Some(e) => Err(e),
                    None => result,
                });
            });
            (done, fatal)
        });
        let stopped = || StoreError::Unavailable("store writer stopped".into());
        self.ops
            .lock()
            .map_err(|_| stopped())?
            .as_ref()
            .ok_or_else(stopped)?
            .send(op)
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// A point read (one key), on the calling task. redb reads are MVCC snapshots that
    /// never wait for the writer and take microseconds with the file in the page cache:
    /// a hop to the blocking pool (two context switches, twice per credential on the hot
    /// path) cost more than the read itself.
    fn get<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&self.db)
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

#[async_trait]
impl LeaseStore for EmbeddedStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        let task = task.clone();
        self.write(move |tx| {
            {
                let mut tasks = tx.open_table(TASKS).map_err(db_err)?;
                if tasks.get(task.id.as_str()).map_err(db_err)?.is_some() {
                    return Err(StoreError::AlreadyExists(task.id.to_string()));
                }
                tasks
                    .insert(task.id.as_str(), encode(&task)?.as_slice())
                    .map_err(db_err)?;
                if let Some(parent) = &task.parent {
                    let mut children = tx.open_table(CHILDREN).map_err(db_err)?;
                    children
                        .insert(format!("{parent}/{}", task.id).as_str(), ())
                        .map_err(db_err)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        self.get(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let tasks = tx.open_table(TASKS).map_err(db_err)?;
            let got = tasks.get(id.as_str()).map_err(db_err)?;
            got.map(|v| decode(v.value())).transpose()
        })
    }

    async fn tasks(&self, q: &TaskQuery) -> Result<Page<Task>, StoreError> {
        let q = q.clone();
        self.run(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let tasks = tx.open_table(TASKS).map_err(db_err)?;
            let start = q.after.as_ref().map(|a| a.to_string()).unwrap_or_default();
            let mut items = Vec::new();
            let mut next = None;
            for entry in tasks.range(start.as_str()..).map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                if q.after.as_ref().is_some_and(|a| k.value() == a.as_str()) {
                    continue;
                }
                let t: Task = decode(v.value())?;
                if task_matches(&t, &q) {
                    if items.len() == q.limit {
                        next = items.last().map(|l: &Task| l.id.to_string());
                        break;
                    }
                    items.push(t);
                }
            }
            Ok(Page { items, next })
        })
        .await
    }

    async fn end_task(
        &self,
        id: &TaskId,
        to: TaskState,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<Task, StoreError> {
        let (id, reason) = (id.clone(), reason.to_string());
        self.write(move |tx| {
            let task = {
                let mut tasks = tx.open_table(TASKS).map_err(db_err)?;
                let mut task: Task = match tasks.get(id.as_str()).map_err(db_err)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(StoreError::NotFound(id.to_string())),
                };
                if task.state == to {
                    return Ok(task);
                }
                if task.state != TaskState::Active {
                    return Err(StoreError::TaskEnded {
                        id: id.to_string(),
                        current: task.state,
                        to,
                    });
                }
                task.state = to;
                task.ended_at = Some(at);
                task.end_reason = Some(reason);
                tasks
                    .insert(id.as_str(), encode(&task)?.as_slice())
                    .map_err(db_err)?;
                task
            };
            Ok(task)
        })
        .await
    }

    async fn children(&self, id: &TaskId) -> Result<Vec<TaskId>, StoreError> {
        let id = id.clone();
        self.run(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(CHILDREN).map_err(db_err)?;
            let (lo, hi) = prefix_range(id.as_str());
            let mut out = Vec::new();
            for entry in table.range(lo.as_str()..hi.as_str()).map_err(db_err)? {
                let (k, _) = entry.map_err(db_err)?;
                let child = k.value().rsplit('/').next().unwrap_or_default();
                out.push(
                    child
                        .parse()
                        .map_err(|_| StoreError::Corrupt(format!("child key {}", k.value())))?,
                );
            }
            Ok(out)
        })
        .await
    }

    async fn put_new(&self, lease: &Lease, due_at: OffsetDateTime) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.write(move |tx| {
            {
                let mut leases = tx.open_table(LEASES).map_err(db_err)?;
                if leases.get(lease.id.as_str()).map_err(db_err)?.is_some() {
                    return Err(StoreError::AlreadyExists(lease.id.to_string()));
                }
                leases
                    .insert(lease.id.as_str(), encode(&lease)?.as_slice())
                    .map_err(db_err)?;
                let mut index = tx.open_table(TASK_LEASES).map_err(db_err)?;
                index
                    .insert(format!("{}/{}", lease.task_id, lease.id).as_str(), ())
                    .map_err(db_err)?;
                let mut due = tx.open_table(DUE).map_err(db_err)?;
                let mut by_lease = tx.open_table(DUE_BY_LEASE).map_err(db_err)?;
                set_due(&mut due, &mut by_lease, lease.id.as_str(), Some(due_at))?;
            }
            bump(tx, &super::count_key(lease.provider, lease.state), true)?;
            Ok(())
        })
        .await
    }

    async fn lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        self.get(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let leases = tx.open_table(LEASES).map_err(db_err)?;
            let got = leases.get(id.as_str()).map_err(db_err)?;
            got.map(|v| decode(v.value())).transpose()
        })
    }

    async fn leases(&self, q: &LeaseQuery) -> Result<Page<Lease>, StoreError> {
        let q = q.clone();
        self.run(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let leases = tx.open_table(LEASES).map_err(db_err)?;
            let mut items: Vec<Lease> = Vec::new();
            let mut next = None;
            let mut consider = |l: Lease| -> bool {
                if q.after.as_ref().is_some_and(|a| l.id <= *a) || !lease_matches(&l, &q) {
                    return true;
                }
                if items.len() == q.limit {
                    next = items.last().map(|l| l.id.to_string());
                    return false;
                }
                items.push(l);
                true
            };
            if let Some(task) = &q.task {
                let index = tx.open_table(TASK_LEASES).map_err(db_err)?;
                let (lo, hi) = prefix_range(task.as_str());
                for entry in index.range(lo.as_str()..hi.as_str()).map_err(db_err)? {
                    let (k, _) = entry.map_err(db_err)?;
                    let id = k.value().rsplit('/').next().unwrap_or_default().to_string();
                    if let Some(v) = leases.get(id.as_str()).map_err(db_err)?
                        && !consider(decode(v.value())?)
                    {
                        break;
                    }
                }
            } else {
                let start = q.after.as_ref().map(|a| a.to_string()).unwrap_or_default();
                for entry in leases.range(start.as_str()..).map_err(db_err)? {
                    let (_, v) = entry.map_err(db_err)?;
                    if !consider(decode(v.value())?) {
                        break;
                    }
                }
            }
            Ok(Page { items, next })
        })
        .await
    }

    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let q = LeaseQuery {
            task: Some(task.clone()),
            limit: usize::MAX,
            ..Default::default()
        };
        Ok(self.leases(&q).await?.items)
    }

    async fn transition(&self, t: Transition) -> Result<Lease, StoreError> {
        self.write(move |tx| {
            let (lease, _changed) = {
                let mut leases = tx.open_table(LEASES).map_err(db_err)?;
                let mut lease: Lease = match leases.get(t.lease.as_str()).map_err(db_err)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(StoreError::NotFound(t.lease.to_string())),
                };
                let from = super::count_key(lease.provider, lease.state);
                let changed = apply_transition(&mut lease, &t)?;
                let to = super::count_key(lease.provider, lease.state);
                if changed && from != to {
                    bump(tx, &from, false)?;
                    bump(tx, &to, true)?;
                }
                if changed {
                    leases
                        .insert(lease.id.as_str(), encode(&lease)?.as_slice())
                        .map_err(db_err)?;
                    let mut due = tx.open_table(DUE).map_err(db_err)?;
                    let mut by_lease = tx.open_table(DUE_BY_LEASE).map_err(db_err)?;
                    set_due(&mut due, &mut by_lease, lease.id.as_str(), t.due_at)?;
                }
                (lease, changed)
            };
            Ok(lease)
        })
        .await
    }

    async fn claim_due(
        &self,
        now: OffsetDateTime,
        hold_until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.write(move |tx| {
            let mut out = Vec::new();
            {
                let mut due = tx.open_table(DUE).map_err(db_err)?;
                let mut by_lease = tx.open_table(DUE_BY_LEASE).map_err(db_err)?;
                let leases = tx.open_table(LEASES).map_err(db_err)?;
                let upto = nanos(now);
                let mut ids = Vec::new();
                for entry in due.range((0u64, "")..).map_err(db_err)? {
                    let (k, _) = entry.map_err(db_err)?;
                    let (at, id) = k.value();
                    if at > upto || ids.len() >= limit {
                        break;
                    }
                    ids.push(id.to_string());
                }
                for id in ids {
                    set_due(&mut due, &mut by_lease, &id, Some(hold_until))?;
                    if let Some(v) = leases.get(id.as_str()).map_err(db_err)? {
                        out.push(decode(v.value())?);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn lease_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.run(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(COUNTS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                out.push((k.value().to_string(), v.value()));
            }
            Ok(out)
        })
        .await
    }

    async fn due_count(&self, now: OffsetDateTime) -> Result<usize, StoreError> {
        self.run(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let due = tx.open_table(DUE).map_err(db_err)?;
            let upto = nanos(now);
            let mut n = 0;
            for entry in due.range((0u64, "")..).map_err(db_err)? {
                let (k, _) = entry.map_err(db_err)?;
                if k.value().0 > upto {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    async fn put_anchor(&self, anchor: &AuditAnchor) -> Result<bool, StoreError> {
        let anchor = anchor.clone();
        self.write(move |tx| {
            let mut t = tx.open_table(ANCHORS).map_err(db_err)?;
            let stored: Option<AuditAnchor> = t
                .get(anchor.node.as_str())
                .map_err(db_err)?
                .map(|v| decode(v.value()))
                .transpose()?;
            if !super::anchor_advances(stored.as_ref(), &anchor) {
                return Ok(false);
            }
            let bytes = encode(&anchor)?;
            t.insert(anchor.node.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    async fn anchors(&self) -> Result<Vec<AuditAnchor>, StoreError> {
        self.run(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(ANCHORS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn insert_once(&self, key: &str, expires_at: OffsetDateTime) -> Result<bool, StoreError> {
        let key = key.to_string();
        let now = nanos(OffsetDateTime::now_utc());
        let until = nanos(expires_at);
        self.write(move |tx| {
            let mut once = tx.open_table(ONCE).map_err(db_err)?;
            let mut due = tx.open_table(ONCE_DUE).map_err(db_err)?;
            let current = once.get(key.as_str()).map_err(db_err)?.map(|v| v.value());
            if current.is_some_and(|exp| exp > now) {
                return Ok(false);
            }
            if let Some(old) = current {
                due.remove((old, key.as_str())).map_err(db_err)?;
            }
            let expired: Vec<(u64, String)> = due
                .range(..(now, ""))
                .map_err(db_err)?
                .take(ONCE_SWEEP)
                .map(|e| e.map(|(k, _)| (k.value().0, k.value().1.to_string())))
                .collect::<Result<_, _>>()
                .map_err(db_err)?;
            for (at, k) in expired {
                due.remove((at, k.as_str())).map_err(db_err)?;
                once.remove(k.as_str()).map_err(db_err)?;
            }
            once.insert(key.as_str(), until).map_err(db_err)?;
            due.insert((until, key.as_str()), ()).map_err(db_err)?;
            Ok(true)
        })
        .await
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
        let (set, member, until) = (set.to_string(), member.to_string(), until.unix_timestamp());
        self.write(move |tx| {
            let mut deny = tx.open_table(DENY).map_err(db_err)?;
            let cur = deny
                .get((set.as_str(), member.as_str()))
                .map_err(db_err)?
                .map(|v| v.value());
            let entry = match cur {
                Some((seq, old)) => (seq, old.max(until)),
                None => {
                    let mut seqs = tx.open_table(DENY_SEQ).map_err(db_err)?;
                    let seq = seqs
                        .get(set.as_str())
                        .map_err(db_err)?
                        .map_or(0, |v| v.value())
                        .saturating_add(1);
                    seqs.insert(set.as_str(), seq).map_err(db_err)?;
                    (seq, until)
                }
            };
            deny.insert((set.as_str(), member.as_str()), entry)
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn deny_list(
        &self,
        set: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<DenyEntry>, StoreError> {
        let set = set.to_string();
        let now = now.unix_timestamp();
        self.run(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let deny = tx.open_table(DENY).map_err(db_err)?;
            let mut out = Vec::new();
            for row in deny.range((set.as_str(), "")..).map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let (s, member) = k.value();
                if s != set {
                    break;
                }
                let (seq, until) = v.value();
                if until > now {
                    out.push(DenyEntry {
                        member: member.to_string(),
                        until: OffsetDateTime::from_unix_timestamp(until)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        seq,
                    });
                }
            }
            out.sort_by_key(|e| e.seq);
            Ok(out)
        })
        .await
    }

    async fn deny_prune(&self, set: &str, now: OffsetDateTime) -> Result<usize, StoreError> {
        let set = set.to_string();
        let now = now.unix_timestamp();
        self.write(move |tx| {
            let mut deny = tx.open_table(DENY).map_err(db_err)?;
            let mut gone = Vec::new();
            for row in deny.range((set.as_str(), "")..).map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let (s, member) = k.value();
                if s != set {
                    break;
                }
                if v.value().1 <= now {
                    gone.push(member.to_string());
                }
            }
            for m in &gone {
                deny.remove((set.as_str(), m.as_str())).map_err(db_err)?;
            }
            Ok(gone.len())
        })
        .await
    }

    async fn lock_acquire(
        &self,
        name: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        let now = std::time::Instant::now();
        let mut l = self.locks.lock().map_err(|_| poisoned())?;
        if l.held.get(name).is_some_and(|(_, until)| *until > now) {
            return Ok(None);
        }
        l.next_token += 1;
        let token = l.next_token;
        l.held.insert(name.to_string(), (token, now + ttl));
        Ok(Some(token))
    }

    async fn lock_holds(&self, name: &str, token: u64) -> Result<bool, StoreError> {
        let now = std::time::Instant::now();
        let l = self.locks.lock().map_err(|_| poisoned())?;
        Ok(l.held
            .get(name)
            .is_some_and(|(t, until)| *t == token && *until > now))
    }

    async fn lock_release(&self, name: &str, token: u64) -> Result<(), StoreError> {
        let mut l = self.locks.lock().map_err(|_| poisoned())?;
        if l.held.get(name).is_some_and(|(t, _)| *t == token) {
            l.held.remove(name);
        }
        Ok(())
    }
}
