#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The broker on the embedded store, called directly (no HTTP): each request gets its own
//! audit scope and is committed the way the api layer commits it, and every assertion
//! reads the store or the audit log back.

mod common;

use common::*;
use mayfly::action::Action;
use mayfly::app::App;
use mayfly::approval::ApprovalState;
use mayfly::audit::{AuditEvent, AuditScope};
use mayfly::broker::{BrokerError, Outcome};
use mayfly::config::Config;
use mayfly::identity::VerifiedCaller;
use mayfly::lease::LeaseState;
use mayfly::task::{
    CredentialRequest, DelegateRequest, RawCredentialRequest, RawDelegateRequest, RawTaskRequest,
    Task, TaskId, TaskRequest, TaskState,
};
use serde_json::{Value, json};
use std::path::PathBuf;

/// Policies beside the common test policy: one target held for an operator's approval,
/// one refused by Cedar.
const EXTRA_POLICY: &str = r#"
@id("prod-needs-approval") @approval("required")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { resource.uri == "https://prod.example.com" };

@id("no-forbidden")
forbid (principal, action == Mayfly::Action::"MintCredential", resource)
when { resource.uri == "https://forbidden.example.com" };
"#;

struct Env {
    _dir: tempfile::TempDir,
    app: App,
    audit: PathBuf,
    agent: VerifiedCaller,
    agent2: VerifiedCaller,
    operator: VerifiedCaller,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let config = write_config(dir.path(), &pki, &ConfigOptions::default());
    std::fs::write(dir.path().join("policies/extra.cedar"), EXTRA_POLICY).expect("policy");
    let config = Config::load(&config).expect("config");
    let app = App::build(&config).await.expect("build");
    Env {
        audit: dir.path().join("audit.jsonl"),
        agent: verified(&pki, &pki.svid("agent", AGENT)),
        agent2: verified(&pki, &pki.svid("agent2", AGENT2)),
        operator: verified(&pki, &pki.svid("operator", OPERATOR)),
        app,
        _dir: dir,
    }
}

fn scope() -> AuditScope {
    AuditScope::new(AuditEvent::new("request"))
}

fn task_request(target: &str) -> TaskRequest {
    let mut body = task_body("10m");
    body["scope"][0]["target"] = json!(target);
    TaskRequest::try_from(serde_json::from_value::<RawTaskRequest>(body).expect("raw"))
        .expect("task request")
}

fn credential_request(target: &str) -> CredentialRequest {
    let raw: RawCredentialRequest =
        serde_json::from_value(json!({"provider": "jwt", "target": target})).expect("raw");
    CredentialRequest::try_from(raw).expect("credential request")
}

impl Env {
    /// Commits the request's record as the api layer does; the set-up must never lose it.
    async fn commit<T>(
        &self,
        ev: &AuditScope,
        r: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        self.app.broker.commit(ev).await.expect("audit record");
        r
    }

    async fn declare(&self, who: &VerifiedCaller, target: &str) -> Task {
        let ev = scope();
        let r = self
            .app
            .broker
            .declare_task(who, task_request(target), &ev)
            .await;
        self.commit(&ev, r).await.expect("declare")
    }

    async fn mint(
        &self,
        who: &VerifiedCaller,
        task: &TaskId,
        target: &str,
    ) -> Result<Outcome, BrokerError> {
        let ev = scope();
        let r = self
            .app
            .broker
            .request_credential(who, task, credential_request(target), &ev)
            .await;
        self.commit(&ev, r).await
    }

    async fn issued(
        &self,
        who: &VerifiedCaller,
        task: &TaskId,
        target: &str,
    ) -> mayfly::lease::Lease {
        match self.mint(who, task, target).await.expect("mint") {
            Outcome::Issued(i) => i.lease,
            Outcome::Pending(a) => panic!("held for approval {}", a.id),
        }
    }

    async fn leases(&self, task: &TaskId) -> Vec<mayfly::lease::Lease> {
        self.app.store.task_leases(task).await.expect("leases")
    }

    async fn lease_state(&self, id: &mayfly::task::LeaseId) -> LeaseState {
        self.app
            .store
            .lease(id)
            .await
            .expect("store")
            .expect("lease")
            .state
    }

    async fn task_state(&self, id: &TaskId) -> TaskState {
        self.app
            .store
            .task(id)
            .await
            .expect("store")
            .expect("task")
            .state
    }

    fn records(&self, action: Action) -> Vec<Value> {
        audit_records(&self.audit)
            .into_iter()
            .filter(|r| r["action"] == action.as_str())
            .collect()
    }
}

#[tokio::test]
async fn a_minted_credential_has_an_active_lease_and_an_audit_record() {
    let env = env().await;
    let task = env.declare(&env.agent, "https://api.example.com").await;
    assert_eq!(env.task_state(&task.id).await, TaskState::Active);
    let lease = env
        .issued(&env.agent, &task.id, "https://api.example.com")
        .await;
    assert_eq!(lease.task_id, task.id);
    assert_eq!(env.lease_state(&lease.id).await, LeaseState::Active);
    let minted = env.records(Action::MintCredential);
    assert!(
        minted.iter().any(|r| r["lease_id"] == lease.id.to_string()
            && r["task_id"] == task.id.to_string()
            && r["decision"] == "allow"),
        "{minted:?}"
    );
    assert!(
        env.records(Action::DeclareTask)
            .iter()
            .any(|r| r["task_id"] == task.id.to_string()),
        "the declaration has its record too"
    );
}

#[tokio::test]
async fn a_denied_request_leaves_no_lease() {
    let env = env().await;
    let task = env
        .declare(&env.agent, "https://forbidden.example.com")
        .await;
    let refused = env
        .mint(&env.agent, &task.id, "https://forbidden.example.com")
        .await;
    assert!(
        matches!(
            refused,
            Err(BrokerError::PolicyDenied {
                action: Action::MintCredential,
                ..
            })
        ),
        "{refused:?}"
    );
    let outside = env
        .mint(&env.agent, &task.id, "https://elsewhere.example.com")
        .await;
    assert!(
        matches!(outside, Err(BrokerError::OutOfScope(_))),
        "{outside:?}"
    );
    let not_owner = env
        .mint(&env.agent2, &task.id, "https://forbidden.example.com")
        .await;
    assert!(
        matches!(not_owner, Err(BrokerError::NotTaskOwner(_))),
        "{not_owner:?}"
    );
    assert!(
        env.leases(&task.id).await.is_empty(),
        "no lease, not even a pending one"
    );
    assert!(
        env.records(Action::MintCredential)
            .iter()
            .all(|r| r["lease_id"].is_null()),
        "a refusal names no lease"
    );
}

#[tokio::test]
async fn completing_a_task_ends_its_leases() {
    let env = env().await;
    let task = env.declare(&env.agent, "https://api.example.com").await;
    let a = env
        .issued(&env.agent, &task.id, "https://api.example.com")
        .await;
    let b = env
        .issued(&env.agent, &task.id, "https://api.example.com")
        .await;
    let ev = scope();
    let r = env
        .app
        .broker
        .complete_task(&env.agent, &task.id, &ev)
        .await;
    let ended = env.commit(&ev, r).await.expect("complete");
    let mut revoked = ended.leases.clone();
    revoked.sort_by_key(ToString::to_string);
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort_by_key(ToString::to_string);
    assert_eq!(revoked, want);
    assert_eq!(env.task_state(&task.id).await, TaskState::Completed);
    for id in [&a.id, &b.id] {
        assert_eq!(env.lease_state(id).await, LeaseState::Revoked);
    }
    let after = env
        .mint(&env.agent, &task.id, "https://api.example.com")
        .await;
    assert!(
        matches!(after, Err(BrokerError::TaskNotActive { .. })),
        "{after:?}"
    );
}

#[tokio::test]
async fn revoking_a_parent_task_ends_its_sub_tasks_and_their_leases() {
    let env = env().await;
    let parent = env.declare(&env.agent, "https://api.example.com").await;
    let raw: RawDelegateRequest = serde_json::from_value(json!({
        "principal": AGENT2,
        "purpose": "sub-step",
        "scope": task_body("1m")["scope"].clone(),
        "ttl": "1m",
    }))
    .expect("raw");
    let ev = scope();
    let r = env
        .app
        .broker
        .delegate_task(
            &env.agent,
            &parent.id,
            DelegateRequest::try_from(raw).expect("delegate request"),
            &ev,
        )
        .await;
    let child = env.commit(&ev, r).await.expect("delegate");
    assert_eq!(child.parent.as_ref(), Some(&parent.id));
    let lease = env
        .issued(&env.agent2, &child.id, "https://api.example.com")
        .await;

    let ev = scope();
    let r = env
        .app
        .broker
        .revoke_task(&env.operator, &parent.id, "incident 42", &ev)
        .await;
    let ended = env.commit(&ev, r).await.expect("revoke");
    assert!(ended.tasks.contains(&child.id), "{:?}", ended.tasks);
    assert!(ended.leases.contains(&lease.id), "{:?}", ended.leases);
    assert_eq!(env.task_state(&parent.id).await, TaskState::Revoked);
    assert_eq!(env.task_state(&child.id).await, TaskState::Revoked);
    assert_eq!(env.lease_state(&lease.id).await, LeaseState::Revoked);
}

#[tokio::test]
async fn an_approval_required_grant_is_held_then_collected_once() {
    let env = env().await;
    let task = env.declare(&env.agent, "https://prod.example.com").await;
    let held = match env
        .mint(&env.agent, &task.id, "https://prod.example.com")
        .await
        .expect("mint")
    {
        Outcome::Pending(a) => a,
        Outcome::Issued(i) => panic!("issued {} without approval", i.lease.id),
    };
    assert_eq!(held.state, ApprovalState::Pending);
    assert!(
        env.leases(&task.id).await.is_empty(),
        "nothing is minted while the request is held"
    );

    let collect = |who: &VerifiedCaller| {
        let (ev, who, id) = (scope(), who.clone(), held.id.clone());
        let env = &env;
        async move {
            let r = env.app.broker.collect_approval(&who, &id, &ev).await;
            env.commit(&ev, r).await
        }
    };
    assert!(matches!(collect(&env.agent).await, Ok(Outcome::Pending(_))));

    let ev = scope();
    let r = env
        .app
        .broker
        .decide_approval(
            &env.operator,
            &held.id,
            mayfly::broker::ApprovalDecision::Approve,
            "change 7 approved",
            &ev,
        )
        .await;
    let decided = env.commit(&ev, r).await.expect("decide");
    assert_eq!(decided.state, ApprovalState::Approved);

    let lease = match collect(&env.agent).await.expect("collect") {
        Outcome::Issued(i) => i.lease,
        Outcome::Pending(a) => panic!("still pending: {}", a.id),
    };
    assert_eq!(lease.task_id, task.id);
    assert_eq!(env.lease_state(&lease.id).await, LeaseState::Active);
    let again = collect(&env.agent).await;
    assert!(
        matches!(again, Err(BrokerError::ApprovalClosed(_))),
        "{again:?}"
    );
    assert_eq!(env.leases(&task.id).await.len(), 1, "collected once");
}

#[tokio::test]
async fn a_lease_expires_at_its_ttl_on_the_reaper_clock() {
    let env = env().await;
    let task = env.declare(&env.agent, "https://api.example.com").await;
    let lease = env
        .issued(&env.agent, &task.id, "https://api.example.com")
        .await;
    let second = time::Duration::seconds(1);
    // The reaper is not running here: each pass is driven with the time it must see.
    let early = env
        .app
        .revoker
        .reap_once(lease.expires_at - second)
        .await
        .expect("reap");
    assert_eq!(early.claimed, 0, "not due before its expiry");
    assert_eq!(env.lease_state(&lease.id).await, LeaseState::Active);
    let due = env
        .app
        .revoker
        .reap_once(lease.expires_at + second)
        .await
        .expect("reap");
    assert_eq!((due.claimed, due.expired), (1, 1));
    assert_eq!(env.lease_state(&lease.id).await, LeaseState::Expired);
    // The task's own expiry is a function of the time asked about, not of when it is read.
    assert_eq!(task.state_at(task.expires_at - second), TaskState::Active);
    assert_eq!(task.state_at(task.expires_at), TaskState::Expired);
}
