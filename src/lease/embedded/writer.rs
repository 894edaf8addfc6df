//! Group commit: one writer thread applies queued writes in shared redb transactions.

use redb::Database;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::hot::Hot;
use super::{EmbeddedStore, db_err};
use crate::lease::StoreError;

/// Delivers one write's result once its group's commit outcome is known.
type Completion = Box<dyn FnOnce(Option<StoreError>) + Send>;

/// One write, applied inside a shared transaction (or failed when none could be begun),
/// with the group's open credential tables (`hot`). Returns its completion and whether it
/// hit a storage failure that must abort the group.
pub(super) type Op =
    Box<dyn for<'a, 't> FnOnce(Result<&'a mut Hot<'t>, StoreError>) -> (Completion, bool) + Send>;

/// Writes committed together: one fsync for up to this many operations.
const MAX_GROUP: usize = 256;

/// The longest a group waits for more writes to join it.
const MAX_GATHER: Duration = Duration::from_millis(1);

/// This many writes queued at once, committed together last time, or still to come from
/// requests in progress show that the broker is busy: waiting then gathers more of them
/// into one commit.
const BUSY_GROUP: usize = 8;

/// How long a group of `drained` writes waits for more before it commits, if at all.
///
/// Each commit costs the writer a fixed amount of CPU (redb's page bookkeeping, the
/// writes and the fdatasync: about 300 µs on the benchmark machine) shared by the
/// group, so larger groups make each credential cheaper when the broker is busy. A few
/// concurrent callers gain nothing from waiting (their requests wait on each other's
/// commits, not on the CPU, and waiting only delays them), so a group waits only when
/// `BUSY_GROUP` writes were queued at once, committed together last time, or are
/// `approaching` (requests in progress that will write their record); a lone or lightly
/// concurrent caller never waits. It waits half the last commit's duration (at most
/// `MAX_GATHER`), so the added latency stays below what the commit itself costs, on a
/// fast disk as on a slow one (docs/benchmarks.md, 2026-12-02).
fn gather_for(
    drained: usize,
    last_group: usize,
    approaching: usize,
    last_commit: Duration,
) -> Option<Duration> {
    let busy = drained >= BUSY_GROUP || last_group >= BUSY_GROUP || approaching >= BUSY_GROUP;
    let wait = (last_commit / 2).min(MAX_GATHER);
    (busy && drained < MAX_GROUP && !wait.is_zero()).then_some(wait)
}

fn drain(rx: &std::sync::mpsc::Receiver<Op>, group: &mut Vec<Op>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(op) => group.push(op),
            Err(_) => break,
        }
    }
}

/// Group commit: every write waits for the commit (fsync) of the transaction it joined,
/// so durability per operation is unchanged, but concurrent writers share one fsync.
/// Each operation checks its preconditions before it writes anything, so a refused
/// operation leaves no trace in the shared transaction; a storage error aborts the group.
pub(super) fn run(
    db: Arc<Database>,
    rx: std::sync::mpsc::Receiver<Op>,
    journal: Arc<super::journal::JournalState>,
    approaching: Arc<AtomicUsize>,
) {
    let (mut last_group, mut last_commit) = (0usize, Duration::ZERO);
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        drain(&rx, &mut group);
        let coming = approaching.load(Ordering::Relaxed);
        if let Some(wait) = gather_for(group.len(), last_group, coming, last_commit) {
            // Sleeping, not blocked in `recv`: writes arriving meanwhile queue without
            // waking this thread.
            std::thread::sleep(wait);
            drain(&rx, &mut group);
        }
        last_group = group.len();
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
        let (mark, mut fatal) = match journal.begin(&txn) {
            Ok(m) => (Some(m), false),
            Err(e) => {
                tracing::error!(error = %e, "audit journal upkeep failed; write group aborted");
                (None, true)
            }
        };
        let mut hot = Hot::new(&txn);
        for op in group {
            let (done, failed) = op(Ok(&mut hot));
            fatal |= failed;
            completions.push(done);
        }
        drop(hot);
        let outcome = if fatal {
            let _ = txn.abort();
            Some(StoreError::Unavailable(
                "storage error; write group aborted".into(),
            ))
        } else {
            let committed;
            (committed, last_commit) =
                crate::metrics::timed_for("mayfly_store_commit_seconds", || txn.commit());
            committed.err().map(db_err)
        };
        if let Some(mark) = mark {
            journal.end(mark, outcome.is_none());
        }
        metrics::histogram!("mayfly_store_group_commit_ops").record(completions.len() as f64);
        for done in completions {
            done(outcome.clone());
        }
    }
}

impl EmbeddedStore {
    /// Runs `f` in the next group-committed write transaction; returns after the commit.
    pub(super) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_then(f, || {}).await
    }

    /// As `write`, with the group's credential tables kept open across its writes
    /// (`hot`): for the per-credential writes.
    pub(super) async fn write_hot<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'a, 't> FnOnce(&'a mut Hot<'t>) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue(f, || {}).await
    }

    /// As `write`, and `after` runs on the writer thread once the group's commit is
    /// over (committed or not), before the caller is answered — also when the caller
    /// has stopped waiting.
    pub(super) async fn write_then<T, F, A>(&self, f: F, after: A) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
        A: FnOnce() + Send + 'static,
    {
        self.queue(move |hot: &mut Hot<'_>| f(hot.tx()), after)
            .await
    }

    /// Queues `f` for the writer thread; returns after its group's commit.
    async fn queue<T, F, A>(&self, f: F, after: A) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'a, 't> FnOnce(&'a mut Hot<'t>) -> Result<T, StoreError> + Send + 'static,
        A: FnOnce() + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, StoreError>>();
        let op: Op = Box::new(move |hot| {
            let result = match hot {
                Ok(h) => f(h),
                Err(e) => Err(e),
            };
            let fatal = matches!(
                result,
                Err(StoreError::Unavailable(_) | StoreError::Corrupt(_))
            );
            let done: Completion = Box::new(move |commit| {
                after();
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: Duration = Duration::from_micros(800);

    #[test]
    fn a_lone_or_lightly_concurrent_writer_never_waits() {
        assert_eq!(gather_for(1, 1, 0, COMMIT), None);
        assert_eq!(gather_for(1, 0, 0, COMMIT), None);
        let few = BUSY_GROUP - 1;
        assert_eq!(gather_for(few, few, few, COMMIT), None);
    }

    #[test]
    fn busy_writers_wait_half_the_last_commit() {
        assert_eq!(gather_for(BUSY_GROUP, 1, 0, COMMIT), Some(COMMIT / 2));
        assert_eq!(gather_for(1, BUSY_GROUP, 0, COMMIT), Some(COMMIT / 2));
        // Few writes queued, but many requests in progress that will write.
        assert_eq!(gather_for(1, 1, BUSY_GROUP, COMMIT), Some(COMMIT / 2));
    }

    #[test]
    fn the_wait_is_bounded_and_a_full_group_commits_at_once() {
        assert_eq!(
            gather_for(9, 9, 9, Duration::from_secs(1)),
            Some(MAX_GATHER)
        );
        assert_eq!(gather_for(MAX_GROUP, MAX_GROUP, 50, COMMIT), None);
        // Before the first commit there is no measure of the disk: no wait.
        assert_eq!(gather_for(20, 0, 50, Duration::ZERO), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn credential_writes_and_writes_opening_their_own_tables_mix_in_groups() {
        use super::super::LEASES;
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..200 {
            let s = store.clone();
            writes.spawn(async move {
                let key = format!("k{i}");
                if i % 2 == 0 {
                    s.write_hot(move |hot| {
                        let t = hot.lease_tables()?;
                        t.leases
                            .insert(key.as_str(), b"hot".as_slice())
                            .map_err(db_err)?;
                        Ok(())
                    })
                    .await
                } else {
                    s.write(move |tx| {
                        let mut t = tx.open_table(LEASES).map_err(db_err)?;
                        t.insert(key.as_str(), b"own".as_slice()).map_err(db_err)?;
                        Ok(())
                    })
                    .await
                }
            });
        }
        while let Some(done) = writes.join_next().await {
            done.expect("join").expect("every write commits");
        }
        let n = store
            .get(|db| {
                use redb::{ReadableDatabase, ReadableTableMetadata};
                let tx = db.begin_read().map_err(db_err)?;
                tx.open_table(LEASES).map_err(db_err)?.len().map_err(db_err)
            })
            .expect("count");
        assert_eq!(n, 200);
    }

    #[test]
    fn a_write_intent_is_counted_until_dropped() {
        use crate::lease::LeaseStore;
        let dir = tempfile::tempdir().expect("tmp");
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        let coming = || store.approaching.load(Ordering::Relaxed);
        let (a, b) = (store.expect_write(), store.expect_write());
        assert_eq!(coming(), 2);
        drop(a);
        assert_eq!(coming(), 1);
        drop(b);
        assert_eq!(coming(), 0);
    }
}
