#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The audit trail survives its pod: the log rotates with its chain continued, a restart
//! on the same directory (a pod with a persistent volume) continues it, each replica
//! anchors its chain head in the store under its own node id (`MAYFLY_NODE_ID`), and a
//! truncated tail is detected against those anchors.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// SIGTERM (what Kubernetes sends) and wait for the broker to exit.
fn stop_gracefully(mut server: Server) {
    let pid = server.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if server.child.try_wait().expect("wait").is_some() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "broker did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn declare_many(pki: &Pki, server: &Server, n: usize) {
    let agent = pki.client_as("agent", AGENT);
    for _ in 0..n {
        let (s, body) = post_json(&agent, &server.url("/v1/tasks"), task_body("10m")).await;
        assert_eq!(s, 201, "{body}");
    }
}

fn verify(args: &[&str]) -> (bool, String) {
    let out = run_cli(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn a_restarted_replica_keeps_a_verifiable_rotated_trail_and_a_cut_tail_is_caught_by_its_anchor()
 {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let audit_dir = dir.path().join("audit");
    let audit = audit_dir.join("audit.jsonl");
    let opts = ConfigOptions {
        audit: Some(audit.clone()),
        extra: "[anomaly]\nrules = []\n# Hundreds of tasks fill the log past rotation in seconds.\nmax_tasks_per_principal = 100000\n".into(),
        ..Default::default()
    };
    let cfg = write_config(dir.path(), &pki, &opts);
    let text = std::fs::read_to_string(&cfg).expect("cfg").replace(
        "[audit]\n",
        "[audit]\nrotate_bytes = 65536\nanchor_interval = \"200ms\"\n",
    );
    std::fs::write(&cfg, text).expect("cfg");
    let node = |n: &str| vec![("MAYFLY_NODE_ID", n.to_string())];

    // First life of the pod: enough records to rotate at least once.
    let server = Server::serve_env(&cfg, &node("mayfly-0"));
    declare_many(&pki, &server, 160).await;
    stop_gracefully(server);
    let rotated = mayfly::audit::rotated_files(&audit).expect("list");
    assert!(!rotated.is_empty(), "the log rotated at 64 KiB");

    // Second life, same volume: the chain goes on in the same set.
    let server = Server::serve_env(&cfg, &node("mayfly-0"));
    declare_many(&pki, &server, 5).await;
    stop_gracefully(server);

    let records = audit_records(&audit);
    assert!(
        records.iter().all(|r| r["node"] == "mayfly-0"),
        "node id from the environment"
    );
    let store = dir.path().join("leases.redb");
    let (ok, out) = verify(&[
        "audit",
        "verify",
        audit_dir.to_str().expect("utf8"),
        "--anchors",
        store.to_str().expect("utf8"),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("tail matches the anchor of mayfly-0"), "{out}");

    // Someone cuts the last records of the replica's log.
    let all = lines(&audit);
    let kept = &all[..all.len() - 3];
    std::fs::write(&audit, kept.join("\n") + "\n").expect("truncate");
    let (ok, out) = verify(&["audit", "verify", audit.to_str().expect("utf8")]);
    assert!(ok, "the chain alone cannot see a cut tail: {out}");
    let (ok, out) = verify(&[
        "audit",
        "verify",
        audit.to_str().expect("utf8"),
        "--anchors",
        cfg.to_str().expect("utf8"),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("the tail was truncated"), "{out}");
}

#[tokio::test]
async fn anchors_in_redis_are_checked_while_the_replica_runs() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let audit = dir.path().join("audit.jsonl");
    let opts = ConfigOptions {
        store: Some(redis_store(&redis.url(), "anch")),
        node_id: "replica-a".into(),
        extra: "[anomaly]\nrules = []\n".into(),
        ..Default::default()
    };
    let cfg = write_config(dir.path(), &pki, &opts);
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("[audit]\n", "[audit]\nanchor_interval = \"100ms\"\n");
    std::fs::write(&cfg, text).expect("cfg");
    let server = Server::serve(&cfg);
    declare_many(&pki, &server, 5).await;
    let (url, path) = (redis.url(), audit.to_str().expect("utf8").to_string());
    let args = |url: &str| {
        vec![
            "audit".to_string(),
            "verify".into(),
            path.clone(),
            "--anchors".into(),
            url.to_string(),
            "--key-prefix".into(),
            "anch".into(),
        ]
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        verify(&refs)
    };
    // The anchor reaches the head once the publisher has run after the last write.
    let head = audit_records(&audit).len();
    let caught_up = eventually(Duration::from_secs(10), || async {
        let anchors = redis.cli(&["HGET", "{anch}:anchor:replica-a", "seq"]);
        (anchors.parse::<usize>().ok()? >= head).then_some(())
    })
    .await;
    assert!(
        caught_up.is_some(),
        "anchor never published: {}",
        server.logs()
    );
    let (ok, out) = run(args(&url));
    assert!(ok, "{out}");
    assert!(
        out.contains("tail matches the anchor of replica-a"),
        "{out}"
    );

    // Cut the tail under the running replica's feet: the off-host anchor catches it.
    let all = lines(&audit);
    std::fs::write(&audit, all[..all.len() - 2].join("\n") + "\n").expect("truncate");
    let (ok, out) = run(args(&url));
    assert!(!ok, "{out}");
    assert!(out.contains("the tail was truncated"), "{out}");
}
