#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! AWS revocation under load: many sessions of one role revoked at once through three
//! real replicas on one real Redis, against moto (whose request recorder is not needed
//! here; it holds the policy documents). The deny policy must never lose an entry, and a
//! full policy must be back-pressure, never `irrevocable`.
//!
//! The 300-revocation test with `on_policy_full = "wait"` takes minutes (entries free up
//! only as sessions end, grouped by minute): it runs with `make test-aws-capacity`, not
//! `make test`.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/deploy";

const AWS_POLICY: &str = r#"
@id("agents-aws-declare")
permit (principal, action == Mayfly::Action::"DeclareTask", resource)
when { principal.path like "/agent/*" && resource.provider == "aws" };

@id("agents-aws-mint")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { principal.path like "/agent/*" && resource.provider == "aws" };
"#;

struct Cluster {
    _tmp: tempfile::TempDir,
    pki: Pki,
    moto: Moto,
    redis: RedisServer,
    replicas: Vec<Server>,
    audits: Vec<std::path::PathBuf>,
}

async fn create_role(moto: &Moto) {
    let iam = aws_sdk_iam::Client::new(&moto.sdk("k", "s", None).await);
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"]}]});
    iam.create_role()
        .role_name("deploy")
        .assume_role_policy_document(trust.to_string())
        .max_session_duration(3600)
        .send()
        .await
        .expect("create role");
}

/// `n` replicas of the real binary on one Redis, each with `aws` settings `aws_extra`.
async fn cluster(n: usize, aws_extra: &str, max_attempts: u32) -> Cluster {
    cluster_via(n, aws_extra, max_attempts, None).await
}

/// As `cluster`, with the replicas reaching moto through `proxy(moto_port)` if given.
async fn cluster_via(
    n: usize,
    aws_extra: &str,
    max_attempts: u32,
    proxy: Option<fn(u16) -> u16>,
) -> Cluster {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let moto = Moto::start(None);
    create_role(&moto).await;
    let endpoint = match proxy {
        Some(p) => {
            let port: u16 = moto
                .url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("moto port");
            format!("http://127.0.0.1:{}", p(port))
        }
        None => moto.url.clone(),
    };
    let redis = RedisServer::start(&[]);
    let mut replicas = Vec::new();
    let mut audits = Vec::new();
    for i in 0..n {
        let dir = tmp.path().join(format!("r{i}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let opts = ConfigOptions {
            store: Some(redis_store(&redis.url(), "scale")),
            node_id: format!("replica-{i}"),
            claim_hold: "5s".into(),
            extra: format!(
                r#"
[anomaly]
rules = []
[limits]
max_lease_ttl = "1h"
[providers.aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
allow_insecure_http = true
rate_limit_per_second = 0
{aws_extra}
[providers.aws.targets.deploy]
role_arn = "{ROLE_ARN}"
"#
            ),
            ..Default::default()
        };
        let config = write_config(&dir, &pki, &opts);
        let text = std::fs::read_to_string(&config)
            .expect("read")
            .replace(
                &format!("{:?}", dir.join("jwt-key.pem")),
                &format!("{:?}", tmp.path().join("jwt-key.pem")),
            )
            .replace(
                "claim_hold = \"5s\"",
                &format!("claim_hold = \"5s\"\nmax_attempts = {max_attempts}"),
            );
        std::fs::write(&config, text).expect("write");
        std::fs::write(dir.join("policies/aws.cedar"), AWS_POLICY).expect("policy");
        audits.push(dir.join("audit.jsonl"));
        let env = vec![
            ("AWS_ACCESS_KEY_ID", "mayfly".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "mayfly".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONFIG_FILE", dir.join("none").display().to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.join("none").display().to_string(),
            ),
        ];
        replicas.push(Server::serve_env(&config, &env));
    }
    Cluster {
        _tmp: tmp,
        pki,
        moto,
        redis,
        replicas,
        audits,
    }
}

impl Cluster {
    fn url(&self, i: usize, path: &str) -> String {
        self.replicas[i % self.replicas.len()].url(path)
    }
    fn agent(&self) -> reqwest::Client {
        self.pki.client_as("agent", AGENT)
    }
    fn operator(&self) -> reqwest::Client {
        self.pki.client_as("operator", OPERATOR)
    }
    async fn declare(&self) -> String {
        let (s, b) = post_json(
            &self.agent(),
            &self.url(0, "/v1/tasks"),
            json!({"purpose": "load", "ttl": "1h", "scope": [
                {"provider": "aws", "target": "deploy", "actions": ["iam:GetRole"],
                 "resources": [ROLE_ARN]}]}),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        b["task_id"].as_str().expect("task").to_string()
    }
    /// Mints `n` leases of `ttl` under `task`, 8 at a time, round-robin over replicas.
    async fn mint_many(&self, task: &str, n: usize, ttl: &str) -> Vec<String> {
        use futures_util::StreamExt;
        let agent = self.agent();
        futures_util::stream::iter(0..n)
            .map(|i| {
                let (agent, url) = (
                    agent.clone(),
                    self.url(i, &format!("/v1/tasks/{task}/credentials")),
                );
                let ttl = ttl.to_string();
                async move {
                    let (s, b) = post_json(
                        &agent,
                        &url,
                        json!({"provider": "aws", "target": "deploy", "ttl": ttl}),
                    )
                    .await;
                    assert_eq!(s, 201, "{b}");
                    b["lease_id"].as_str().expect("lease").to_string()
                }
            })
            .buffer_unordered(8)
            .collect()
            .await
    }
    /// Revokes every lease at once, round-robin over the replicas.
    async fn revoke_all(&self, leases: &[String]) -> Vec<Value> {
        let op = self.operator();
        let calls = leases.iter().enumerate().map(|(i, id)| {
            let (op, url) = (op.clone(), self.url(i, &format!("/v1/leases/{id}/revoke")));
            async move {
                let (s, b) = post_json(&op, &url, json!({"reason": "incident"})).await;
                assert_eq!(s, 200, "{b}");
                b
            }
        });
        // At most 48 at once: one source may hold 64 connections to a replica
        // (`limits.max_connections_per_source`), and this is an operator, not a flood.
        use futures_util::StreamExt;
        futures_util::stream::iter(calls)
            .buffer_unordered(48)
            .collect()
            .await
    }
    /// Every lease's state, read through replica 0.
    async fn states(&self, leases: &[String]) -> HashMap<String, usize> {
        let op = self.operator();
        let mut out: HashMap<String, usize> = HashMap::new();
        for id in leases {
            let (s, b) = get(&op, &self.url(0, &format!("/v1/leases/{id}"))).await;
            assert_eq!(s, 200, "{b}");
            *out.entry(b["state"].as_str().expect("state").to_string())
                .or_default() += 1;
        }
        out
    }
    async fn deny_doc(&self) -> Option<Value> {
        role_deny_policy(&aws_sdk_iam::Client::new(
            &self.moto.sdk("k", "s", None).await,
        ))
        .await
    }
    fn audit(&self, kind: &str) -> Vec<Value> {
        self.audits
            .iter()
            .flat_map(|p| audit_records(p))
            .filter(|r| r["kind"] == kind)
            .collect()
    }
    async fn metric_sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for r in &self.replicas {
            let text = self
                .operator()
                .get(r.url("/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            sum += text
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        sum
    }
}

fn denied(doc: &Value) -> BTreeSet<String> {
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
async fn two_hundred_leases_revoked_at_once_through_three_replicas_are_all_denied() {
    // The pruner/reconciler runs every second on every replica, rewriting the document
    // while revocations land.
    let c = cluster(
        3,
        "prune_interval = \"1s\"\nreconcile_interval = \"1s\"",
        10,
    )
    .await;
    let task = c.declare().await;
    let started = Instant::now();
    let leases = c.mint_many(&task, 200, "10m").await;
    let minted = started.elapsed();
    let started = Instant::now();
    let answers = c.revoke_all(&leases).await;
    let revoked_in = started.elapsed();
    // The first attempt of each answered `revoked`, or `revoking` when the role lock was
    // busy (then the reaper finishes it).
    for a in &answers {
        assert!(a["state"] == "revoked" || a["state"] == "revoking", "{a}");
    }
    let states = eventually(Duration::from_secs(60), || async {
        let s = c.states(&leases).await;
        (s.get("revoked") == Some(&200)).then_some(s)
    })
    .await;
    assert!(states.is_some(), "{:?}", c.states(&leases).await);
    // Let several reconcile passes of all three replicas run over the final state, then
    // check the document IAM holds: all 200 entries, none lost.
    let passes = c
        .metric_sum("mayfly_aws_deny_policy_reconcile_total{outcome=\"ok\"}")
        .await;
    eventually(Duration::from_secs(10), || async {
        (c.metric_sum("mayfly_aws_deny_policy_reconcile_total{outcome=\"ok\"}")
            .await
            >= passes + 6.0)
            .then_some(())
    })
    .await
    .expect("reconcile passes run");
    let doc = c.deny_doc().await.expect("deny policy");
    let kept = denied(&doc);
    let want: BTreeSet<String> = leases.iter().cloned().collect();
    let lost: Vec<_> = want.difference(&kept).collect();
    eprintln!(
        "200 leases: minted in {minted:?}, revoked in {revoked_in:?}; policy holds {} of 200 entries ({} characters); fence lost {} time(s)",
        kept.intersection(&want).count(),
        doc.to_string().len(),
        c.metric_sum("mayfly_aws_role_lock_fence_lost_total").await,
    );
    assert!(lost.is_empty(), "{} entries lost: {lost:?}", lost.len());
    assert_eq!(kept.len(), 200);
    assert_eq!(
        c.audit("lease.irrevocable").len(),
        0,
        "no lease became irrevocable"
    );
}

#[tokio::test]
#[ignore = "minutes long: make test-aws-capacity"]
async fn above_capacity_with_wait_nothing_becomes_irrevocable_and_all_are_denied_as_room_frees() {
    // Sessions as short as 20 s (emulator only) so filler entries expire within the test;
    // two attempts before `irrevocable`, so counting back-pressure as a failure would
    // show at once.
    let c = cluster(
        3,
        "min_session_duration = \"20s\"\non_policy_full = \"wait\"\nprune_interval = \"2s\"\nreconcile_interval = \"2s\"",
        2,
    )
    .await;
    let task = c.declare().await;
    let fillers = c.mint_many(&task, 260, "20s").await;
    let long = c.mint_many(&task, 40, "15m").await;
    let all: Vec<String> = fillers.iter().chain(&long).cloned().collect();
    let started = Instant::now();
    c.revoke_all(&fillers).await;
    c.revoke_all(&long).await;
    // Back-pressure is visible: some revocations wait for room.
    let waiting = eventually(Duration::from_secs(30), || async {
        let n = c.metric_sum("mayfly_aws_deny_policy_waiting").await;
        (n > 0.0).then_some(n)
    })
    .await
    .expect("the policy fills up and revocations wait");
    let first = c.deny_doc().await.expect("deny policy");
    let first_entries = denied(&first).len();
    // As the fillers' sessions end their statements expire, and the long-lived sessions
    // get their entries: every lease ends `revoked`, none `irrevocable`.
    let max_revoking = std::sync::atomic::AtomicUsize::new(0);
    let done = eventually(Duration::from_secs(240), || async {
        let s = c.states(&all).await;
        assert_eq!(s.get("irrevocable"), None, "{s:?}");
        max_revoking.fetch_max(
            s.get("revoking").copied().unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        (s.get("revoked") == Some(&300)).then_some(s)
    })
    .await;
    assert!(done.is_some(), "{:?}", c.states(&all).await);
    let took = started.elapsed();
    let max_revoking = max_revoking.into_inner();
    let doc = c.deny_doc().await.expect("deny policy");
    let kept = denied(&doc);
    let missing: Vec<_> = long.iter().filter(|l| !kept.contains(*l)).collect();
    eprintln!(
        "300 revocations (260 of 20 s sessions, 40 of 15 min): {first_entries} entries fit at first, \
         waiting gauge summed over replicas {waiting}, at most {max_revoking} leases seen `revoking`, all revoked after {took:?}; \
         final policy {} entries, {} characters; deferrals audited: {}",
        kept.len(),
        doc.to_string().len(),
        c.audit("lease.revoke_deferred").len()
    );
    assert!(
        first_entries < 300 && first_entries > 200,
        "{first_entries}"
    );
    assert!(missing.is_empty(), "long sessions not denied: {missing:?}");
    assert!(!c.audit("lease.revoke_deferred").is_empty());
    assert!(c.audit("lease.irrevocable").is_empty());
}

#[tokio::test]
async fn above_capacity_with_the_issue_time_fallback_the_role_wide_deny_is_written_recorded_and_alerted()
 {
    let c = cluster(
        3,
        "on_policy_full = \"issued_before_deny\"\ntimeout = \"2s\"",
        2,
    )
    .await;
    let task = c.declare().await;
    let leases = c.mint_many(&task, 300, "15m").await;
    // A cut-off covers a lease sent to STS before it: wait past `timeout` after minting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    c.revoke_all(&leases).await;
    let states = eventually(Duration::from_secs(60), || async {
        let s = c.states(&leases).await;
        assert_eq!(s.get("irrevocable"), None, "{s:?}");
        (s.get("revoked") == Some(&300)).then_some(s)
    })
    .await;
    assert!(states.is_some(), "{:?}", c.states(&leases).await);
    let took = started.elapsed();
    let doc = c.deny_doc().await.expect("deny policy");
    let cutoffs: Vec<&Value> = doc["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| s["Condition"]["DateLessThan"]["aws:TokenIssueTime"].is_string())
        .collect();
    assert_eq!(cutoffs.len(), 1, "{doc}");
    let records = c.audit("aws.deny_policy.issued_before");
    let alerts = c.metric_sum("mayfly_aws_issued_before_deny_total").await;
    eprintln!(
        "300 revocations with issued_before_deny: all revoked in {took:?}; {} lease entries + 1 cut-off ({} characters); \
         {} fallback record(s), alert counter {alerts}",
        denied(&doc).len(),
        doc.to_string().len(),
        records.len()
    );
    assert!(!records.is_empty());
    assert!(alerts >= 1.0);
    // Every lease is denied: listed by id, or issued (plus the `timeout` bound on when
    // its AssumeRole went out) before the cut-off.
    let cutoff = time::OffsetDateTime::parse(
        cutoffs[0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"]
            .as_str()
            .expect("time"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let listed = denied(&doc);
    let op = c.operator();
    let mut by_cutoff = 0;
    for l in &leases {
        if listed.contains(l) {
            continue;
        }
        let (_, b) = get(&op, &c.url(0, &format!("/v1/leases/{l}"))).await;
        let issued = time::OffsetDateTime::parse(
            b["issued_at"].as_str().expect("issued_at"),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("rfc3339");
        assert!(
            issued + time::Duration::seconds(2) < cutoff,
            "{l} neither listed nor covered by the cut-off"
        );
        by_cutoff += 1;
    }
    eprintln!(
        "{} listed by id, {by_cutoff} covered by the cut-off",
        300 - by_cutoff
    );
    assert!(by_cutoff > 0);
}

/// A loopback TCP proxy to `upstream` that holds every chunk the client sends for
/// `SLOW` before passing it on: a slow network to AWS, which no emulator can be made to
/// be on demand. Runs on its own thread for the rest of the test process.
fn slow_proxy(upstream: u16) -> u16 {
    const SLOW: Duration = Duration::from_millis(250);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            tokio::time::sleep(SLOW).await;
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
    });
    port
}

#[tokio::test]
async fn a_writer_whose_role_lock_was_taken_over_mid_write_detects_it_and_redoes_the_write() {
    // One replica, reaching IAM over a slow link so its write takes about a second. Its
    // reconciler also takes the role lock: it runs once at start and then not for an
    // hour, so the lock taken over below is the revocation's.
    let c = cluster_via(
        1,
        "timeout = \"5s\"\nreconcile_interval = \"1h\"\nprune_interval = \"1h\"",
        10,
        Some(slow_proxy),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.metric_sum("mayfly_aws_deny_policy_reconcile_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the start-up reconcile pass never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let task = c.declare().await;
    let lease = c.mint_many(&task, 1, "10m").await.remove(0);
    let redis = redis::Client::open(c.redis.url()).expect("redis url");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let (lock, fence) = (
        "{scale}:lock:aws-deny:deploy",
        "{scale}:fence:aws-deny:deploy",
    );
    let revoke = {
        let (op, url) = (
            c.operator(),
            c.url(0, &format!("/v1/leases/{lease}/revoke")),
        );
        tokio::spawn(async move { post_json(&op, &url, json!({"reason": "incident"})).await })
    };
    // As soon as the replica holds the role lock, another writer takes it over (as when
    // the holder stalled past the lock's lifetime): a newer fencing token, held briefly.
    let deadline = Instant::now() + Duration::from_secs(20);
    let held: u64 = loop {
        let cur: Option<u64> = redis::cmd("GET")
            .arg(lock)
            .query_async(&mut conn)
            .await
            .expect("get");
        if let Some(t) = cur {
            break t;
        }
        assert!(Instant::now() < deadline, "the replica never took the lock");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let newer: u64 = redis::Script::new(
        "local t = redis.call('INCR', KEYS[2]) redis.call('SET', KEYS[1], t, 'PX', ARGV[1]) return t",
    )
    .key(lock)
    .key(fence)
    .arg(1500)
    .invoke_async(&mut conn)
    .await
    .expect("take over");
    assert!(newer > held);
    let (s, b) = revoke.await.expect("join");
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["state"], "revoked", "{b}");
    // The replica noticed its token no longer held after its write, and redid the sync
    // under a new lock: the entry is in the policy IAM holds.
    let lost = c.metric_sum("mayfly_aws_role_lock_fence_lost_total").await;
    assert!(lost >= 1.0, "fence loss detected: {lost}");
    let doc = c.deny_doc().await.expect("deny policy");
    assert!(denied(&doc).contains(&lease), "{doc}");
    let after: u64 = redis::cmd("GET")
        .arg(fence)
        .query_async(&mut conn)
        .await
        .expect("fence");
    assert!(
        after > newer,
        "the redo took the lock again: {after} > {newer}"
    );
}
