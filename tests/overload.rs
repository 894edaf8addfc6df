#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Overload against the real binary: past `limits.max_in_flight`, requests are shed at
//! once with `503 overloaded` and leave nothing behind.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_burst_past_the_in_flight_limit_is_shed_quickly_and_shed_requests_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        extra: "[anomaly]\nrules = []\n[limits]\nmax_in_flight = 2".into(),
        ..Default::default()
    };
    let server = Server::serve(&write_config(dir.path(), &pki, &opts));
    let agent = pki.client_as("agent", AGENT);
    let (s, body) = post_json(&agent, &server.url("/v1/tasks"), task_body("10m")).await;
    assert_eq!(s, 201, "{body}");
    let task = body["task_id"].as_str().expect("task_id").to_string();
    let url = server.url(&format!("/v1/tasks/{task}/credentials"));

    // 60 concurrent mints, each on its own connection: at most 2 run at once.
    let burst = (0..60).map(|_| {
        let (agent, url) = (agent.clone(), url.clone());
        async move {
            let t0 = Instant::now();
            let r = agent
                .post(&url)
                .json(&json!({"provider": "jwt", "target": "https://api.example.com", "ttl": "5m"}))
                .send()
                .await
                .expect("send");
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body, retry_after, t0.elapsed())
        }
    });
    let results = futures_util::future::join_all(burst).await;

    let issued: Vec<&str> = results
        .iter()
        .filter(|(s, ..)| *s == 201)
        .map(|(_, b, ..)| b["lease_id"].as_str().expect("lease_id"))
        .collect();
    let shed: Vec<_> = results.iter().filter(|(s, ..)| *s == 503).collect();
    assert_eq!(
        issued.len() + shed.len(),
        60,
        "only 201 or 503: {results:?}"
    );
    assert!(!issued.is_empty(), "some requests were served");
    assert!(
        !shed.is_empty(),
        "a burst of 60 past a limit of 2 sheds some"
    );
    for (_, body, retry_after, took) in &shed {
        assert_eq!(body["code"], "overloaded", "{body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        // Shed at once, not after queueing behind the served requests' fsyncs.
        assert!(*took < Duration::from_secs(2), "shed after {took:?}");
    }

    // No partial writes: the task holds exactly the leases that were handed out, and the
    // audit trail has one mint record per issued credential and none for shed requests.
    let operator = pki.client_as("operator", OPERATOR);
    let (s, view) = get(&operator, &server.url(&format!("/v1/tasks/{task}"))).await;
    assert_eq!(s, 200, "{view}");
    let mut stored: Vec<&str> = view["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| l["lease_id"].as_str().expect("lease_id"))
        .collect();
    let mut handed: Vec<&str> = issued.clone();
    stored.sort_unstable();
    handed.sort_unstable();
    assert_eq!(stored, handed);
    let mints: Vec<_> = audit_records(&dir.path().join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["action"] == "MintCredential")
        .collect();
    assert_eq!(mints.len(), issued.len());
    assert!(mints.iter().all(|r| r["status"] == 201));
}
