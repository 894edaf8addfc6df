#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The operator CLI against a running dev broker, and `/metrics` after a short flow.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;

fn dev_pair(dir: &Path, who: &str) -> Pair {
    Pair {
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}-key.pem")),
    }
}

fn env(server: &Server, dir: &Path, who: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MAYFLY_ADDR", server.url("")),
        (
            "MAYFLY_CERT",
            dir.join(format!("{who}.pem")).display().to_string(),
        ),
        (
            "MAYFLY_KEY",
            dir.join(format!("{who}-key.pem")).display().to_string(),
        ),
        ("MAYFLY_CA", dir.join("ca.pem").display().to_string()),
    ]
}

fn json_out(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "--json output parses: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn the_cli_lists_and_revokes_and_metrics_show_the_flow() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let server = Server::dev(&dir);
    let agent = client(&dir.join("ca.pem"), Some(&dev_pair(&dir, "agent")));
    let body = json!({"purpose": "cli test", "scope": [{"provider": "jwt", "target": "https://cli.example", "actions": ["r"]}], "ttl": "10m"});
    let mut tokens = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (_, task) = post_json(&agent, &server.url("/v1/tasks"), body.clone()).await;
        let id = task["task_id"].as_str().expect("id").to_string();
        for _ in 0..2 {
            let (s, c) = post_json(
                &agent,
                &server.url(&format!("/v1/tasks/{id}/credentials")),
                json!({"provider": "jwt", "target": "https://cli.example"}),
            )
            .await;
            assert_eq!(s, 201);
            tokens.push((
                id.clone(),
                c["credential"]["access_token"]
                    .as_str()
                    .expect("tok")
                    .to_string(),
            ));
        }
        tasks.push(id);
    }
    let op = env(&server, &dir, "operator");

    let ls = json_out(&run_cli_env(
        &["lease", "ls", "--task", &tasks[0], "--json"],
        &op,
    ));
    assert_eq!(ls["items"].as_array().expect("items").len(), 2);
    let table = run_cli_env(&["task", "ls"], &op);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.starts_with("TASK") && text.contains(&tasks[1]),
        "{text}"
    );

    // An agent certificate is refused on operator commands, with the API's code.
    let refused = run_cli_env(&["lease", "ls"], &env(&server, &dir, "agent"));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not_operator"));

    // Make tasks[0] a tree: the demo agent delegates a slice to the helper (dev policy),
    // which mints under it.
    let helper = client(&dir.join("ca.pem"), Some(&dev_pair(&dir, "agent2")));
    let (s, child) = post_json(
        &agent,
        &server.url(&format!("/v1/tasks/{}/delegate", tasks[0])),
        json!({"principal": "spiffe://dev.mayfly.local/agent/helper", "purpose": "sub-step",
               "scope": [{"provider": "jwt", "target": "https://cli.example", "actions": ["r"]}], "ttl": "5m"}),
    )
    .await;
    assert_eq!(s, 201, "{child}");
    let child_id = child["task_id"].as_str().expect("id").to_string();
    let (s, c) = post_json(
        &helper,
        &server.url(&format!("/v1/tasks/{child_id}/credentials")),
        json!({"provider": "jwt", "target": "https://cli.example"}),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    let helper_token = c["credential"]["access_token"]
        .as_str()
        .expect("tok")
        .to_string();

    let revoked = json_out(&run_cli_env(
        &[
            "task",
            "revoke",
            &tasks[0],
            "--reason",
            "incident 7",
            "--json",
        ],
        &op,
    ));
    assert_eq!(
        revoked["revoked"], 3,
        "the task's two leases and its sub-task's one"
    );
    assert_eq!(revoked["tasks"].as_array().expect("tasks").len(), 2);
    let introspect_url = server.url("/v1/introspect");
    assert_eq!(
        introspect(&agent, &introspect_url, &helper_token).await["active"],
        false
    );
    for (task, tok) in &tokens {
        let active = introspect(&agent, &introspect_url, tok).await["active"] == true;
        assert_eq!(active, task != &tasks[0]);
    }

    let bulk = json_out(&run_cli_env(
        &[
            "revoke",
            "--principal",
            "spiffe://dev.mayfly.local/agent/demo",
            "--reason",
            "offboarding",
            "--json",
        ],
        &op,
    ));
    assert_eq!(bulk["revoked"], 2, "{bulk}");
    for (_, tok) in &tokens {
        assert_eq!(
            introspect(&agent, &introspect_url, tok).await["active"],
            false
        );
    }
    let shown = json_out(&run_cli_env(&["task", "show", &tasks[1], "--json"], &op));
    assert_eq!(shown["state"], "revoked");

    let anon = client(&dir.join("ca.pem"), None);
    let metrics_url = server.url("/metrics");
    // Store-wide gauges are refreshed by the reaper tick (1 s in dev).
    let metrics = eventually(std::time::Duration::from_secs(5), || {
        let (anon, url) = (anon.clone(), metrics_url.clone());
        async move {
            let text = anon.get(url).send().await.ok()?.text().await.ok()?;
            text.contains("mayfly_leases{").then_some(text)
        }
    })
    .await
    .expect("lease gauges appear");
    for series in [
        "mayfly_requests_total",
        "mayfly_request_duration_seconds_bucket",
        "mayfly_policy_decisions_total",
        "mayfly_leases_issued_total",
        "mayfly_lease_transitions_total",
        "mayfly_audit_batch_records",
        r#"mayfly_audit_sync_seconds_bucket{le="0.0005"}"#,
        r#"mayfly_store_commit_seconds_bucket{le="0.0005"}"#,
        // Count histograms get count buckets, not the latency ones.
        r#"mayfly_audit_batch_records_bucket{le="64"}"#,
        r#"mayfly_store_group_commit_ops_bucket{le="256"}"#,
        "mayfly_reaper_backlog",
        "mayfly_leases{",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from /metrics:\n{metrics}"
        );
    }
    assert!(metrics.contains(r#"code="not_operator""#));
}
