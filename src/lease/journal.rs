//! The audit journal: a store that keeps audit records in the same durable commit as the
//! state change they describe, so a credential costs one durable write (lease and audit
//! record together) instead of two. The audit file is then fed from the journal, in
//! order, by the audit module's pump (`docs/audit-log.md`).
//!
//! Sequence numbers are the audit chain's `seq`: the journal hands them out in commit
//! order, gap-free (a failed commit gives its numbers back), so the file's chain and the
//! journal agree on which record is which.

use async_trait::async_trait;
use std::sync::{Condvar, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

use super::{Lease, StoreError};
use crate::identity::OnceKey;
use crate::task::TaskState;

/// A lease a request wants written with its audit record (a credential minted in
/// process): `put_new`'s arguments, and the DPoP `jti` it spends.
#[derive(Debug, Clone)]
pub struct NewLease {
    pub lease: Lease,
    pub due_at: OffsetDateTime,
    pub once: Option<OnceKey>,
}

/// What a joint commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The record (and the lease, when one was given) are durable.
    Written,
    /// The lease's single-use key was already spent: nothing was written.
    Replayed,
    /// The lease's task is no longer active: nothing was written.
    TaskEnded(TaskState),
}

/// The last committed journal sequence number, and a way to wait for the next one.
#[derive(Debug, Default)]
pub struct JournalSignal {
    committed: Mutex<u64>,
    changed: Condvar,
}

impl JournalSignal {
    pub fn publish(&self, seq: u64) {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if seq > *c {
            *c = seq;
            self.changed.notify_all();
        }
    }

    /// Sets the last committed number, also downwards (lining up with the file).
    pub fn reset(&self, seq: u64) {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = seq;
        self.changed.notify_all();
    }

    /// Wakes every waiter without a new record (shutdown).
    pub fn nudge(&self) {
        self.changed.notify_all();
    }

    pub fn committed(&self) -> u64 {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until a record after `after` is committed or `timeout` passes; returns the
    /// last committed sequence number.
    pub fn wait_after(&self, after: u64, timeout: Duration) -> u64 {
        let c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        let (c, _) = self
            .changed
            .wait_timeout_while(c, timeout, |c| *c <= after)
            .unwrap_or_else(|p| p.into_inner());
        *c
    }
}

/// A store that journals audit records (the embedded store). Records are `kind` and the
/// rendered body (JSON, without `seq`, `prev` and `hash`, which the file's chain adds).
#[async_trait]
pub trait AuditJournal: Send + Sync {
    /// Appends one record durably; with `lease`, writes the lease (and spends its
    /// single-use key) in the same commit, after checking that the key is unspent and
    /// the lease's task still active. Returns once committed.
    async fn append(
        &self,
        kind: &'static str,
        body: Vec<u8>,
        lease: Option<NewLease>,
    ) -> Result<Joined, StoreError>;

    /// Appends a record with the next write, without waiting (the pump's own records).
    fn append_later(&self, kind: &'static str, body: Vec<u8>);

    /// Lines the journal up with an audit file whose last record is `file_head`, before
    /// the first append; returns the last committed sequence number. Fails when the
    /// journal holds records the file lacks but cannot be fed from (a gap).
    fn attach(&self, file_head: u64) -> Result<u64, StoreError>;

    /// Committed records after `after`, oldest first, at most `max`.
    fn read_after(&self, after: u64, max: usize)
    -> Result<Vec<(u64, String, Vec<u8>)>, StoreError>;

    /// Records up to `seq` are durable in the file: drop them with a later write.
    fn trim_through(&self, seq: u64);

    /// Where the pump waits for new records.
    fn signal(&self) -> std::sync::Arc<JournalSignal>;
}
