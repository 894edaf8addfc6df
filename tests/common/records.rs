//! Store records built in code: a task and a lease as the broker would write them.

use mayfly::identity::Principal;
use mayfly::lease::Lease;
use mayfly::task::{Grant, ProviderKind, Scope, Task, TaskId, TaskState};
use std::collections::BTreeMap;
use time::{Duration, OffsetDateTime};

/// An active task of `owner` (one JWT grant on `https://t`), an hour long.
pub fn task(owner: &str, parent: Option<TaskId>, now: OffsetDateTime) -> Task {
    Task {
        id: TaskId::generate(),
        owner: Principal::parse(owner).expect("principal"),
        purpose: "contract".into(),
        scope: Scope::new(vec![Grant {
            provider: ProviderKind::Jwt,
            target: "https://t".into(),
            actions: ["read".to_string()].into(),
            resources: Default::default(),
        }])
        .expect("scope"),
        created_at: now,
        expires_at: now + Duration::hours(1),
        parent,
        labels: BTreeMap::new(),
        state: TaskState::Active,
        ended_at: None,
        end_reason: None,
        origin: None,
    }
}

/// A `pending` lease under `task`'s first grant.
pub fn lease(task: &Task, now: OffsetDateTime, ttl: Duration) -> Lease {
    Lease::pending(
        &task.id,
        &task.owner,
        &task.scope.grants()[0],
        now,
        now + ttl,
    )
}
