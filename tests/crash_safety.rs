#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! 1000 injected crashes between lease write, mint and activation: afterwards no
//! credential exists without a lease that the reaper ends. Embedded store and Redis.

mod common;

use common::*;
use mayfly::audit::{AuditEvent, AuditScope};
use mayfly::broker::{BrokerError, FaultHook, FaultPoint};
use mayfly::config::Config;
use mayfly::lease::LeaseState;
use mayfly::task::{CredentialRequest, LeaseId, RawCredentialRequest, RawTaskRequest, TaskRequest};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const CRASHES: u64 = 1000;

async fn run(store: Option<String>) {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        store,
        ..Default::default()
    };
    let config = Config::load(&write_config(dir.path(), &pki, &opts)).expect("config");

    // Crash plan: attempt i dies at point i % 4 (3 = survives), so every point is hit
    // 250 times; record every lease whose credential was minted.
    let attempt = Arc::new(AtomicU64::new(0));
    let minted: Arc<Mutex<HashSet<LeaseId>>> = Arc::default();
    let hook: FaultHook = {
        let (attempt, minted) = (attempt.clone(), minted.clone());
        Arc::new(move |point, lease: &LeaseId| {
            let plan = attempt.load(Ordering::SeqCst) % 4;
            if point != FaultPoint::AfterPendingWrite {
                minted.lock().expect("lock").insert(lease.clone());
            }
            matches!(
                (plan, point),
                (0, FaultPoint::AfterPendingWrite)
                    | (1, FaultPoint::AfterMint)
                    | (2, FaultPoint::AfterActivate)
            )
        })
    };
    let app = config.build_with_faults(Some(hook)).await.expect("build");
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
    for i in 0..(TOTAL) {
        attempt.store(i, Ordering::SeqCst);
        let raw: RawCredentialRequest = serde_json::from_value(serde_json::json!({
            "provider": "jwt", "target": "https://api.example.com", "ttl": "10m"
        }))
        .expect("raw");
        let req = CredentialRequest::try_from(raw).expect("valid");
        match app
            .broker
            .request_credential(
                &caller,
                &task.id,
                req,
                &AuditScope::new(AuditEvent::new("test")),
            )
            .await
        {
            Ok(_) => {}
            Err(BrokerError::InjectedCrash(_)) => crashed += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(crashed, CRASHES * 3 / 4);

    // Immediately: every lease is either live with an expiry, or due for the reaper.
    let leases = app.store.task_leases(&task.id).await.expect("leases");
    assert_eq!(
        leases.len() as u64,
        TOTAL,
        "every attempt recorded its lease before minting"
    );
    let minted = minted.lock().expect("lock").clone();
    let ids: HashSet<LeaseId> = leases.iter().map(|l| l.id.clone()).collect();
    assert!(
        minted.is_subset(&ids),
        "no minted credential lacks a lease record"
    );

    // Run the reaper as if past the pending timeout and every TTL: nothing stays open.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(3);
    for _ in 0..20 {
        if app.revoker.reap_once(later).await.expect("reap").claimed == 0 {
            break;
        }
    }
    let leases = app.store.task_leases(&task.id).await.expect("leases");
    let open: Vec<_> = leases.iter().filter(|l| !l.state.is_terminal()).collect();
    assert!(
        open.is_empty(),
        "{} leases left open: {:?}",
        open.len(),
        open.first()
    );
    let stale = leases
        .iter()
        .filter(|l| l.reason.as_deref() == Some("stale_pending"))
        .count() as u64;
    assert_eq!(
        stale,
        CRASHES / 2,
        "crashes before activation end as stale-pending revocations"
    );
    assert!(
        leases
            .iter()
            .all(|l| matches!(l.state, LeaseState::Revoked | LeaseState::Expired))
    );
}

const TOTAL: u64 = CRASHES;

#[tokio::test]
async fn a_thousand_crashes_leave_no_credential_without_revocation_embedded() {
    run(None).await;
}

#[tokio::test]
async fn a_thousand_crashes_leave_no_credential_without_revocation_redis() {
    let redis = RedisServer::start(&[]);
    run(Some(redis_store(&redis.url(), "crash"))).await;
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
    // Crash right after the lease write: a pending lease is all that is left.
    let hook: FaultHook = Arc::new(|point, _: &LeaseId| point == FaultPoint::AfterPendingWrite);
    let app = config.build_with_faults(Some(hook)).await.expect("build");
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
    let raw: RawCredentialRequest = serde_json::from_value(
        serde_json::json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .expect("raw");
    let crashed = app
        .broker
        .request_credential(
            &caller,
            &task.id,
            CredentialRequest::try_from(raw).expect("valid"),
            &AuditScope::new(AuditEvent::new("test")),
        )
        .await;
    assert!(matches!(
        crashed,
        Err(BrokerError::InjectedCrash(FaultPoint::AfterPendingWrite))
    ));

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
