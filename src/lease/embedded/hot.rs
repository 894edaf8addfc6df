//! The tables every credential writes, opened once per write group.
//!
//! Each credential's joint write (its lease, the lease's indexes and count, its audit
//! record) touches seven tables. Opening a redb table in a write transaction costs a
//! lookup in the table tree, its type names checked and allocated, and on close its root
//! staged back: about a sixth of the writer's CPU when every operation opened its own
//! (docs/benchmarks.md, 2026-12-02, thirteenth session). A group now opens them when the
//! first credential needs them and keeps them open for the next ones.
//!
//! redb refuses to open a table that is already open, so an operation that opens tables
//! itself gets the transaction through [`Hot::tx`], which closes the group's tables
//! first; they are reopened when the next credential needs them. Every table is closed
//! before the commit.

use redb::{Table, TableDefinition, WriteTransaction};

use super::{COUNTS, DUE, DUE_BY_LEASE, LEASES, TASK_LEASES, TASKS, db_err, journal};
use crate::lease::StoreError;

type Slot<'t, K, V> = Option<Table<'t, K, V>>;

/// A write group's transaction and the credential tables it holds open.
pub(super) struct Hot<'t> {
    tx: &'t WriteTransaction,
    tasks: Slot<'t, &'static str, &'static [u8]>,
    leases: Slot<'t, &'static str, &'static [u8]>,
    task_leases: Slot<'t, &'static str, ()>,
    due: Slot<'t, (u64, &'static str), ()>,
    due_by_lease: Slot<'t, &'static str, u64>,
    counts: Slot<'t, &'static str, u64>,
    journal: Slot<'t, u64, &'static [u8]>,
}

/// The open credential tables, borrowed together.
pub(super) struct LeaseTables<'a, 't> {
    pub tasks: &'a mut Table<'t, &'static str, &'static [u8]>,
    pub leases: &'a mut Table<'t, &'static str, &'static [u8]>,
    pub task_leases: &'a mut Table<'t, &'static str, ()>,
    pub due: &'a mut Table<'t, (u64, &'static str), ()>,
    pub due_by_lease: &'a mut Table<'t, &'static str, u64>,
    pub counts: &'a mut Table<'t, &'static str, u64>,
    pub journal: &'a mut Table<'t, u64, &'static [u8]>,
}

fn open<'a, 't, K: redb::Key + 'static, V: redb::Value + 'static>(
    slot: &'a mut Slot<'t, K, V>,
    tx: &'t WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<&'a mut Table<'t, K, V>, StoreError> {
    if slot.is_none() {
        *slot = Some(tx.open_table(def).map_err(db_err)?);
    }
    slot.as_mut()
        .ok_or_else(|| StoreError::Unavailable("a table of the write group did not open".into()))
}

impl<'t> Hot<'t> {
    pub(super) fn new(tx: &'t WriteTransaction) -> Self {
        Self {
            tx,
            tasks: None,
            leases: None,
            task_leases: None,
            due: None,
            due_by_lease: None,
            counts: None,
            journal: None,
        }
    }

    /// The transaction, for an operation that opens its own tables: the group's are
    /// closed first.
    pub(super) fn tx(&mut self) -> &'t WriteTransaction {
        self.close();
        self.tx
    }

    /// The transaction, for tables outside this group's set (the single-use keys and
    /// their purge), while the group's stay open.
    pub(super) fn other_tables(&self) -> &'t WriteTransaction {
        self.tx
    }

    /// Closes every table this group holds open (before the commit, or before an
    /// operation opens its own).
    pub(super) fn close(&mut self) {
        self.tasks = None;
        self.leases = None;
        self.task_leases = None;
        self.due = None;
        self.due_by_lease = None;
        self.counts = None;
        self.journal = None;
    }

    /// The credential tables, opened if they are not yet.
    pub(super) fn lease_tables(&mut self) -> Result<LeaseTables<'_, 't>, StoreError> {
        let tx = self.tx;
        Ok(LeaseTables {
            tasks: open(&mut self.tasks, tx, TASKS)?,
            leases: open(&mut self.leases, tx, LEASES)?,
            task_leases: open(&mut self.task_leases, tx, TASK_LEASES)?,
            due: open(&mut self.due, tx, DUE)?,
            due_by_lease: open(&mut self.due_by_lease, tx, DUE_BY_LEASE)?,
            counts: open(&mut self.counts, tx, COUNTS)?,
            journal: open(&mut self.journal, tx, journal::AUDIT_JOURNAL)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableDatabase;

    #[test]
    fn an_operation_opening_its_own_tables_gets_the_groups_closed_first() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = redb::Database::create(dir.path().join("h.redb")).expect("db");
        let tx = db.begin_write().expect("tx");
        let mut hot = Hot::new(&tx);
        let put = |t: &mut Table<'_, &'static str, &'static [u8]>, k: &str| {
            t.insert(k, b"v".as_slice()).expect("insert");
        };
        put(hot.lease_tables().expect("open").leases, "a");
        // Opened behind the group's back, redb refuses the table the group holds...
        assert!(hot.other_tables().open_table(LEASES).is_err());
        // ...through `tx` the group's tables are closed first, and reopened after.
        put(&mut hot.tx().open_table(LEASES).expect("own"), "b");
        put(hot.lease_tables().expect("reopen").leases, "c");
        drop(hot);
        tx.commit().expect("commit");
        let read = db.begin_read().expect("read");
        let leases = read.open_table(LEASES).expect("leases");
        for k in ["a", "b", "c"] {
            assert!(leases.get(k).expect("get").is_some(), "{k} committed");
        }
    }
}
