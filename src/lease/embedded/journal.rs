//! The audit journal of the embedded store (`lease::journal`): audit records in the
//! `audit_journal` table, committed with the writes they describe, read by the audit
//! pump and dropped once the audit file holds them durably.
//!
//! Sequence numbers are given out on the writer thread only, so a group's records are
//! numbered in commit order; a group that fails to commit gives its numbers back.
//! Trimming and the pump's own records ride on the next group's transaction, so they
//! never cost a commit of their own.

use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

use super::hot::Hot;
use super::{COUNTS, EmbeddedStore, db_err, tasks};
use crate::lease::{AuditJournal, Joined, JournalSignal, NewLease, StoreError};
use crate::task::TaskState;

/// seq → `kind` `\n` body.
pub(super) const AUDIT_JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_journal");
/// Key in `counts` of the last sequence number handed out, kept when the table empties.
const SEQ_KEY: &str = "audit_journal_seq";

/// The journal's numbering and pending work, shared by the store and its writer thread.
#[derive(Default)]
pub(super) struct JournalState {
    /// Last sequence number handed out (committed or in the open group).
    next: AtomicU64,
    /// Records up to here are in the audit file; trimmed with the next group.
    trim_to: AtomicU64,
    trimmed: AtomicU64,
    /// The pump's own records, appended with the next group.
    later: Mutex<Vec<(&'static str, Vec<u8>)>>,
    signal: Arc<JournalSignal>,
}

/// What a group changed in the journal state, to publish or give back.
pub(super) struct GroupMark {
    next_before: u64,
    trim: u64,
    later: Vec<(&'static str, Vec<u8>)>,
}

impl JournalState {
    /// Reads the numbering from the open database.
    pub(super) fn load(db: &redb::Database) -> Result<Self, StoreError> {
        let tx = db.begin_read().map_err(db_err)?;
        let table = tx.open_table(AUDIT_JOURNAL).map_err(db_err)?;
        let last = table.last().map_err(db_err)?.map_or(0, |(k, _)| k.value());
        let first = table.first().map_err(db_err)?.map(|(k, _)| k.value());
        let counts = tx.open_table(COUNTS).map_err(db_err)?;
        let kept = counts
            .get(SEQ_KEY)
            .map_err(db_err)?
            .map_or(0, |v| v.value());
        let next = last.max(kept);
        let state = Self::default();
        state.next.store(next, Ordering::SeqCst);
        let trimmed = first.map_or(next, |f| f.saturating_sub(1));
        state.trimmed.store(trimmed, Ordering::SeqCst);
        state.trim_to.store(trimmed, Ordering::SeqCst);
        state.signal.publish(next);
        Ok(state)
    }

    /// Appends one record under the next sequence number, into the journal table.
    fn append_in(
        &self,
        table: &mut redb::Table<u64, &[u8]>,
        kind: &str,
        body: &[u8],
    ) -> Result<u64, StoreError> {
        let seq = self.next.load(Ordering::SeqCst) + 1;
        let mut value = Vec::with_capacity(kind.len() + 1 + body.len());
        value.extend_from_slice(kind.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(body);
        table.insert(seq, value.as_slice()).map_err(db_err)?;
        self.next.store(seq, Ordering::SeqCst);
        Ok(seq)
    }

    /// At the start of a group (writer thread): the pump's records and the pending trim.
    pub(super) fn begin(&self, tx: &redb::WriteTransaction) -> Result<GroupMark, StoreError> {
        let next_before = self.next.load(Ordering::SeqCst);
        let later = std::mem::take(&mut *self.later.lock().unwrap_or_else(|p| p.into_inner()));
        let mut mark = GroupMark {
            next_before,
            trim: self.trimmed.load(Ordering::SeqCst),
            later,
        };
        match self.upkeep(tx, &mut mark) {
            Ok(()) => Ok(mark),
            Err(e) => {
                self.end(mark, false);
                Err(e)
            }
        }
    }

    fn upkeep(&self, tx: &redb::WriteTransaction, mark: &mut GroupMark) -> Result<(), StoreError> {
        if !mark.later.is_empty() {
            let mut table = tx.open_table(AUDIT_JOURNAL).map_err(db_err)?;
            for (kind, body) in &mark.later {
                self.append_in(&mut table, kind, body)?;
            }
        }
        let to = self.trim_to.load(Ordering::SeqCst);
        if to > mark.trim {
            let mut table = tx.open_table(AUDIT_JOURNAL).map_err(db_err)?;
            table.retain_in(..=to, |_, _| false).map_err(db_err)?;
            let mut counts = tx.open_table(COUNTS).map_err(db_err)?;
            counts.insert(SEQ_KEY, to).map_err(db_err)?;
            mark.trim = to;
        }
        Ok(())
    }

    /// After the group's commit (writer thread): publish, or give the numbers back.
    pub(super) fn end(&self, mark: GroupMark, committed: bool) {
        if committed {
            self.trimmed.store(mark.trim, Ordering::SeqCst);
            self.signal.publish(self.next.load(Ordering::SeqCst));
        } else {
            self.next.store(mark.next_before, Ordering::SeqCst);
            let mut later = self.later.lock().unwrap_or_else(|p| p.into_inner());
            let newer = std::mem::replace(&mut *later, mark.later);
            later.extend(newer);
        }
    }
}

/// The joint write: the task must still be active, then `put_lease` (its single-use key
/// unspent). Nothing is written when a check fails.
fn write_lease(hot: &mut Hot<'_>, new: &NewLease) -> Result<Option<Joined>, StoreError> {
    let task_id = new.lease.task_id.as_str();
    let task = hot
        .task_life(task_id)?
        .ok_or_else(|| StoreError::NotFound(task_id.to_string()))?;
    let state = task.state_at(OffsetDateTime::now_utc());
    if state != TaskState::Active {
        return Ok(Some(Joined::TaskEnded(state)));
    }
    let written = tasks::put_lease(hot, &new.lease, new.due_at, new.once.as_ref())?;
    Ok((!written).then_some(Joined::Replayed))
}

#[async_trait]
impl AuditJournal for EmbeddedStore {
    async fn append(
        &self,
        kind: &'static str,
        body: Vec<u8>,
        lease: Option<NewLease>,
    ) -> Result<Joined, StoreError> {
        let journal = self.journal.clone();
        self.write_hot(move |hot| {
            if let Some(new) = &lease
                && let Some(refused) = write_lease(hot, new)?
            {
                return Ok(refused);
            }
            journal.append_in(hot.lease_tables()?.journal, kind, &body)?;
            Ok(Joined::Written)
        })
        .await
    }

    fn append_later(&self, kind: &'static str, body: Vec<u8>) {
        self.journal
            .later
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((kind, body));
    }

    fn attach(&self, file_head: u64) -> Result<u64, StoreError> {
        let first = self.get(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(AUDIT_JOURNAL).map_err(db_err)?;
            Ok(table.first().map_err(db_err)?.map(|(k, _)| k.value()))
        })?;
        let j = &self.journal;
        let next = j.next.load(Ordering::SeqCst);
        match first {
            Some(f) if f > file_head + 1 => Err(StoreError::Corrupt(format!(
                "the audit journal starts at seq {f} but the audit file ends at seq {file_head}: \
                 records {} to {} are in neither",
                file_head + 1,
                f - 1
            ))),
            Some(_) if next > file_head => {
                // Records up to the file's head were written before a crash cut the trim.
                j.trim_to.fetch_max(file_head, Ordering::SeqCst);
                Ok(next)
            }
            _ => {
                if next > file_head {
                    tracing::warn!(
                        journal = next,
                        file = file_head,
                        "the audit file ends before records the journal already fed to it; \
                         continuing the file's own chain"
                    );
                }
                // Everything journaled is in the file: number on from the file. Nothing
                // past the file's head may be trimmed: new records will take those
                // numbers.
                let fed = next.min(file_head);
                j.trim_to.store(fed, Ordering::SeqCst);
                j.trimmed.fetch_min(fed, Ordering::SeqCst);
                j.next.store(file_head, Ordering::SeqCst);
                j.signal.reset(file_head);
                Ok(file_head)
            }
        }
    }

    fn read_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, String, Vec<u8>)>, StoreError> {
        self.get(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(AUDIT_JOURNAL).map_err(db_err)?;
            let mut out = Vec::new();
            for row in table.range(after + 1..).map_err(db_err)?.take(max) {
                let (k, v) = row.map_err(db_err)?;
                let value = v.value();
                let split = value.iter().position(|b| *b == b'\n').ok_or_else(|| {
                    StoreError::Corrupt(format!("audit journal record {}", k.value()))
                })?;
                let kind = String::from_utf8_lossy(&value[..split]).into_owned();
                out.push((k.value(), kind, value[split + 1..].to_vec()));
            }
            Ok(out)
        })
    }

    fn trim_through(&self, seq: u64) {
        self.journal.trim_to.fetch_max(seq, Ordering::SeqCst);
    }

    fn signal(&self) -> Arc<JournalSignal> {
        self.journal.signal.clone()
    }
}
