//! Group commit: one writer thread applies queued writes in shared redb transactions.

use redb::Database;
use std::sync::Arc;

use super::{EmbeddedStore, db_err};
use crate::lease::StoreError;

/// Delivers one write's result once its group's commit outcome is known.
type Completion = Box<dyn FnOnce(Option<StoreError>) + Send>;

/// One write, applied inside a shared transaction (or failed when none could be begun).
/// Returns its completion and whether it hit a storage failure that must abort the group.
pub(super) type Op =
    Box<dyn FnOnce(Result<&redb::WriteTransaction, StoreError>) -> (Completion, bool) + Send>;

/// Writes committed together: one fsync for up to this many operations.
const MAX_GROUP: usize = 256;

/// Group commit: every write waits for the commit (fsync) of the transaction it joined,
/// so durability per operation is unchanged, but concurrent writers share one fsync.
/// Each operation checks its preconditions before it writes anything, so a refused
/// operation leaves no trace in the shared transaction; a storage error aborts the group.
pub(super) fn run(
    db: Arc<Database>,
    rx: std::sync::mpsc::Receiver<Op>,
    journal: Arc<super::journal::JournalState>,
) {
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
        let (mark, mut fatal) = match journal.begin(&txn) {
            Ok(m) => (Some(m), false),
            Err(e) => {
                tracing::error!(error = %e, "audit journal upkeep failed; write group aborted");
                (None, true)
            }
        };
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

    /// As `write`, and `after` runs on the writer thread once the group's commit is
    /// over (committed or not), before the caller is answered — also when the caller
    /// has stopped waiting.
    pub(super) async fn write_then<T, F, A>(&self, f: F, after: A) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
        A: FnOnce() + Send + 'static,
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
