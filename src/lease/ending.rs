//! The rule for ending a task, written once for both stores so they cannot drift: only
//! an active task ends, ending it again in the same state changes nothing, and the ended
//! record carries its final state, when and why. Each store reads the current record,
//! asks [`end`] what to write, and writes it atomically its own way (a compare-and-set
//! script on Redis, one transaction on redb).
//!
//! Only the task's own record changes here: its sub-tasks and leases are ended by
//! `revocation::Revoker::end_task_tree`, which ends each task of the tree through the
//! store and then revokes its leases at the provider.

use time::OffsetDateTime;

use super::StoreError;
use crate::task::{Task, TaskState};

/// What ending a task comes to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The task had already ended in the requested state: nothing to write.
    Unchanged(Task),
    /// The ended record, to be written in place of the current one.
    Ended(Task),
}

/// Ends `task` as `to` at `at` for `reason` (the rule is `Task::end`), or says why it
/// cannot end.
pub(crate) fn end(
    mut task: Task,
    to: TaskState,
    reason: &str,
    at: OffsetDateTime,
) -> Result<Ending, StoreError> {
    if task.end(to, reason, at)? {
        Ok(Ending::Ended(task))
    } else {
        Ok(Ending::Unchanged(task))
    }
}

#[cfg(test)]
#[path = "ending_tests.rs"]
mod tests;
