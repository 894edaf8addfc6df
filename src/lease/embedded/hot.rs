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
//!
//! The lives of the tasks the group's credentials were minted under are kept decoded
//! while the group holds the `tasks` table: no credential write changes a task, and any
//! other operation (which may) goes through [`Hot::tx`], which forgets them.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use std::collections::HashMap;

use super::{COUNTS, DUE, DUE_BY_LEASE, LEASES, TASK_LEASES, TASKS, db_err, decode, journal};
use crate::lease::StoreError;
use crate::task::TaskLife;

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
    /// Task id → its life, read from `tasks` in this group (at most one per write).
    lives: HashMap<String, TaskLife>,
}

/// The open credential tables, borrowed together.
pub(super) struct LeaseTables<'a, 't> {
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
            lives: HashMap::new(),
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
        self.lives.clear();
    }

    /// The stored life of task `id` (`None`: no such task), read once per group.
    pub(super) fn task_life(&mut self, id: &str) -> Result<Option<TaskLife>, StoreError> {
        if let Some(life) = self.lives.get(id) {
            return Ok(Some(*life));
        }
        let tasks = open(&mut self.tasks, self.tx, TASKS)?;
        let Some(life) = tasks
            .get(id)
            .map_err(db_err)?
            .map(|v| decode::<TaskLife>(v.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        self.lives.insert(id.to_string(), life);
        Ok(Some(life))
    }

    /// The credential tables, opened if they are not yet.
    pub(super) fn lease_tables(&mut self) -> Result<LeaseTables<'_, 't>, StoreError> {
        let tx = self.tx;
        Ok(LeaseTables {
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
        assert!(matches!(
            hot.other_tables().open_table(LEASES),
            Err(redb::TableError::TableAlreadyOpen(..))
        ));
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

    #[test]
    fn a_task_life_is_read_once_per_group_and_forgotten_when_another_operation_runs() {
        use crate::task::TaskState;
        let life = |state: &str| {
            format!(r#"{{"state":"{state}","expires_at":"2999-01-01T00:00:00Z"}}"#).into_bytes()
        };
        let dir = tempfile::tempdir().expect("tmp");
        let db = redb::Database::create(dir.path().join("h.redb")).expect("db");
        let tx = db.begin_write().expect("tx");
        let mut hot = Hot::new(&tx);
        let write = |tx: &WriteTransaction, state: &str| {
            let mut tasks = tx.open_table(TASKS).expect("tasks");
            tasks.insert("t1", life(state).as_slice()).expect("insert");
        };
        write(hot.tx(), "active");
        let state = |hot: &mut Hot<'_>| hot.task_life("t1").expect("read").map(|l| l.state);
        assert_eq!(state(&mut hot), Some(TaskState::Active));
        assert!(hot.task_life("t2").expect("read").is_none(), "no such task");
        // Another operation ends the task in the same group: the next credential sees it.
        write(hot.tx(), "revoked");
        assert_eq!(state(&mut hot), Some(TaskState::Revoked));
    }
}
