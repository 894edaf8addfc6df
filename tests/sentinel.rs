#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Sentinel failover under load: with `durability = "wait"` no acknowledged lease is lost,
//! and requests during the gap fail closed, quickly.

mod common;

use common::*;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

struct Sentinel {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sentinel(master_port: u16) -> Sentinel {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor m 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds m 1000\nsentinel failover-timeout m 3000\nsentinel parallel-syncs m 1\n",
            dir.path().display()
        ),
    )
    .expect("conf");
    let child = Command::new("redis-sentinel")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-sentinel must be installed (apt-get install redis-sentinel)");
    Sentinel {
        child,
        port,
        _dir: dir,
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn sentinel_failover_under_load_loses_no_acknowledged_lease() {
    // No diskless-sync delay: replicas are in sync in milliseconds, not 5 s.
    let fast = ["--repl-diskless-sync-delay", "0"];
    let master = RedisServer::start(&fast);
    let port = master.port.to_string();
    let replicas = [
        RedisServer::start(&["--replicaof", "127.0.0.1", &port, fast[0], fast[1]]),
        RedisServer::start(&["--replicaof", "127.0.0.1", &port, fast[0], fast[1]]),
    ];
    wait_until("two replicas in sync", || {
        master
            .cli(&["INFO", "replication"])
            .matches("state=online")
            .count()
            == 2
    });
    let sentinel = start_sentinel(master.port);
    wait_until("sentinel sees the replicas", || {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &sentinel.port.to_string(),
                "SENTINEL",
                "replicas",
                "m",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        out.matches("flags").count() >= 2 && !out.contains("s_down")
    });

    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let store = format!(
        "kind = \"redis\"\nurl = \"redis+sentinel://127.0.0.1:{}/m\"\nkey_prefix = \"sent\"\ndurability = \"wait\"\nwait_replicas = 1\nwait_timeout = \"2s\"\nop_timeout = \"3s\"",
        sentinel.port
    );
    let config = write_config(
        tmp.path(),
        &pki,
        // A load test: the default request-flood rule would (rightly) stop it.
        &ConfigOptions {
            store: Some(store),
            extra: "[anomaly]\nrules = []".into(),
            ..Default::default()
        },
    );
    let server = Server::serve(&config);
    let agent = pki.client_as("agent", AGENT);
    let (s, task) = post_json(&agent, &server.url("/v1/tasks"), task_body("30m")).await;
    assert_eq!(s, 201, "{task}\n{}", server.logs());
    let creds = server.url(&format!(
        "/v1/tasks/{}/credentials",
        task["task_id"].as_str().expect("id")
    ));

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let failures: Arc<Mutex<Vec<(String, Duration)>>> = Arc::default();
    let acked_after_kill = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (agent, creds, acked, failures, stop, killed, after) = (
            agent.clone(),
            creds.clone(),
            acked.clone(),
            failures.clone(),
            stop.clone(),
            killed.clone(),
            acked_after_kill.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = agent
                    .post(&creds)
                    .json(&json!({"provider": "jwt", "target": "https://api.example.com"}))
                    .send()
                    .await;
                let took = t0.elapsed();
                match r {
                    Ok(r) if r.status() == 201 => {
                        let b: Value = r.json().await.unwrap_or_default();
                        acked
                            .lock()
                            .await
                            .push(b["lease_id"].as_str().unwrap_or_default().to_string());
                        if killed.load(std::sync::atomic::Ordering::Relaxed) {
                            after.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(r) => {
                        let b: Value = r.json().await.unwrap_or_default();
                        failures
                            .lock()
                            .await
                            .push((b["code"].as_str().unwrap_or("?").to_string(), took));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => failures
                        .lock()
                        .await
                        .push((format!("transport: {e}"), took)),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = acked.lock().await.len();
    master.stop(); // SIGKILL the master mid-load
    killed.store(true, std::sync::atomic::Ordering::Relaxed);
    let recovered = eventually(Duration::from_secs(20), || {
        let after = acked_after_kill.clone();
        async move { (after.load(std::sync::atomic::Ordering::Relaxed) >= 20).then_some(()) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    if recovered.is_none() {
        let f = failures.lock().await;
        let mut codes = std::collections::BTreeMap::new();
        for (c, _) in f.iter() {
            *codes.entry(c.clone()).or_insert(0) += 1;
        }
        let logs = server.logs();
        let tail: Vec<&str> = logs.lines().rev().take(5).collect();
        panic!(
            "requests did not succeed again after the failover: {codes:?}\n{}",
            tail.join("\n")
        );
    }
    let acked = acked.lock().await.clone();
    let failures = failures.lock().await.clone();
    assert!(before_kill > 0);
    assert!(!failures.is_empty(), "the gap is visible as failures");
    for (code, took) in &failures {
        assert_eq!(
            code, "store_unavailable",
            "requests during the gap fail closed with a clear code"
        );
        assert!(
            *took < Duration::from_secs(5),
            "and within a bounded time: {took:?}"
        );
    }

    // Every acknowledged lease is in the promoted master.
    let op = pki.client_as("op", OPERATOR);
    for id in &acked {
        // A read may meet the tail of the failover (503 store_unavailable, fail closed):
        // retry those; a 404 would be a lost lease.
        let url = server.url(&format!("/v1/leases/{id}"));
        let found = eventually(Duration::from_secs(15), || {
            let (op, url) = (op.clone(), url.clone());
            async move {
                let (s, l) = get(&op, &url).await;
                (s != 503).then_some((s, l))
            }
        })
        .await;
        let (s, l) = found.expect("the store answers again");
        assert_eq!(s, 200, "acknowledged lease {id} lost: {l}");
        assert_eq!(l["state"], "active");
    }
    drop(replicas);
    println!(
        "failover: {} leases acknowledged ({} before the kill), {} requests failed closed (max {:?})",
        acked.len(),
        before_kill,
        failures.len(),
        failures.iter().map(|f| f.1).max()
    );
}
