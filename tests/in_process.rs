#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Handler-level tests through `router(state).oneshot(req)`, with identities verified by
//! the real `identity` code from certificates minted in the test.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use mayfly::api::extract::ConnInfo;
use mayfly::api::{AppState, router};
use mayfly::app::App;
use mayfly::config::Config;
use mayfly::lease::LeaseState;
use mayfly::task::TaskState;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tower::ServiceExt;

struct Harness {
    _dir: tempfile::TempDir,
    app: App,
    agent: Arc<ConnInfo>,
    operator: Arc<ConnInfo>,
}

async fn harness(audit: Option<&Path>) -> Harness {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        audit: audit.map(Path::to_path_buf),
        ..Default::default()
    };
    let config = Config::load(&write_config(dir.path(), &pki, &opts)).expect("config");
    let app = App::build(&config).await.expect("build");
    let agent = Arc::new(ConnInfo {
        peer: "127.0.0.1:50000".parse().expect("addr"),
        identity: Ok(verified(&pki, &pki.svid("agent", AGENT))),
    });
    let operator = Arc::new(ConnInfo {
        peer: "127.0.0.1:50001".parse().expect("addr"),
        identity: Ok(verified(&pki, &pki.svid("operator", OPERATOR))),
    });
    Harness {
        _dir: dir,
        app,
        agent,
        operator,
    }
}

impl Harness {
    fn router(&self) -> axum::Router {
        router(AppState::new(
            self.app.broker.clone(),
            self.app.bearer.clone(),
            64 * 1024,
        ))
    }

    async fn call(&self, method: &str, uri: &str, body: Body, ctype: &str) -> (StatusCode, Value) {
        self.call_as(&self.agent, method, uri, body, ctype).await
    }

    async fn call_as(
        &self,
        who: &Arc<ConnInfo>,
        method: &str,
        uri: &str,
        body: Body,
        ctype: &str,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", ctype)
            .body(body)
            .expect("request");
        req.extensions_mut().insert(who.clone());
        let resp = self.router().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            "POST",
            uri,
            Body::from(body.to_string()),
            "application/json",
        )
        .await
    }
}

#[tokio::test]
async fn when_the_audit_trail_cannot_be_written_no_credential_leaves_and_its_lease_is_revoked() {
    // /dev/full accepts the open and fails every write with ENOSPC: a real fault.
    let h = harness(Some(Path::new("/dev/full"))).await;
    let (s, body) = h.post("/v1/tasks", task_body("10m")).await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (503, Some("audit_unavailable"))
    );
    // The declared task was undone, not left behind.
    let tasks = h
        .app
        .store
        .tasks(&mayfly::lease::TaskQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("tasks");
    assert_eq!(tasks.items.len(), 1);
    assert_eq!(tasks.items[0].state, TaskState::Revoked);

    // A task that exists (created behind the API's back) cannot yield an unaudited credential.
    let now = time::OffsetDateTime::now_utc();
    let mut t = tasks.items[0].clone();
    t.id = mayfly::task::TaskId::generate();
    t.state = TaskState::Active;
    t.expires_at = now + time::Duration::minutes(10);
    h.app.store.create_task(&t).await.expect("task");
    let (s, body) = h
        .post(
            &format!("/v1/tasks/{}/credentials", t.id),
            json!({"provider": "jwt", "target": "https://api.example.com"}),
        )
        .await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (503, Some("audit_unavailable"))
    );
    assert!(body.get("credential").is_none());
    let leases = h.app.store.task_leases(&t.id).await.expect("leases");
    assert_eq!(leases.len(), 1);
    assert_eq!(
        leases[0].state,
        LeaseState::Revoked,
        "the minted credential's lease is revoked"
    );
}

#[tokio::test]
async fn a_lease_left_pending_by_a_crash_is_revoked_by_the_reaper() {
    let h = harness(None).await;
    let (s, task) = h.post("/v1/tasks", task_body("10m")).await;
    assert_eq!(s.as_u16(), 201);
    let task_id: mayfly::task::TaskId = task["task_id"].as_str().expect("id").parse().expect("id");
    let t = h
        .app
        .store
        .task(&task_id)
        .await
        .expect("get")
        .expect("task");
    // What a crash between "record" and "activate" leaves behind.
    let now = time::OffsetDateTime::now_utc();
    let lease = mayfly::lease::Lease::pending(
        &t.id,
        &t.owner,
        &t.scope.grants()[0],
        now,
        now + time::Duration::minutes(5),
    );
    h.app
        .store
        .put_new(&lease, now + time::Duration::seconds(60))
        .await
        .expect("pending");
    let early = h
        .app
        .revoker
        .reap_once(now + time::Duration::seconds(30))
        .await
        .expect("reap");
    assert_eq!(early.claimed, 0, "not stale yet");
    let stats = h
        .app
        .revoker
        .reap_once(now + time::Duration::seconds(61))
        .await
        .expect("reap");
    assert_eq!(stats.revoked, 1);
    let after = h
        .app
        .store
        .lease(&lease.id)
        .await
        .expect("get")
        .expect("lease");
    assert_eq!(after.state, LeaseState::Revoked);
    assert_eq!(after.reason.as_deref(), Some("stale_pending"));
}

mod no_panics {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
        #[test]
        fn arbitrary_bodies_never_cause_a_server_error(
            body in prop_oneof![
                any::<Vec<u8>>(),
                "\\PC{0,200}".prop_map(String::into_bytes),
                Just(br#"{"purpose":"p","scope":[{"provider":"jwt","target":"https://x","actions":["a"]}],"ttl":"1m"}"#.to_vec()),
                Just(br#"{"provider":"jwt","target":"https://x","actions":[{}]}"#.to_vec()),
            ],
            route in prop_oneof![
                Just("/v1/tasks"),
                Just("/v1/tasks/tsk_00000000000000000000000000000000/credentials"),
                Just("/v1/leases/lse_00000000000000000000000000000000/revoke"),
                Just("/v1/tasks/tsk_00000000000000000000000000000000/complete"),
            ],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            let h = HARNESS.with(|h| h.clone());
            let (status, problem) = rt.block_on(h.call("POST", route, Body::from(body), "application/json"));
            prop_assert!(!status.is_server_error(), "{status}: {problem}");
            if !status.is_success() {
                prop_assert!(problem["code"].is_string());
            }
        }
    }

    thread_local! {
        static HARNESS: Arc<Harness> = Arc::new(
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(harness(None))
        );
    }
}

/// The active tasks and leases in the store: what a request could have granted.
async fn active_state(app: &App) -> (Vec<String>, Vec<String>) {
    let tasks = app
        .store
        .tasks(&mayfly::lease::TaskQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("tasks");
    let mut leases = Vec::new();
    let mut active_tasks = Vec::new();
    for t in &tasks.items {
        if t.state == TaskState::Active {
            active_tasks.push(t.id.to_string());
        }
        for l in app.store.task_leases(&t.id).await.expect("leases") {
            if l.state == LeaseState::Active || l.state == LeaseState::Pending {
                leases.push(l.id.to_string());
            }
        }
    }
    active_tasks.sort();
    leases.sort();
    (active_tasks, leases)
}

/// A pending approval for a credential under `task`, written straight to the store.
async fn pending_approval(h: &Harness, task: &str) -> String {
    use mayfly::approval::{Approval, ApprovalState, HeldRequest};
    let now = time::OffsetDateTime::now_utc();
    let requester = h
        .agent
        .identity
        .as_ref()
        .expect("agent verified")
        .principal()
        .clone();
    let task: mayfly::task::TaskId = task.parse().expect("task id");
    let request = HeldRequest {
        provider: mayfly::task::ProviderKind::Jwt,
        target: "https://api.example.com".into(),
        actions: None,
        resources: None,
        ttl_secs: None,
    };
    let a = Approval {
        id: format!("apr_{}", uuid::Uuid::new_v4().simple()),
        fingerprint: mayfly::approval::fingerprint(&requester, &task, &request),
        task_id: task,
        requester,
        request,
        state: ApprovalState::Pending,
        created_at: now,
        expires_at: now + time::Duration::minutes(15),
        keep_until: now + time::Duration::hours(1),
        decided_by: None,
        reason: None,
    };
    assert!(h.app.store.create_approval(&a, 100).await.expect("store"));
    a.id
}

/// A task (and, when asked, a signed lease under it) written straight to the store, as
/// if declared before the audit sink failed.
async fn seeded_task(h: &Harness, with_lease: bool) -> (String, Option<String>) {
    let now = time::OffsetDateTime::now_utc();
    seeded_task_at(h, with_lease, now, now + time::Duration::minutes(10)).await
}

/// `seeded_task` declared at `now`, ending at `expires_at` (either may be in the past).
async fn seeded_task_at(
    h: &Harness,
    with_lease: bool,
    now: time::OffsetDateTime,
    expires_at: time::OffsetDateTime,
) -> (String, Option<String>) {
    let req = mayfly::task::TaskRequest::try_from(
        serde_json::from_value::<mayfly::task::RawTaskRequest>(task_body("10m")).expect("raw"),
    )
    .expect("task request");
    let owner = h
        .agent
        .identity
        .as_ref()
        .expect("agent verified")
        .principal()
        .clone();
    let task = mayfly::task::Task {
        id: mayfly::task::TaskId::generate(),
        owner: owner.clone(),
        purpose: req.purpose,
        scope: req.scope,
        created_at: now,
        expires_at,
        parent: None,
        labels: Default::default(),
        state: TaskState::Active,
        ended_at: None,
        end_reason: None,
        origin: None,
    };
    h.app.store.create_task(&task).await.expect("task");
    let lease = if with_lease {
        let grant = task.scope.grants()[0].clone();
        let mut l = mayfly::lease::Lease::pending(
            &task.id,
            &owner,
            &grant,
            now,
            now + time::Duration::minutes(5),
        );
        l.state = LeaseState::Active;
        h.app.store.put_new(&l, l.expires_at).await.expect("lease");
        Some(l.id.to_string())
    } else {
        None
    };
    (task.id.to_string(), lease)
}

#[tokio::test]
async fn every_state_changing_action_fails_closed_and_grants_nothing_without_a_record() {
    use mayfly::action::Action;
    // /dev/full: every audit write fails with ENOSPC.
    let h = harness(Some(Path::new("/dev/full"))).await;
    for action in Action::ALL {
        let (task, lease) = seeded_task(&h, true).await;
        let lease = lease.expect("lease");
        let (method, uri, body): (&str, String, Value) = match action {
            Action::DeclareTask => ("POST", "/v1/tasks".into(), task_body("10m")),
            Action::MintCredential => (
                "POST",
                format!("/v1/tasks/{task}/credentials"),
                json!({"provider": "jwt", "target": "https://api.example.com"}),
            ),
            Action::DelegateTask => (
                "POST",
                format!("/v1/tasks/{task}/delegate"),
                json!({"principal": AGENT2, "purpose": "sub-step",
                       "scope": task_body("1m")["scope"].clone(), "ttl": "1m"}),
            ),
            Action::CompleteTask => ("POST", format!("/v1/tasks/{task}/complete"), json!({})),
            Action::ReadTask => ("GET", format!("/v1/tasks/{task}"), Value::Null),
            // Operator actions are refused to an agent before anything changes; the
            // refusal must still fail closed when it cannot be recorded.
            Action::RevokeTask => (
                "POST",
                format!("/v1/tasks/{task}/revoke"),
                json!({"reason": "r"}),
            ),
            Action::RevokeLease => (
                "POST",
                format!("/v1/leases/{lease}/revoke"),
                json!({"reason": "r"}),
            ),
            Action::BulkRevoke => (
                "POST",
                "/v1/revoke".into(),
                json!({"principal": AGENT, "reason": "r"}),
            ),
            Action::Signal => (
                "POST",
                "/v1/signals".into(),
                json!({"task_id": task, "kind": "edr", "severity": "high"}),
            ),
            Action::DecideApproval => (
                "POST",
                format!("/v1/approvals/{}", pending_approval(&h, &task).await),
                json!({"decision": "approve", "reason": "r"}),
            ),
            Action::CollectApproval => ("GET", "/v1/approvals/apr_nonexistent".into(), Value::Null),
            Action::ListApprovals => ("GET", "/v1/approvals".into(), Value::Null),
            Action::ReadLease => ("GET", format!("/v1/leases/{lease}"), Value::Null),
            Action::ListLeases => ("GET", "/v1/leases".into(), Value::Null),
            Action::ListTasks => ("GET", "/v1/tasks".into(), Value::Null),
            Action::Introspect => ("POST", "/v1/introspect".into(), Value::Null),
        };
        let before = active_state(&h.app).await;
        let (s, b) = if action == Action::DecideApproval {
            h.call_as(
                &h.operator,
                method,
                &uri,
                Body::from(body.to_string()),
                "application/json",
            )
            .await
        } else if action == Action::Introspect {
            h.call(
                method,
                &uri,
                Body::from("token=x"),
                "application/x-www-form-urlencoded",
            )
            .await
        } else if body.is_null() {
            h.call(method, &uri, Body::empty(), "application/json")
                .await
        } else {
            h.post(&uri, body).await
        };
        assert_eq!(
            (s.as_u16(), b["code"].as_str()),
            (503, Some("audit_unavailable")),
            "{action}: {b}"
        );
        let after = active_state(&h.app).await;
        if action == Action::DecideApproval {
            let id = uri.rsplit('/').next().expect("id");
            let a = h
                .app
                .store
                .approval(id)
                .await
                .expect("store")
                .expect("approval");
            assert_eq!(
                a.state,
                mayfly::approval::ApprovalState::Rejected,
                "an approval decided without a record is taken back"
            );
        }
        assert!(
            after.0.iter().all(|t| before.0.contains(t))
                && after.1.iter().all(|l| before.1.contains(l)),
            "{action} left something active without a record: before {before:?}, after {after:?}"
        );
    }
}

#[tokio::test]
async fn a_delegation_made_while_the_audit_sink_fails_leaves_no_active_sub_task() {
    let h = harness(Some(Path::new("/dev/full"))).await;
    let (parent, _) = seeded_task(&h, false).await;
    let (s, b) = h
        .post(
            &format!("/v1/tasks/{parent}/delegate"),
            json!({"principal": AGENT2, "purpose": "sub-step",
                   "scope": task_body("1m")["scope"].clone(), "ttl": "1m"}),
        )
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].as_str()),
        (503, Some("audit_unavailable"))
    );
    let tasks = h
        .app
        .store
        .tasks(&mayfly::lease::TaskQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("tasks");
    let children: Vec<_> = tasks
        .items
        .iter()
        .filter(|t| t.parent.as_ref().map(ToString::to_string) == Some(parent.clone()))
        .collect();
    assert_eq!(children.len(), 1, "the delegation reached the store");
    assert_eq!(children[0].state, TaskState::Revoked, "and was undone");
}

#[tokio::test]
async fn a_task_past_its_expiry_mints_nothing() {
    let h = harness(None).await;
    // Declared two minutes ago for one minute: expired by the clock the task was given,
    // with no wait.
    let now = time::OffsetDateTime::now_utc();
    let (task, _) = seeded_task_at(
        &h,
        false,
        now - time::Duration::minutes(2),
        now - time::Duration::minutes(1),
    )
    .await;
    let (s, body) = h
        .post(
            &format!("/v1/tasks/{task}/credentials"),
            json!({"provider": "jwt", "target": "https://api.example.com"}),
        )
        .await;
    assert_eq!(
        (s.as_u16(), body["code"].as_str()),
        (409, Some("task_expired"))
    );
    let task: mayfly::task::TaskId = task.parse().expect("id");
    assert!(
        h.app
            .store
            .task_leases(&task)
            .await
            .expect("leases")
            .is_empty(),
        "no lease for an expired task"
    );
}
