#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! 1000 injected crashes around the lease write of a Mayfly-signed JWT: afterwards no
//! credential that left the broker lacks a lease, and the reaper ends every lease.
//! Embedded store and Redis; each also through `Broker::commit`, as a request runs, where
//! every credential that left must have both its lease and its audit record (on the
//! embedded store the two are one write: `docs/audit-log.md`). (The `pending` path of upstream providers, and a crash
//! between their mint and activation, is tested against OpenBao in `vault_provider.rs`.)

mod common;

use common::*;
use mayfly::audit::{AuditEvent, AuditScope};
use mayfly::broker::{BrokerError, CommitError, FaultHook, FaultPoint};
use mayfly::config::Config;
use mayfly::lease::{Lease, LeaseState};
use mayfly::task::{CredentialRequest, LeaseId, RawCredentialRequest, RawTaskRequest, TaskRequest};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const CRASHES: u64 = 1000;

async fn run(store: Option<String>, via_commit: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        store,
        // 1000 requests in a second: the default request-flood rule would (rightly) stop it.
        extra: "[anomaly]\nrules = []".into(),
        ..Default::default()
    };
    let config = Config::load(&write_config(dir.path(), &pki, &opts)).expect("config");

    // Crash plan: attempt i dies at point i % 3 (0 = right after signing, before the
    // lease write; 1 = after the write; 2 = survives). Record every point reached.
    let attempt = Arc::new(AtomicU64::new(0));
    // Every point the flow reached, per lease.
    let seen: Arc<Mutex<Vec<(FaultPoint, LeaseId)>>> = Arc::default();
    let hook: FaultHook = {
        let (attempt, seen) = (attempt.clone(), seen.clone());
        Arc::new(move |point, lease: &LeaseId| {
            seen.lock().expect("lock").push((point, lease.clone()));
            matches!(
                (attempt.load(Ordering::SeqCst) % 3, point),
                (0, FaultPoint::AfterMint) | (1, FaultPoint::AfterActivate)
            )
        })
    };
    let app = mayfly::app::App::build_with_faults(&config, Some(hook))
        .await
        .expect("build");
    let caller = verified(&pki, &pki.svid("agent", AGENT));
    let raw: RawTaskRequest = serde_json::from_value(task_body("2h")).expect("raw");
    let task = app
        .broker
        .declare_task(
            &caller,
            TaskRequest::try_from(raw).expect("valid"),
            &AuditScope::new(AuditEvent::new("test")),
        )
        .await
        .expect("task");

    let mut crashed = 0;
    let mut returned = HashSet::new();
    for i in 0..CRASHES {
        attempt.store(i, Ordering::SeqCst);
        let raw: RawCredentialRequest = serde_json::from_value(serde_json::json!({
            "provider": "jwt", "target": "https://api.example.com", "ttl": "10m"
        }))
        .expect("raw");
        let req = CredentialRequest::try_from(raw).expect("valid");
        let scope = if via_commit {
            AuditScope::for_request(AuditEvent::new("request"))
        } else {
            AuditScope::new(AuditEvent::new("test"))
        };
        let issued = match app
            .broker
            .request_credential(&caller, &task.id, req, &scope)
            .await
        {
            Ok(mayfly::broker::Outcome::Issued(issued)) => issued,
            Ok(_) => panic!("no approval is configured"),
            Err(BrokerError::InjectedCrash(_)) => {
                crashed += 1;
                continue;
            }
            Err(e) => panic!("unexpected error: {e}"),
        };
        if via_commit {
            match app.broker.commit(&scope).await {
                Ok(()) => {}
                Err(CommitError::Refused(BrokerError::InjectedCrash(_))) => {
                    crashed += 1;
                    continue;
                }
                Err(e) => panic!("unexpected commit error: {e}"),
            }
        }
        returned.insert(issued.lease.id.clone());
    }
    let by_plan = |r: u64| (0..CRASHES).filter(|i| i % 3 == r).count();
    assert_eq!(crashed, by_plan(0) + by_plan(1));
    assert_eq!(returned.len(), by_plan(2));

    let points = std::mem::take(&mut *seen.lock().expect("lock"));
    assert!(
        points
            .iter()
            .all(|(p, _)| *p != FaultPoint::AfterPendingWrite),
        "a signed JWT is never recorded as pending"
    );
    let reached = |point: FaultPoint| -> HashSet<LeaseId> {
        points
            .iter()
            .filter(|(p, _)| *p == point)
            .map(|(_, l)| l.clone())
            .collect()
    };
    let (signed, written) = (
        reached(FaultPoint::AfterMint),
        reached(FaultPoint::AfterActivate),
    );
    assert_eq!(signed.len() as u64, CRASHES, "every attempt signed a token");

    // Immediately: exactly the leases that passed the write exist, all active; a token
    // lost in a crash before the write left no record (it never left the process).
    let leases = app.store.task_leases(&task.id).await.expect("leases");
    let ids: HashSet<LeaseId> = leases.iter().map(|l| l.id.clone()).collect();
    assert_eq!(
        ids, written,
        "a lease for every token past the write, no other"
    );
    assert!(
        returned.is_subset(&ids),
        "no returned credential lacks a lease record"
    );
    assert!(leases.iter().all(|l| l.state == LeaseState::Active));
    assert!(leases.iter().all(|l| l.fingerprint.is_some()));
    if via_commit {
        app.audit.flush().await.expect("flush");
        let recorded: HashSet<String> = audit_records(app.audit.path())
            .iter()
            .filter(|r| r["action"] == "MintCredential")
            .filter_map(|r| r["lease_id"].as_str().map(str::to_string))
            .collect();
        let returned_ids: HashSet<String> = returned.iter().map(|l| l.to_string()).collect();
        assert!(
            returned_ids.is_subset(&recorded),
            "every credential that left has its audit record"
        );
        if app.audit.joins_leases() {
            let lease_ids: HashSet<String> = ids.iter().map(|l| l.to_string()).collect();
            assert_eq!(
                lease_ids, recorded,
                "lease and audit record are one write: neither exists without the other"
            );
        }
    }

    // Run the reaper as if past every TTL: nothing stays open.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(3);
    for _ in 0..20 {
        if app.revoker.reap_once(later).await.expect("reap").claimed == 0 {
            break;
        }
    }
    let leases = app.store.task_leases(&task.id).await.expect("leases");
    assert_eq!(leases.len(), written.len());
    assert!(
        leases.iter().all(|l| l.state == LeaseState::Expired),
        "every lease ends at its TTL: {:?}",
        leases.iter().find(|l| l.state != LeaseState::Expired)
    );
}

#[tokio::test]
async fn a_thousand_crashes_leave_no_credential_without_revocation_embedded() {
    run(None, false).await;
}

#[tokio::test]
async fn a_thousand_crashes_leave_no_credential_without_revocation_redis() {
    let redis = RedisServer::start(&[]);
    run(Some(redis_store(&redis.url(), "crash")), false).await;
}

#[tokio::test]
async fn a_thousand_crashes_leave_no_credential_without_lease_and_record_embedded() {
    run(None, true).await;
}

#[tokio::test]
async fn a_thousand_crashes_leave_no_credential_without_lease_and_record_redis() {
    let redis = RedisServer::start(&[]);
    run(Some(redis_store(&redis.url(), "crash-commit")), true).await;
}

#[tokio::test]
async fn leases_left_to_revoke_are_revoked_once_redis_is_back() {
    let port = free_port();
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let redis = RedisServer::start_on(port, &aof);
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        store: Some(redis_store(&redis.url(), "outage")),
        ..Default::default()
    };
    let config = Config::load(&write_config(dir.path(), &pki, &opts)).expect("config");
    let app = mayfly::app::App::build_with_faults(&config, None)
        .await
        .expect("build");
    let caller = verified(&pki, &pki.svid("agent", AGENT));
    let raw: RawTaskRequest = serde_json::from_value(task_body("1h")).expect("raw");
    let task = app
        .broker
        .declare_task(
            &caller,
            TaskRequest::try_from(raw).expect("valid"),
            &AuditScope::new(AuditEvent::new("test")),
        )
        .await
        .expect("task");
    // A broker that died right after recording an upstream mint: a pending lease is all
    // that is left.
    let now = time::OffsetDateTime::now_utc();
    let grant = task.scope.grants()[0].clone();
    let lease = Lease::pending(
        &task.id,
        caller.principal(),
        &grant,
        now,
        now + time::Duration::minutes(10),
    );
    app.store
        .put_new(&lease, now + time::Duration::seconds(60))
        .await
        .expect("pending lease");

    // Redis goes away: the reaper fails closed and keeps its work.
    let data = redis.stop_keep_data();
    let later = time::OffsetDateTime::now_utc() + time::Duration::minutes(5);
    assert!(matches!(
        app.revoker.reap_once(later).await,
        Err(mayfly::lease::StoreError::Unavailable(_))
    ));

    // Redis returns (same data, AOF): the same reaper revokes the stale lease.
    let _redis = RedisServer::start_in(port, data, &aof);
    let mut stats = Default::default();
    for _ in 0..50 {
        match app.revoker.reap_once(later).await {
            Ok(s) => {
                stats = s;
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    assert_eq!(stats.revoked, 1, "{stats:?}");
    let leases = app.store.task_leases(&task.id).await.expect("leases");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].state, LeaseState::Revoked);
    assert_eq!(leases[0].reason.as_deref(), Some("stale_pending"));
}
