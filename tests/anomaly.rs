#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Anomaly-driven revocation, external signals, risk in policy — against the binary.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

struct Env {
    _dir: tempfile::TempDir,
    server: Server,
    agent: reqwest::Client,
    op: reqwest::Client,
    audit: std::path::PathBuf,
}

fn start(extra: &str, extra_policy: &str) -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let config = write_config(
        dir.path(),
        &pki,
        &ConfigOptions {
            extra: extra.into(),
            ..Default::default()
        },
    );
    if !extra_policy.is_empty() {
        std::fs::write(dir.path().join("policies/extra.cedar"), extra_policy).expect("policy");
    }
    let server = Server::serve(&config);
    Env {
        agent: pki.client_as("agent", AGENT),
        op: pki.client_as("op", OPERATOR),
        audit: dir.path().join("audit.jsonl"),
        _dir: dir,
        server,
    }
}

async fn task_and_token(env: &Env) -> (String, String) {
    let (s, task) = post_json(&env.agent, &env.server.url("/v1/tasks"), task_body("30m")).await;
    assert_eq!(s, 201);
    let id = task["task_id"].as_str().expect("id").to_string();
    let (s, c) = post_json(
        &env.agent,
        &env.server.url(&format!("/v1/tasks/{id}/credentials")),
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    (
        id,
        c["credential"]["access_token"]
            .as_str()
            .expect("tok")
            .to_string(),
    )
}

async fn out_of_scope(env: &Env, task: &str) -> (u16, Value) {
    post_json(
        &env.agent,
        &env.server.url(&format!("/v1/tasks/{task}/credentials")),
        json!({"provider": "jwt", "target": "https://api.example.com", "actions": ["admin"]}),
    )
    .await
}

#[tokio::test]
async fn three_out_of_scope_requests_revoke_the_task_within_a_second() {
    let env = start("", "");
    let (task, token) = task_and_token(&env).await;
    let introspect_url = env.server.url("/v1/introspect");
    for _ in 0..2 {
        assert_eq!(out_of_scope(&env, &task).await.0, 403);
    }
    assert_eq!(
        introspect(&env.agent, &introspect_url, &token).await["active"],
        true,
        "two probes are tolerated"
    );
    let (s, b) = out_of_scope(&env, &task).await;
    assert_eq!((s, b["code"].as_str()), (403, Some("out_of_scope")));
    let t0 = Instant::now();
    let inactive = eventually(Duration::from_secs(1), || {
        let (agent, url, token) = (env.agent.clone(), introspect_url.clone(), token.clone());
        async move { (introspect(&agent, &url, &token).await["active"] == false).then_some(()) }
    })
    .await;
    assert!(inactive.is_some(), "the token must be inactive within 1 s");
    println!("anomaly revocation visible after {:?}", t0.elapsed());
    let (_, view) = get(&env.agent, &env.server.url(&format!("/v1/tasks/{task}"))).await;
    assert_eq!(view["state"], "revoked");
    assert_eq!(view["end_reason"], "anomaly: rule out-of-scope");
    let fired: Vec<Value> = audit_records(&env.audit)
        .into_iter()
        .filter(|r| r["kind"] == "anomaly.triggered")
        .collect();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["rule"], "out-of-scope");
    assert_eq!(fired[0]["task_id"], task.as_str());
    assert_eq!(fired[0]["outcome"], "revoke_task (enforced)");
}

#[tokio::test]
async fn a_high_severity_external_signal_revokes_the_task() {
    let env = start("", "");
    let (task, token) = task_and_token(&env).await;
    let url = env.server.url("/v1/signals");
    // Agents may not send signals.
    let (s, b) = post_json(
        &env.agent,
        &url,
        json!({"task_id": task, "kind": "edr", "severity": "high"}),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (403, Some("not_operator")));
    let (s, b) = post_json(
        &env.op,
        &url,
        json!({"task_id": task, "principal": AGENT, "kind": "edr", "severity": "high"}),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_signal")));
    let (s, b) = post_json(&env.op, &url, json!({"task_id": task, "kind": "edr", "severity": "high", "detail": "process injection on runner"})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["fired"][0]["rule"], "external-high");
    assert_eq!(
        introspect(&env.agent, &env.server.url("/v1/introspect"), &token).await["active"],
        false
    );
}

#[tokio::test]
async fn risk_and_recent_signals_reach_cedar() {
    // No automatic actions: only the risk score and a policy that reads it.
    let extra = "[anomaly]\nrules = []";
    let policy = r#"@id("no-minting-at-high-risk") forbid (principal, action == Mayfly::Action::"MintCredential", resource) when { context.risk >= 80 || context.signals.contains("external:quarantine") };"#;
    let env = start(extra, policy);
    let (task, token) = task_and_token(&env).await;
    let (s, _) = post_json(
        &env.op,
        &env.server.url("/v1/signals"),
        json!({"principal": AGENT, "kind": "quarantine", "severity": "low"}),
    )
    .await;
    assert_eq!(s, 202);
    let (s, b) = post_json(
        &env.agent,
        &env.server.url(&format!("/v1/tasks/{task}/credentials")),
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (403, Some("policy_denied")), "{b}");
    // No rule revoked anything: existing credentials stay, only new ones are refused.
    assert_eq!(
        introspect(&env.agent, &env.server.url("/v1/introspect"), &token).await["active"],
        true
    );
    let denied = audit_records(&env.audit)
        .into_iter()
        .find(|r| r["action"] == "MintCredential" && r["decision"] == "deny")
        .expect("record");
    assert_eq!(denied["policies"], json!(["no-minting-at-high-risk"]));
    assert_eq!(denied["risk"], 10);
}

#[tokio::test]
async fn a_rule_in_audit_mode_records_but_does_not_act() {
    let extra = "[anomaly]\n[[anomaly.rules]]\nname = \"probe\"\nsignal = \"out_of_scope\"\nthreshold = 2\nwindow = \"60s\"\naction = \"revoke_task\"\nmode = \"audit\"";
    let env = start(extra, "");
    let (task, token) = task_and_token(&env).await;
    for _ in 0..4 {
        out_of_scope(&env, &task).await;
    }
    assert_eq!(
        introspect(&env.agent, &env.server.url("/v1/introspect"), &token).await["active"],
        true
    );
    let fired: Vec<Value> = audit_records(&env.audit)
        .into_iter()
        .filter(|r| r["kind"] == "anomaly.triggered")
        .collect();
    assert_eq!(fired.len(), 2, "fires at 2 and again at 4");
    assert!(
        fired
            .iter()
            .all(|r| r["outcome"] == "revoke_task (audit only)")
    );
}
