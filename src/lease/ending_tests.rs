use time::macros::datetime;

use super::{Ending, end};
use crate::lease::StoreError;
use crate::task::{Task, TaskState};

/// A stored task record in `state` (built from its stored form, as a store reads it).
fn stored(state: &str) -> Task {
    serde_json::from_value(serde_json::json!({
        "id": crate::task::TaskId::generate().to_string(),
        "owner": "spiffe://example.org/agent",
        "purpose": "ending",
        "scope": [{"provider": "jwt", "target": "https://t", "actions": ["read"], "resources": []}],
        "created_at": "2026-01-01T00:00:00Z",
        "expires_at": "2026-01-01T01:00:00Z",
        "parent": null,
        "labels": {},
        "state": state,
        "ended_at": null,
        "end_reason": null,
    }))
    .expect("task record")
}

#[test]
fn an_active_task_ends_with_its_state_time_and_reason() {
    let at = datetime!(2026-01-01 00:30 UTC);
    let Ok(Ending::Ended(t)) = end(stored("active"), TaskState::Revoked, "operator", at) else {
        panic!("an active task must end");
    };
    assert_eq!(t.state, TaskState::Revoked);
    assert_eq!(t.ended_at, Some(at));
    assert_eq!(t.end_reason.as_deref(), Some("operator"));
}

#[test]
fn ending_again_in_the_same_state_writes_nothing() {
    let task = stored("completed");
    let got = end(
        task.clone(),
        TaskState::Completed,
        "again",
        datetime!(2026-01-01 00:40 UTC),
    );
    assert!(matches!(got, Ok(Ending::Unchanged(t)) if t == task));
}

#[test]
fn an_ended_task_cannot_end_in_another_state() {
    let got = end(
        stored("completed"),
        TaskState::Revoked,
        "late",
        datetime!(2026-01-01 00:40 UTC),
    );
    assert!(matches!(
        got,
        Err(StoreError::TaskEnded {
            current: TaskState::Completed,
            to: TaskState::Revoked,
            ..
        })
    ));
}
