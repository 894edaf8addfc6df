//! What a request does, typed once and shared by policy, audit and the broker, and
//! what would take back a state change whose audit record could not be written.

use serde::{Serialize, Serializer};

use crate::task::{LeaseId, TaskId};

/// Every action a `/v1` request can perform. The audit record's `action` field and the
/// policy metrics carry [`Action::as_str`]; the three Cedar actions are the first three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    DeclareTask,
    MintCredential,
    DelegateTask,
    ReadTask,
    DecideApproval,
    CollectApproval,
    ListApprovals,
    Signal,
    CompleteTask,
    RevokeTask,
    RevokeLease,
    BulkRevoke,
    ReadLease,
    ListLeases,
    ListTasks,
    Introspect,
}

impl Action {
    /// Every action, for table-driven tests and docs.
    pub const ALL: [Action; 16] = [
        Action::DeclareTask,
        Action::MintCredential,
        Action::DelegateTask,
        Action::ReadTask,
        Action::DecideApproval,
        Action::CollectApproval,
        Action::ListApprovals,
        Action::Signal,
        Action::CompleteTask,
        Action::RevokeTask,
        Action::RevokeLease,
        Action::BulkRevoke,
        Action::ReadLease,
        Action::ListLeases,
        Action::ListTasks,
        Action::Introspect,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::DeclareTask => "DeclareTask",
            Action::MintCredential => "MintCredential",
            Action::DelegateTask => "DelegateTask",
            Action::ReadTask => "ReadTask",
            Action::DecideApproval => "DecideApproval",
            Action::CollectApproval => "CollectApproval",
            Action::ListApprovals => "ListApprovals",
            Action::Signal => "Signal",
            Action::CompleteTask => "CompleteTask",
            Action::RevokeTask => "RevokeTask",
            Action::RevokeLease => "RevokeLease",
            Action::BulkRevoke => "BulkRevoke",
            Action::ReadLease => "ReadLease",
            Action::ListLeases => "ListLeases",
            Action::ListTasks => "ListTasks",
            Action::Introspect => "Introspect",
        }
    }

    /// Whether the action can grant something (a task, a credential, an approval) that
    /// must not outlive a failed audit write. Revocations only take access away, so they
    /// stand even when their record fails (the request still fails closed with 503).
    pub fn grants(self) -> bool {
        matches!(
            self,
            Action::DeclareTask
                | Action::MintCredential
                | Action::DelegateTask
                | Action::DecideApproval
                | Action::CollectApproval
        )
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What takes back one state change a request made. The broker registers an undo on the
/// request's audit scope at the moment it creates something; `Broker::commit` runs them
/// all, in reverse order, if the request's audit record cannot be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// A lease (and the credential it tracks) created by this request.
    RevokeLease(LeaseId),
    /// A task (declared, delegated or implicit) created by this request, with its tree.
    EndTaskTree(TaskId),
    /// An approval this request approved: it goes back to refused.
    DenyApproval(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_a_distinct_name() {
        let names: std::collections::HashSet<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names.len(), Action::ALL.len());
    }

    #[test]
    fn actions_serialize_as_their_names() {
        for a in Action::ALL {
            assert_eq!(
                serde_json::to_value(a).expect("serialize"),
                serde_json::Value::from(a.as_str())
            );
        }
    }
}
