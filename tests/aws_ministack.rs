#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The `aws` provider against ministack, which evaluates IAM for real (session policies,
//! explicit denies, `aws:PrincipalTag/*` and `aws:TokenIssueTime` conditions): what a
//! minted session can do, what revocation kills and what it leaves alone, the
//! reconciler putting back an entry removed behind Mayfly's back, and the issue-time
//! fallback when the deny policy is full. Mayfly's own identity is the account root.

mod common;

use common::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::{MINISTACK_ACCOUNT}:role/{name}")
}

const AWS_POLICY: &str = r#"
@id("agents-aws-declare")
permit (principal, action == Mayfly::Action::"DeclareTask", resource)
when { principal.path like "/agent/*" && resource.provider == "aws" };

@id("agents-aws-mint")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { principal.path like "/agent/*" && resource.provider == "aws" };
"#;

struct Env {
    dir: tempfile::TempDir,
    pki: Pki,
    aws: Ministack,
    server: Server,
    _redis: Option<RedisServer>,
}

/// Creates roles `deploy` and `other` (trusting the account), and gives `deploy` the
/// permissions its sessions may exercise: reading roles.
async fn provision(aws: &Ministack) {
    let iam = aws_sdk_iam::Client::new(&aws.root().await);
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"AWS": format!("arn:aws:iam::{MINISTACK_ACCOUNT}:root")},
        "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
    }]});
    for name in ["deploy", "other"] {
        iam.create_role()
            .role_name(name)
            .assume_role_policy_document(trust.to_string())
            .max_session_duration(3600)
            .send()
            .await
            .expect("create role");
    }
    let work = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iam:GetRole", "iam:ListRoles"], "Resource": "*"},
    ]});
    iam.put_role_policy()
        .role_name("deploy")
        .policy_name("work")
        .policy_document(work.to_string())
        .send()
        .await
        .expect("role policy");
}

struct Opts {
    extra: &'static str,
    redis: bool,
}

/// A store client on the broker's Redis, to fill a role's deny set as earlier
/// revocations would.
async fn store_of(env: &Env) -> Arc<dyn mayfly::lease::LeaseStore> {
    let redis = env._redis.as_ref().expect("redis");
    let store = mayfly::lease::redis::RedisStore::connect(&mayfly::lease::redis::RedisConfig {
        url: redis.url(),
        key_prefix: "ms".into(),
        username: None,
        password_file: None,
        tls_ca_file: None,
        durability: mayfly::lease::redis::Durability::Server,
        op_timeout: Duration::from_secs(2),
    })
    .await
    .expect("store");
    Arc::new(store)
}

/// Fills the role's deny set with `n` entries (not leases) denied until `until`.
async fn fill(store: &Arc<dyn mayfly::lease::LeaseStore>, n: u32, until: time::OffsetDateTime) {
    for i in 0..n {
        store
            .deny_add(
                "aws-deny:deploy",
                &format!("lse_{:032x}", 0xf000_0000u32 + i),
                until,
            )
            .await
            .expect("fill");
    }
}

async fn start(opts: Opts) -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let aws = Ministack::start();
    provision(&aws).await;
    let redis = opts.redis.then(|| RedisServer::start(&[]));
    let extra = format!(
        r#"
[anomaly]
rules = []
[providers.aws]
region = "us-east-1"
endpoint_url = "{url}"
allow_insecure_http = true
{extra}
[providers.aws.targets.deploy]
role_arn = "{arn}"
"#,
        url = aws.url,
        extra = opts.extra,
        arn = role_arn("deploy"),
    );
    let cfg = ConfigOptions {
        extra,
        store: redis.as_ref().map(|r| {
            format!(
                "kind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"ms\"",
                r.url()
            )
        }),
        ..Default::default()
    };
    let config = write_config(dir.path(), &pki, &cfg);
    // One attempt before `irrevocable`: a deferral counted as a failure would show.
    let text = std::fs::read_to_string(&config).expect("read").replace(
        "claim_hold = \"30s\"",
        "claim_hold = \"30s\"\nmax_attempts = 1",
    );
    std::fs::write(&config, text).expect("write");
    std::fs::write(dir.path().join("policies/aws.cedar"), AWS_POLICY).expect("policy");
    let env = vec![
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        (
            "AWS_CONFIG_FILE",
            dir.path().join("none").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("none").display().to_string(),
        ),
    ];
    let server = Server::serve_env(&config, &env);
    Env {
        dir,
        pki,
        aws,
        server,
        _redis: redis,
    }
}

impl Env {
    fn agent(&self) -> reqwest::Client {
        self.pki.client_as("agent", AGENT)
    }
    fn operator(&self) -> reqwest::Client {
        self.pki.client_as("operator", OPERATOR)
    }
    async fn declare(&self) -> String {
        let (s, b) = post_json(
            &self.agent(),
            &self.server.url("/v1/tasks"),
            json!({
                "purpose": "read roles",
                "scope": [{"provider": "aws", "target": "deploy",
                           "actions": ["iam:GetRole", "iam:ListRoles"],
                           "resources": [format!("arn:aws:iam::{MINISTACK_ACCOUNT}:role/*")]}],
                "ttl": "30m",
            }),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        b["task_id"].as_str().expect("task").to_string()
    }
    /// Mints a session; returns (lease id, IAM client acting as the session).
    async fn mint(&self, task: &str, actions: &[&str], resources: &[&str]) -> Session {
        let (s, b) = post_json(
            &self.agent(),
            &self.server.url(&format!("/v1/tasks/{task}/credentials")),
            json!({"provider": "aws", "target": "deploy", "actions": actions,
                   "resources": resources, "ttl": "10m"}),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let c = &b["credential"];
        let sdk = self
            .aws
            .sdk(
                c["AccessKeyId"].as_str().expect("key"),
                c["SecretAccessKey"].as_str().expect("secret"),
                Some(c["SessionToken"].as_str().expect("token")),
            )
            .await;
        Session {
            lease: b["lease_id"].as_str().expect("lease").to_string(),
            iam: aws_sdk_iam::Client::new(&sdk),
        }
    }
    async fn revoke(&self, lease: &str) -> Value {
        let (s, b) = post_json(
            &self.operator(),
            &self.server.url(&format!("/v1/leases/{lease}/revoke")),
            json!({"reason": "incident"}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        b
    }
    async fn lease_state(&self, id: &str) -> String {
        let (s, b) = get(
            &self.operator(),
            &self.server.url(&format!("/v1/leases/{id}")),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        b["state"].as_str().expect("state").to_string()
    }
    async fn root_iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(&self.aws.root().await)
    }
    async fn deny_doc(&self) -> Option<Value> {
        role_deny_policy(&self.root_iam().await).await
    }
    fn audit(&self) -> Vec<Value> {
        audit_records(&self.dir.path().join("audit.jsonl"))
    }
    async fn metrics(&self) -> String {
        metrics_text(&self.server, &self.pki.bundle_a).await
    }
}

struct Session {
    lease: String,
    iam: aws_sdk_iam::Client,
}

/// What IAM answered a session: allowed, or refused with `AccessDenied`. Anything else
/// fails the test.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Answer {
    Allowed,
    Denied,
}

fn answer<T, E: std::fmt::Debug>(r: Result<T, E>) -> Answer {
    match r {
        Ok(_) => Answer::Allowed,
        Err(e) => {
            let text = format!("{e:?}");
            assert!(text.contains("AccessDenied"), "unexpected error: {text}");
            Answer::Denied
        }
    }
}

impl Session {
    async fn get_role(&self, name: &str) -> Answer {
        answer(self.iam.get_role().role_name(name).send().await)
    }
    async fn list_roles(&self) -> Answer {
        answer(self.iam.list_roles().send().await)
    }
}

fn deny_leases(doc: &Value) -> Vec<String> {
    doc["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter_map(|s| s["Condition"]["StringEquals"]["aws:PrincipalTag/mayfly:lease"].as_array())
        .flatten()
        .map(|v| v.as_str().expect("id").to_string())
        .collect()
}

#[tokio::test]
async fn a_session_does_exactly_its_grant_and_revocation_kills_it_alone() {
    let env = start(Opts {
        extra: "",
        redis: false,
    })
    .await;
    let task = env.declare().await;
    let deploy = role_arn("deploy");
    let narrow = env.mint(&task, &["iam:GetRole"], &[&deploy]).await;
    let sibling = env
        .mint(
            &task,
            &["iam:GetRole", "iam:ListRoles"],
            &[&format!("arn:aws:iam::{MINISTACK_ACCOUNT}:role/*")],
        )
        .await;

    // The narrow grant: one action on one resource, nothing else, though the role
    // itself may read every role.
    assert_eq!(narrow.get_role("deploy").await, Answer::Allowed);
    assert_eq!(
        narrow.get_role("other").await,
        Answer::Denied,
        "another resource"
    );
    assert_eq!(narrow.list_roles().await, Answer::Denied, "another action");
    assert_eq!(sibling.get_role("other").await, Answer::Allowed);

    // Revoking the narrow session kills it; its sibling of the same role keeps working.
    let b = env.revoke(&narrow.lease).await;
    assert_eq!(b["state"], "revoked", "{b}");
    assert_eq!(narrow.get_role("deploy").await, Answer::Denied);
    assert_eq!(sibling.get_role("deploy").await, Answer::Allowed);
    assert_eq!(sibling.get_role("other").await, Answer::Allowed);
    let doc = env.deny_doc().await.expect("deny policy");
    assert_eq!(deny_leases(&doc), vec![narrow.lease.clone()]);
}

#[tokio::test]
async fn an_entry_removed_behind_mayflys_back_is_restored_within_the_reconcile_interval() {
    let interval = Duration::from_secs(2);
    let env = start(Opts {
        extra: "reconcile_interval = \"2s\"",
        redis: false,
    })
    .await;
    let task = env.declare().await;
    let deploy = role_arn("deploy");
    let s = env.mint(&task, &["iam:GetRole"], &[&deploy]).await;
    env.revoke(&s.lease).await;
    assert_eq!(s.get_role("deploy").await, Answer::Denied);

    // Someone deletes Mayfly's deny policy: the revoked session works again...
    env.root_iam()
        .await
        .delete_role_policy()
        .role_name("deploy")
        .policy_name("mayfly-revoked-sessions")
        .send()
        .await
        .expect("delete behind Mayfly's back");
    let removed = Instant::now();
    assert_eq!(s.get_role("deploy").await, Answer::Allowed);

    // ...until the reconciler puts the entry back from the store.
    let restored = eventually(interval * 3, || async {
        let doc = env.deny_doc().await?;
        deny_leases(&doc).contains(&s.lease).then(Instant::now)
    })
    .await
    .expect("the reconciler restores the entry");
    let took = restored - removed;
    eprintln!("entry restored {took:?} after its removal (reconcile_interval {interval:?})");
    assert!(
        took <= interval + Duration::from_secs(2),
        "restored within one interval (+ the pass's own IAM calls): {took:?}"
    );
    assert_eq!(s.get_role("deploy").await, Answer::Denied);
    assert_eq!(env.lease_state(&s.lease).await, "revoked");

    // The drift is on record, naming the revoked lease it restored.
    let drift = eventually(Duration::from_secs(5), || async {
        env.audit()
            .into_iter()
            .find(|r| r["kind"] == "aws.deny_policy.drift")
    })
    .await
    .expect("drift audit record");
    assert_eq!(drift["revoked"], json!([s.lease]), "{drift}");
    assert_eq!(drift["outcome"], "rewritten");
    let metrics = env.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mayfly_aws_deny_policy_drift_total{role=\"deploy\"} ")),
        "{metrics}"
    );
}

#[tokio::test]
async fn issued_before_fallback_kills_only_sessions_issued_before_its_time() {
    // `timeout` bounds when an AssumeRole was sent after its lease was written: a cut-off
    // covers a lease issued more than that before it.
    let env = start(Opts {
        extra: "on_policy_full = \"issued_before_deny\"\ntimeout = \"2s\"",
        redis: true,
    })
    .await;
    let task = env.declare().await;
    let deploy = role_arn("deploy");
    let victim = env.mint(&task, &["iam:GetRole"], &[&deploy]).await;
    let innocent_old = env.mint(&task, &["iam:GetRole"], &[&deploy]).await;
    let minted = Instant::now();

    // Fill the role's deny set in the shared store (as ~300 earlier revocations would),
    // through the store's own interface.
    let store = store_of(&env).await;
    fill(
        &store,
        300,
        time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    )
    .await;
    let wait = Duration::from_secs(3).saturating_sub(minted.elapsed());
    tokio::time::sleep(wait).await; // past `timeout` since the two mints

    // The victim's entry does not fit: the fallback denies every session issued before now.
    let b = env.revoke(&victim.lease).await;
    assert_eq!(b["state"], "revoked", "{b}");
    let doc = env.deny_doc().await.expect("deny policy");
    let cutoff = doc["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .find(|s| s["Condition"]["DateLessThan"]["aws:TokenIssueTime"].is_string())
        .expect("a role-wide issued-before statement")
        .clone();
    assert_eq!(cutoff["Effect"], "Deny");
    assert!(!deny_leases(&doc).contains(&victim.lease));
    assert!(doc.to_string().len() <= 10_240);

    // A session minted after the cut-off works; both older ones are refused.
    tokio::time::sleep(Duration::from_millis(1100)).await; // into the next second
    let innocent_new = env.mint(&task, &["iam:GetRole"], &[&deploy]).await;
    assert_eq!(victim.get_role("deploy").await, Answer::Denied);
    assert_eq!(innocent_old.get_role("deploy").await, Answer::Denied);
    assert_eq!(innocent_new.get_role("deploy").await, Answer::Allowed);
    assert_eq!(env.lease_state(&victim.lease).await, "revoked");

    // Recorded and alerted.
    let rec = env
        .audit()
        .into_iter()
        .find(|r| r["kind"] == "aws.deny_policy.issued_before")
        .expect("audit record of the fallback");
    assert!(
        rec["revoked"]
            .as_array()
            .expect("waiting leases")
            .contains(&json!(victim.lease)),
        "{rec}"
    );
    let metrics = env.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mayfly_aws_issued_before_deny_total{role=\"deploy\"} 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_wait_a_revocation_without_room_stays_revoking_until_room_frees_then_kills_its_session()
 {
    let env = start(Opts {
        extra: "on_policy_full = \"wait\"\nreconcile_interval = \"2s\"",
        redis: true,
    })
    .await;
    let task = env.declare().await;
    let deploy = role_arn("deploy");
    let victim = env.mint(&task, &["iam:GetRole"], &[&deploy]).await;
    let sibling = env.mint(&task, &["iam:GetRole"], &[&deploy]).await;
    // The policy is full of entries whose sessions end in a few seconds.
    let store = store_of(&env).await;
    fill(
        &store,
        300,
        time::OffsetDateTime::now_utc() + time::Duration::seconds(4),
    )
    .await;

    // No room: the lease says `revoking`, honestly, while its session still works...
    let b = env.revoke(&victim.lease).await;
    assert_eq!(b["state"], "revoking", "{b}");
    assert_eq!(
        b["revocation_attempts"], 0,
        "back-pressure is not a failed attempt"
    );
    assert_eq!(victim.get_role("deploy").await, Answer::Allowed);
    // ...and once room frees, it is denied and reads `revoked`; never `irrevocable`,
    // though one failed attempt would have made it so.
    let waited = Instant::now();
    let end = eventually(Duration::from_secs(30), || async {
        let s = env.lease_state(&victim.lease).await;
        assert_ne!(s, "irrevocable");
        (s == "revoked").then_some(s)
    })
    .await;
    assert!(end.is_some(), "{}", env.lease_state(&victim.lease).await);
    eprintln!(
        "revocation denied {:?} after it was deferred (the fillers end 4 s after the fill)",
        waited.elapsed()
    );
    assert_eq!(victim.get_role("deploy").await, Answer::Denied);
    assert_eq!(sibling.get_role("deploy").await, Answer::Allowed);
    let doc = env.deny_doc().await.expect("deny policy");
    assert!(deny_leases(&doc).contains(&victim.lease));
    let deferred: Vec<Value> = env
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "lease.revoke_deferred")
        .collect();
    assert!(
        deferred
            .iter()
            .any(|r| r["lease_id"] == victim.lease.as_str()),
        "{deferred:?}"
    );
}
