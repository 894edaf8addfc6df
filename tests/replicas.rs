#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Several broker replicas on one real Redis.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

fn spawn_dev_replica(dir: &std::path::Path, store: &str) -> Server {
    Server::dev_with(dir, &["--store", store])
}

#[tokio::test]
async fn dev_replicas_on_one_redis_share_tasks_leases_and_revocation() {
    let redis = RedisServer::start(&[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let a = spawn_dev_replica(&dir, &redis.url());
    let b = spawn_dev_replica(&dir, &redis.url());
    let agent = dev_client(&dir, "agent");
    let body = json!({"purpose": "p", "scope": [{"provider": "jwt", "target": "https://x.example", "actions": ["r"]}], "ttl": "10m"});
    let (s, task) = post_json(&agent, &a.url("/v1/tasks"), body).await;
    assert_eq!(s, 201, "{task}");
    let id = task["task_id"].as_str().expect("id");
    let (s, cred) = post_json(
        &agent,
        &b.url(&format!("/v1/tasks/{id}/credentials")),
        json!({"provider": "jwt", "target": "https://x.example"}),
    )
    .await;
    assert_eq!(s, 201, "replica B sees the task declared on A: {cred}");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    assert_eq!(
        introspect(&agent, &a.url("/v1/introspect"), token).await["active"],
        true
    );
    let (s, _) = post_json(
        &agent,
        &b.url(&format!("/v1/tasks/{id}/complete")),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        introspect(&agent, &a.url("/v1/introspect"), token).await["active"],
        false
    );
    // Each replica writes its own audit chain, and each verifies.
    let chains: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("audit-dev-"))
        })
        .collect();
    assert_eq!(chains.len(), 2, "{chains:?}");
    for c in chains {
        let out = run_cli(&["audit", "verify", c.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

struct Granted {
    lease: String,
    task: String,
    /// The completion was answered 200; `attempted` without an answer means it may or
    /// may not have happened (the replica died with the response in flight).
    completed: bool,
    attempted: bool,
}

#[tokio::test]
async fn three_replicas_one_killed_mid_load_every_granted_lease_ends_once() {
    let redis = RedisServer::start(&[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let mut replicas = Vec::new();
    let mut audits = Vec::new();
    for n in 0..3 {
        let dir = tmp.path().join(format!("r{n}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let opts = ConfigOptions {
            store: Some(redis_store(&redis.url(), "load")),
            node_id: format!("replica-{n}"),
            claim_hold: "2s".into(),
            // A replica killed between "record" and "activate" leaves a pending lease:
            // short pending timeout so the survivors revoke it within the test.
            extra: "[limits]\npending_timeout = \"2s\"".into(),
            ..Default::default()
        };
        // Replicas share one JWT key (the shared config in a real deployment).
        let config = write_config(&dir, &pki, &opts);
        let text = std::fs::read_to_string(&config).expect("read").replace(
            &format!("{:?}", dir.join("jwt-key.pem")),
            &format!("{:?}", tmp.path().join("jwt-key.pem")),
        );
        std::fs::write(&config, text).expect("write");
        audits.push(dir.join("audit.jsonl"));
        replicas.push(Some(Server::serve(&config)));
    }
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| r.as_ref().expect("up").url(""))
        .collect();
    let agent = pki.client_as("agent", AGENT);
    let granted: Arc<Mutex<Vec<Granted>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut workers = Vec::new();
    for w in 0..6usize {
        let (agent, urls, granted, stop) =
            (agent.clone(), urls.clone(), granted.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let base = &urls[i % 3];
                let Ok(r) = agent.post(format!("{base}/v1/tasks")).json(&task_body("1m")).send().await else { continue };
                if r.status() != 201 {
                    continue;
                }
                let task: Value = r.json().await.unwrap_or_default();
                let Some(task_id) = task["task_id"].as_str().map(String::from) else { continue };
                let mut mine = Vec::new();
                for k in 0..4 {
                    let base = &urls[(i + k) % 3];
                    let req = json!({"provider": "jwt", "target": "https://api.example.com", "ttl": format!("{}s", 1 + (k % 3))});
                    let Ok(r) = agent.post(format!("{base}/v1/tasks/{task_id}/credentials")).json(&req).send().await else { continue };
                    if r.status() == 201 {
                        let b: Value = r.json().await.unwrap_or_default();
                        if let Some(l) = b["lease_id"].as_str() {
                            mine.push(l.to_string());
                        }
                    }
                }
                let complete = i % 3 == 0;
                let mut completed = false;
                if complete {
                    let base = &urls[(i + 1) % 3];
                    completed = agent
                        .post(format!("{base}/v1/tasks/{task_id}/complete"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                }
                let mut g = granted.lock().await;
                for lease in mine {
                    g.push(Granted { lease, task: task_id.clone(), completed, attempted: complete });
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGKILL one replica in the middle of the load.
    if let Some(r) = replicas[1].take() {
        r.kill();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let granted = granted.lock().await;
    assert!(
        granted.len() >= 20,
        "load produced only {} leases",
        granted.len()
    );

    // Longest TTL 3 s + claim hold 2 s of the dead replica + reaper ticks.
    let op = pki.client_as("op", OPERATOR);
    let survivor = urls[0].clone();
    let all_ended = eventually(Duration::from_secs(20), || {
        let (op, survivor) = (op.clone(), survivor.clone());
        async move {
            let mut states = HashMap::new();
            let mut after: Option<String> = None;
            loop {
                let mut url = format!("{survivor}/v1/leases?limit=500");
                if let Some(a) = &after {
                    url.push_str(&format!("&after={a}"));
                }
                let (_, page) = get(&op, &url).await;
                for l in page["items"].as_array().cloned().unwrap_or_default() {
                    states.insert(
                        l["lease_id"].as_str().unwrap_or_default().to_string(),
                        l["state"].as_str().unwrap_or_default().to_string(),
                    );
                }
                match page["next"].as_str() {
                    Some(n) => after = Some(n.to_string()),
                    None => break,
                }
            }
            let open = states
                .values()
                .filter(|s| *s == "active" || *s == "pending" || *s == "revoking")
                .count();
            (open == 0).then_some(states)
        }
    })
    .await
    .expect("every lease reaches a terminal state after the kill");

    let mut expired_records: HashMap<String, usize> = HashMap::new();
    let mut revoked_records: HashMap<String, usize> = HashMap::new();
    for a in &audits {
        for r in audit_records(a) {
            let id = r["lease_id"].as_str().unwrap_or_default().to_string();
            match r["kind"].as_str() {
                Some("lease.expired") => *expired_records.entry(id).or_default() += 1,
                Some("lease.revoked") => *revoked_records.entry(id).or_default() += 1,
                _ => {}
            }
        }
    }
    let mut tasks_completed = HashSet::new();
    for g in granted.iter() {
        let state = all_ended.get(&g.lease).map(String::as_str);
        if g.completed {
            tasks_completed.insert(g.task.clone());
            assert_eq!(
                state,
                Some("revoked"),
                "lease {} of completed task",
                g.lease
            );
        } else if g.attempted && state == Some("revoked") {
            // The completion took effect but its answer was lost with the replica.
            continue;
        } else {
            assert_eq!(
                state,
                Some("expired"),
                "lease {} must have expired",
                g.lease
            );
            assert_eq!(
                expired_records.get(&g.lease),
                Some(&1),
                "lease {} expired exactly once in the audit",
                g.lease
            );
        }
    }
    assert!(
        expired_records.values().all(|n| *n == 1),
        "no lease expired twice"
    );
    assert!(
        revoked_records.values().all(|n| *n == 1),
        "no lease revoked twice"
    );
    for (n, a) in audits.iter().enumerate() {
        if n == 1 {
            continue; // the killed replica's chain may end in a torn record; it is dropped on restart
        }
        let out = run_cli(&["audit", "verify", a.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "{} leases granted across 3 replicas ({} completed tasks); replica 1 SIGKILLed mid-load",
        granted.len(),
        tasks_completed.len()
    );
}
