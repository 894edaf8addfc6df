#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! `mayfly dev` end to end: files it creates, the flow with its identities, and a restart
//! that keeps identities and leases while the reaper ends what expired during the outage.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn dev_mode_restart_keeps_leases_and_reaps_what_expired_while_down() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let server = Server::dev(&dir);

    // The promised files exist, and dev.json describes them.
    for f in [
        "ca.pem",
        "server.pem",
        "agent.pem",
        "agent-key.pem",
        "agent2.pem",
        "agent2-key.pem",
        "operator.pem",
        "operator-key.pem",
        "dev.json",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).expect("dev.json"))
            .expect("json");
    assert_eq!(info["listen"], server.addr.to_string());
    assert_eq!(
        info["agent"]["spiffe_id"],
        "spiffe://dev.mayfly.local/agent/demo"
    );
    assert_eq!(
        info["agent2"]["spiffe_id"],
        "spiffe://dev.mayfly.local/agent/helper"
    );
    assert_eq!(
        info["operator"]["spiffe_id"],
        "spiffe://dev.mayfly.local/operator/admin"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("agent-key.pem"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "private keys must not be group/world readable"
        );
    }
    let ca_before = std::fs::read(dir.join("ca.pem")).expect("ca");

    let agent = dev_client(&dir, "agent");
    let op = dev_client(&dir, "operator");
    let body = json!({
        "purpose": "nightly report",
        "scope": [{"provider": "jwt", "target": "https://reports.example.com", "actions": ["read"]}],
        "ttl": "30m"
    });
    let (s, task) = post_json(&agent, &server.url("/v1/tasks"), body).await;
    assert_eq!(s, 201, "{task}");
    let task_id = task["task_id"].as_str().expect("id").to_string();
    let creds = server.url(&format!("/v1/tasks/{task_id}/credentials"));
    let (s, short) = post_json(
        &agent,
        &creds,
        json!({"provider": "jwt", "target": "https://reports.example.com", "ttl": "2s"}),
    )
    .await;
    assert_eq!(s, 201, "{short}");
    let (s, long) = post_json(
        &agent,
        &creds,
        json!({"provider": "jwt", "target": "https://reports.example.com", "ttl": "10m"}),
    )
    .await;
    assert_eq!(s, 201, "{long}");
    let short_id = short["lease_id"].as_str().expect("lease").to_string();
    let long_id = long["lease_id"].as_str().expect("lease").to_string();
    let long_token = long["credential"]["access_token"]
        .as_str()
        .expect("tok")
        .to_string();

    // Crash: SIGKILL, no clean shutdown. Stay down past the short lease's end.
    let addr = server.addr.to_string();
    server.kill();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let server = Server::dev_on(&dir, &addr);
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).expect("ca"),
        ca_before,
        "the dev CA is reused"
    );
    let agent = dev_client(&dir, "agent");
    let op = {
        drop(op);
        dev_client(&dir, "operator")
    };

    let lease_url = server.url(&format!("/v1/leases/{short_id}"));
    let expired = eventually(Duration::from_secs(10), || {
        let (op, url) = (op.clone(), lease_url.clone());
        async move {
            let (_, l) = get(&op, &url).await;
            (l["state"] == "expired").then_some(l)
        }
    })
    .await;
    assert!(
        expired.is_some(),
        "the reaper expires the lease that ended while the broker was down"
    );
    let (_, l) = get(&op, &server.url(&format!("/v1/leases/{long_id}"))).await;
    assert_eq!(l["state"], "active", "a live lease survives the restart");
    // Tokens issued before the restart still introspect (same key, same store).
    assert_eq!(
        introspect(&agent, &server.url("/v1/introspect"), &long_token).await["active"],
        true
    );

    let audit = dir.join("audit.jsonl");
    let expirations: Vec<Value> = audit_records(&audit)
        .into_iter()
        .filter(|r| r["kind"] == "lease.expired" && r["lease_id"] == short_id.as_str())
        .collect();
    assert_eq!(expirations.len(), 1, "expired exactly once");
    let out = run_cli(&["audit", "verify", audit.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "the chain survives SIGKILL: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The dev policies: helper agents may use jwt for https targets only.
    let helper = dev_client(&dir, "agent2");
    let mut plain = json!({"purpose": "p", "scope": [{"provider": "jwt", "target": "http://x", "actions": ["a"]}], "ttl": "5m"});
    let (s, _) = post_json(&helper, &server.url("/v1/tasks"), plain.clone()).await;
    assert_eq!(s, 403);
    plain["scope"][0]["target"] = json!("https://x");
    plain["ttl"] = json!("2h");
    let (s, b) = post_json(&helper, &server.url("/v1/tasks"), plain).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (403, Some("policy_denied")),
        "dev policy caps tasks at 1 h"
    );
}

#[tokio::test]
async fn dev_tokens_drive_the_ci_exchange_and_bearer_identities() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let server = Server::dev(&dir);
    let d = dir.to_str().expect("utf8");
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).expect("dev.json"))
            .expect("json");
    assert_eq!(info["oidc"]["issuer"], "https://oidc.dev.mayfly.local");
    assert_eq!(info["oidc"]["audience"], "mayfly-dev");
    for k in ["oidc", "jwt_svid"] {
        assert!(info[k]["kid"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(std::path::Path::new(info[k]["jwks"].as_str().expect("path")).exists());
    }
    let token = |args: &[&str]| {
        let mut all = vec!["dev", "token", "--dir", d];
        all.extend_from_slice(args);
        let out = run_cli(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_string()
    };
    let anon = client(&dir.join("ca.pem"), None);
    let exchange = |subject: String, resource: &'static str| {
        let (anon, url) = (anon.clone(), server.url("/v1/token"));
        async move {
            let r = anon
                .post(url)
                .form(&[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("subject_token", subject.as_str()),
                    ("resource", resource),
                    ("scope", "issues:read"),
                ])
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        }
    };
    let ok = token(&[
        "--oidc",
        "--claims",
        r#"{"repository":"acme/app","ref":"refs/heads/main","run_id":"77"}"#,
    ]);
    let (s, b) = exchange(ok, "https://api.example.com").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["token_type"], "Bearer");
    let access = b["access_token"].as_str().expect("token").to_string();
    let agent = dev_client(&dir, "agent");
    assert_eq!(
        introspect(&agent, &server.url("/v1/introspect"), &access).await["active"],
        true
    );
    let other_repo = token(&["--oidc", "--claims", r#"{"repository":"evil/app"}"#]);
    let (s, b) = exchange(other_repo, "https://api.example.com").await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_target")),
        "{b}"
    );

    // A JWT-SVID as a bearer identity, no client certificate.
    let svid = token(&["--jwt-svid", "spiffe://dev.mayfly.local/agent/demo"]);
    let body = json!({"purpose": "bearer", "scope": [{"provider": "jwt", "target": "https://x.example", "actions": ["r"]}], "ttl": "5m"});
    let r = anon
        .post(server.url("/v1/tasks"))
        .bearer_auth(&svid)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.status().as_u16(),
        201,
        "{}",
        r.text().await.unwrap_or_default()
    );
}
