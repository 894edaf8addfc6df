//! Tasks and leases: records, the `task_leases` and `children` indexes, the reaper's
//! due index and the per-state counts.

use redb::{ReadableDatabase, ReadableTable};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

use super::hot::{Hot, LeaseTables};
use super::{
    CHILDREN, COUNTS, DUE, DUE_BY_LEASE, EmbeddedStore, LEASES, TASK_LEASES, TASKS, control,
    db_err, decode, encode, nanos, prefix_range,
};
use crate::lease::ending::{self, Ending};
use crate::lease::{
    Lease, LeaseQuery, Page, StoreError, TaskQuery, Transition, apply_transition, lease_matches,
    task_matches,
};
use crate::task::{LeaseId, Task, TaskId, TaskState};

fn bump(tx: &redb::WriteTransaction, key: &str, up: bool) -> Result<(), StoreError> {
    bump_in(&mut tx.open_table(COUNTS).map_err(db_err)?, key, up)
}

fn bump_in(t: &mut redb::Table<&str, u64>, key: &str, up: bool) -> Result<(), StoreError> {
    let cur = t.get(key).map_err(db_err)?.map_or(0, |v| v.value());
    let next = if up {
        cur.saturating_add(1)
    } else {
        cur.saturating_sub(1)
    };
    t.insert(key, next).map_err(db_err)?;
    Ok(())
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

pub(super) async fn create_task(store: &EmbeddedStore, task: &Task) -> Result<(), StoreError> {
    let task = task.clone();
    store
        .write(move |tx| {
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

/// Tasks as last read, decoded. A task's record changes in two places only: created
/// (`create_task`), then ended once (`end_task`); every other field is fixed at
/// declaration, and expiry is computed from `expires_at` at read time. So an entry is
/// good until a task ends, and any ending makes every entry stale:
/// - a reader notes the epoch *before* its read transaction and files what it read
///   under that epoch;
/// - `end_task` advances the epoch on the writer thread once its commit is done, before
///   it answers (and even if its caller has stopped waiting);
/// - an entry is used only while its epoch is current.
///
/// A read filed under an epoch that an ending then advanced is never used again, so
/// once `end_task` has returned no reader sees the task as it was. A reader racing the
/// ending itself may see the old state, as a read transaction begun just before the
/// commit would; the lease write checks the task is active inside its own transaction
/// (`journal::write_lease`), so no credential is issued under an ended task either way.
/// Tasks not found are not kept. At most `TASK_CACHE` entries: past it the cache starts
/// over.
#[derive(Debug, Default)]
pub(super) struct TaskCache {
    epoch: AtomicU64,
    entries: Mutex<HashMap<TaskId, (u64, Arc<Task>)>>,
}

/// Tasks kept decoded at once (a few hundred bytes each).
pub(super) const TASK_CACHE: usize = 4096;

impl TaskCache {
    fn current(&self, id: &TaskId, epoch: u64) -> Option<Task> {
        let kept = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(id) {
                Some((e, t)) if *e == epoch => t.clone(),
                _ => return None,
            }
        };
        // The copy is made outside the lock.
        Some(Task::clone(&kept))
    }

    fn keep(&self, task: &Task, epoch: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= TASK_CACHE && !entries.contains_key(&task.id) {
            entries.clear();
        }
        entries.insert(task.id.clone(), (epoch, Arc::new(task.clone())));
    }

    /// After a task's record changed: every entry read before is stale.
    fn advance(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

pub(super) async fn task(store: &EmbeddedStore, id: &TaskId) -> Result<Option<Task>, StoreError> {
    let cache = &store.task_cache;
    // Noted before the read transaction begins (see `TaskCache`).
    let epoch = cache.epoch.load(Ordering::SeqCst);
    if let Some(t) = cache.current(id, epoch) {
        return Ok(Some(t));
    }
    let got: Option<Task> = store.get(|db| {
        let tx = db.begin_read().map_err(db_err)?;
        let tasks = tx.open_table(TASKS).map_err(db_err)?;
        let got = tasks.get(id.as_str()).map_err(db_err)?;
        got.map(|v| decode(v.value())).transpose()
    })?;
    if let Some(t) = &got {
        cache.keep(t, epoch);
    }
    Ok(got)
}

pub(super) async fn tasks(store: &EmbeddedStore, q: &TaskQuery) -> Result<Page<Task>, StoreError> {
    let q = q.clone();
    store
        .run(move |db| {
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

pub(super) async fn end_task(
    store: &EmbeddedStore,
    id: &TaskId,
    to: TaskState,
    reason: &str,
    at: OffsetDateTime,
) -> Result<Task, StoreError> {
    let (id, reason) = (id.clone(), reason.to_string());
    let cache = store.task_cache.clone();
    let end = move |tx: &redb::WriteTransaction| {
        let task = {
            let mut tasks = tx.open_table(TASKS).map_err(db_err)?;
            let current: Task = match tasks.get(id.as_str()).map_err(db_err)? {
                Some(v) => decode(v.value())?,
                None => return Err(StoreError::NotFound(id.to_string())),
            };
            let task = match ending::end(current, to, &reason, at)? {
                Ending::Unchanged(task) => return Ok(task),
                Ending::Ended(task) => task,
            };
            tasks
                .insert(id.as_str(), encode(&task)?.as_slice())
                .map_err(db_err)?;
            task
        };
        Ok(task)
    };
    // Whatever the outcome (a spurious advance only costs a re-read), on the writer
    // thread: also when the caller stopped waiting.
    store.write_then(end, move || cache.advance()).await
}

pub(super) async fn children(
    store: &EmbeddedStore,
    id: &TaskId,
) -> Result<Vec<TaskId>, StoreError> {
    let id = id.clone();
    store
        .run(move |db| {
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

pub(super) async fn put_new(
    store: &EmbeddedStore,
    lease: &Lease,
    due_at: OffsetDateTime,
) -> Result<(), StoreError> {
    let lease = lease.clone();
    store
        .write_hot(move |hot| put_lease(hot, &lease, due_at, None).map(drop))
        .await
}

/// `put_new` and the single-use `once` in one transaction (one fsync).
pub(super) async fn put_new_once(
    store: &EmbeddedStore,
    lease: &Lease,
    due_at: OffsetDateTime,
    once: &crate::identity::OnceKey,
) -> Result<bool, StoreError> {
    let (lease, once) = (lease.clone(), once.clone());
    store
        .write_hot(move |hot| put_lease(hot, &lease, due_at, Some(&once)))
        .await
}

/// Writes a new lease and spends its single-use key, if it has one, in `tx`; both
/// preconditions are checked before anything is written. `Ok(false)`, and nothing
/// written, when the key is already spent.
pub(super) fn put_lease(
    hot: &mut Hot<'_>,
    lease: &Lease,
    due_at: OffsetDateTime,
    once: Option<&crate::identity::OnceKey>,
) -> Result<bool, StoreError> {
    let now = nanos(OffsetDateTime::now_utc());
    if let Some(once) = once
        && control::once_is_live(hot.other_tables(), &once.key, now)?
    {
        return Ok(false);
    }
    write_new(&mut hot.lease_tables()?, lease, due_at)?;
    if let Some(once) = once {
        control::put_once(hot.other_tables(), &once.key, once.until, now)?;
    }
    Ok(true)
}

/// Writes a lease that must not exist yet; `AlreadyExists`, and nothing written, when
/// it does (checked in the table it is then written to, opened once).
fn write_new(
    t: &mut LeaseTables<'_, '_>,
    lease: &Lease,
    due_at: OffsetDateTime,
) -> Result<(), StoreError> {
    if t.leases.get(lease.id.as_str()).map_err(db_err)?.is_some() {
        return Err(StoreError::AlreadyExists(lease.id.to_string()));
    }
    t.leases
        .insert(lease.id.as_str(), encode(lease)?.as_slice())
        .map_err(db_err)?;
    t.task_leases
        .insert(format!("{}/{}", lease.task_id, lease.id).as_str(), ())
        .map_err(db_err)?;
    set_due(t.due, t.due_by_lease, lease.id.as_str(), Some(due_at))?;
    bump_in(
        t.counts,
        &crate::lease::count_key(lease.provider, lease.state),
        true,
    )
}

pub(super) async fn lease(
    store: &EmbeddedStore,
    id: &LeaseId,
) -> Result<Option<Lease>, StoreError> {
    store.get(|db| {
        let tx = db.begin_read().map_err(db_err)?;
        let leases = tx.open_table(LEASES).map_err(db_err)?;
        let got = leases.get(id.as_str()).map_err(db_err)?;
        got.map(|v| decode(v.value())).transpose()
    })
}

pub(super) async fn leases(
    store: &EmbeddedStore,
    q: &LeaseQuery,
) -> Result<Page<Lease>, StoreError> {
    let q = q.clone();
    store
        .run(move |db| {
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

pub(super) async fn transition(store: &EmbeddedStore, t: Transition) -> Result<Lease, StoreError> {
    store
        .write(move |tx| {
            let (lease, _changed) = {
                let mut leases = tx.open_table(LEASES).map_err(db_err)?;
                let mut lease: Lease = match leases.get(t.lease.as_str()).map_err(db_err)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(StoreError::NotFound(t.lease.to_string())),
                };
                let from = crate::lease::count_key(lease.provider, lease.state);
                let changed = apply_transition(&mut lease, &t)?;
                let to = crate::lease::count_key(lease.provider, lease.state);
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

pub(super) async fn claim_due(
    store: &EmbeddedStore,
    now: OffsetDateTime,
    hold_until: OffsetDateTime,
    limit: usize,
) -> Result<Vec<Lease>, StoreError> {
    store
        .write(move |tx| {
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

pub(super) async fn lease_counts(store: &EmbeddedStore) -> Result<Vec<(String, u64)>, StoreError> {
    store
        .run(|db| {
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

pub(super) async fn due_count(
    store: &EmbeddedStore,
    now: OffsetDateTime,
) -> Result<usize, StoreError> {
    store
        .run(move |db| {
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
