#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The contract every `LeaseStore` must honour. Each implementation runs the same suite.

mod common;

use common::{lease, task};

use mayfly::approval::{Approval, ApprovalState, ApprovalTransition, HeldRequest};
use mayfly::identity::Principal;
use mayfly::lease::embedded::EmbeddedStore;
use mayfly::lease::{
    ControlRead, Lease, LeaseQuery, LeaseState, LeaseStore, Observation, RiskEvent, StoreError,
    TaskQuery, Transition, WindowHit,
};
use mayfly::provider::RateLimit;
use mayfly::task::{LeaseId, ProviderKind, TaskId, TaskState};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

fn activate(l: &Lease, now: OffsetDateTime) -> Transition {
    let mut t = Transition::new(
        l.id.clone(),
        &[LeaseState::Pending],
        LeaseState::Active,
        now,
    );
    t.due_at = Some(l.expires_at);
    t.fingerprint = Some("sha256:x".into());
    t
}

pub async fn contract(store: Arc<dyn LeaseStore>) {
    let now = OffsetDateTime::now_utc();
    store.ping().await.expect("ping");

    // Tasks: create once, read back, end once, idempotently.
    let parent = task("spiffe://c.test/agent/a", None, now);
    store.create_task(&parent).await.expect("create");
    assert!(matches!(
        store.create_task(&parent).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store.task(&parent.id).await.expect("get").as_ref(),
        Some(&parent)
    );
    assert_eq!(store.task(&TaskId::generate()).await.expect("get"), None);
    let child = task("spiffe://c.test/agent/b", Some(parent.id.clone()), now);
    store.create_task(&child).await.expect("child");
    assert_eq!(
        store.children(&parent.id).await.expect("children"),
        vec![child.id.clone()]
    );
    assert!(
        store
            .children(&child.id)
            .await
            .expect("children")
            .is_empty()
    );

    // Leases: pending → active, checked transitions, idempotent revocation.
    let a = lease(&parent, now, Duration::minutes(10));
    store
        .put_new(&a, now + Duration::seconds(60))
        .await
        .expect("pending");
    assert!(matches!(
        store.put_new(&a, now).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let active = store.transition(activate(&a, now)).await.expect("activate");
    assert_eq!(active.state, LeaseState::Active);
    assert_eq!(active.fingerprint.as_deref(), Some("sha256:x"));
    // Activating twice is a no-op returning the lease, not an error.
    assert_eq!(
        store
            .transition(activate(&a, now))
            .await
            .expect("again")
            .state,
        LeaseState::Active
    );
    let mut revoking = Transition::new(
        a.id.clone(),
        &[LeaseState::Pending, LeaseState::Active],
        LeaseState::Revoking,
        now,
    );
    revoking.reason = Some("test".into());
    store.transition(revoking).await.expect("revoking");
    // Back to active from revoking is refused.
    assert!(matches!(
        store.transition(activate(&a, now)).await,
        Err(StoreError::InvalidTransition {
            current: LeaseState::Revoking,
            to: LeaseState::Active,
            ..
        })
    ));
    let done = Transition::new(
        a.id.clone(),
        &[LeaseState::Revoking],
        LeaseState::Revoked,
        now,
    );
    assert_eq!(
        store.transition(done.clone()).await.expect("revoked").state,
        LeaseState::Revoked
    );
    assert_eq!(
        store.transition(done).await.expect("idempotent").state,
        LeaseState::Revoked
    );
    assert!(matches!(
        store
            .transition(Transition::new(
                LeaseId::generate(),
                &[LeaseState::Active],
                LeaseState::Revoked,
                now
            ))
            .await,
        Err(StoreError::NotFound(_))
    ));

    // Due index: only due leases are claimed, in due order, and a claim hides them
    // until it lapses.
    let b = lease(&parent, now, Duration::seconds(5));
    let c = lease(&parent, now, Duration::hours(1));
    let d = lease(&child, now, Duration::seconds(1));
    for l in [&b, &c, &d] {
        store
            .put_new(l, now + Duration::seconds(60))
            .await
            .expect("pending");
        store.transition(activate(l, now)).await.expect("activate");
    }
    let later = now + Duration::seconds(30);
    assert_eq!(store.due_count(later).await.expect("count"), 2);
    let claimed = store
        .claim_due(later, later + Duration::seconds(30), 10)
        .await
        .expect("claim");
    let ids: Vec<_> = claimed.iter().map(|l| l.id.clone()).collect();
    assert_eq!(ids, vec![d.id.clone(), b.id.clone()], "earliest due first");
    assert!(
        store
            .claim_due(later, later + Duration::seconds(30), 10)
            .await
            .expect("claim")
            .is_empty(),
        "claimed leases are held"
    );
    let lapsed = later + Duration::seconds(31);
    assert_eq!(
        store
            .claim_due(lapsed, lapsed + Duration::seconds(30), 1)
            .await
            .expect("claim")
            .len(),
        1,
        "a lapsed claim is claimable again, up to the limit"
    );
    // Terminal leases leave the index.
    let expire = Transition::new(
        b.id.clone(),
        &[LeaseState::Active],
        LeaseState::Expired,
        lapsed,
    );
    store.transition(expire).await.expect("expire");
    let far = now + Duration::hours(2);
    let remaining: Vec<_> = store
        .claim_due(far, far, 100)
        .await
        .expect("claim")
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert!(!remaining.contains(&b.id) && !remaining.contains(&a.id));
    assert!(remaining.contains(&c.id) && remaining.contains(&d.id));

    // Queries: by task, by state, paginated.
    let of_parent = store.task_leases(&parent.id).await.expect("leases");
    assert_eq!(of_parent.len(), 3);
    let q = LeaseQuery {
        task: Some(parent.id.clone()),
        limit: 2,
        ..Default::default()
    };
    let page = store.leases(&q).await.expect("page");
    assert_eq!(page.items.len(), 2);
    let next: LeaseId = page.next.expect("cursor").parse().expect("id");
    let page2 = store
        .leases(&LeaseQuery {
            after: Some(next),
            ..q.clone()
        })
        .await
        .expect("page2");
    assert_eq!(page2.items.len(), 1);
    assert!(page2.next.is_none());
    let active_only = LeaseQuery {
        state: Some(LeaseState::Active),
        limit: 100,
        ..Default::default()
    };
    let n_active = store
        .leases(&active_only)
        .await
        .expect("active")
        .items
        .len();
    assert_eq!(n_active, 2);
    let by_principal = LeaseQuery {
        principal: Some("spiffe://c.test/agent/b".into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(store.leases(&by_principal).await.expect("p").items.len(), 1);

    // Per-state counts follow every transition.
    let counts: std::collections::BTreeMap<String, u64> = store
        .lease_counts()
        .await
        .expect("counts")
        .into_iter()
        .collect();
    assert_eq!(counts.get("jwt/revoked"), Some(&1));
    assert_eq!(counts.get("jwt/expired"), Some(&1));
    assert_eq!(counts.get("jwt/active"), Some(&2));
    assert_eq!(counts.get("jwt/pending").copied().unwrap_or(0), 0);

    // Ending tasks.
    let ended = store
        .end_task(&parent.id, TaskState::Completed, "done", now)
        .await
        .expect("end");
    assert_eq!(ended.state, TaskState::Completed);
    assert_eq!(ended.end_reason.as_deref(), Some("done"));
    store
        .end_task(&parent.id, TaskState::Completed, "again", now)
        .await
        .expect("idempotent");
    assert!(matches!(
        store
            .end_task(&parent.id, TaskState::Revoked, "x", now)
            .await,
        Err(StoreError::TaskEnded {
            current: TaskState::Completed,
            ..
        })
    ));
    let tq = TaskQuery {
        state: Some(TaskState::Active),
        limit: 10,
        ..Default::default()
    };
    let active_tasks = store.tasks(&tq).await.expect("tasks");
    assert_eq!(
        active_tasks
            .items
            .iter()
            .map(|t| t.id.clone())
            .collect::<Vec<_>>(),
        vec![child.id.clone()]
    );
    deny_and_lock_contract(&store).await;
    control_contract(store.as_ref()).await;
    approval_contract(store.clone()).await;
}

/// Deny sets and role locks: what the AWS deny policy is rendered from, and its one
/// writer per role.
async fn deny_and_lock_contract(store: &Arc<dyn LeaseStore>) {
    let now = OffsetDateTime::now_utc();
    let set = format!("aws-deny:role-{}", uuid_like());
    store
        .deny_add(&set, "lse_b", now + Duration::minutes(10))
        .await
        .expect("add b");
    store
        .deny_add(&set, "lse_a", now + Duration::minutes(5))
        .await
        .expect("add a");
    store
        .deny_add(&set, "lse_old", now + Duration::seconds(1))
        .await
        .expect("add old");
    // Re-adding keeps the first position and the later expiry.
    store
        .deny_add(&set, "lse_b", now + Duration::minutes(1))
        .await
        .expect("re-add b");
    store
        .deny_add(&set, "lse_a", now + Duration::minutes(20))
        .await
        .expect("extend a");
    let list = store.deny_list(&set, now).await.expect("list");
    let members: Vec<&str> = list.iter().map(|e| e.member.as_str()).collect();
    assert_eq!(members, ["lse_b", "lse_a", "lse_old"]);
    assert_eq!(
        list[0].until.unix_timestamp(),
        (now + Duration::minutes(10)).unix_timestamp()
    );
    assert_eq!(
        list[1].until.unix_timestamp(),
        (now + Duration::minutes(20)).unix_timestamp()
    );
    assert!(list[0].seq < list[1].seq && list[1].seq < list[2].seq);
    // Expired members are not listed, and pruning removes exactly them.
    let later = now + Duration::seconds(2);
    let members: Vec<String> = store
        .deny_list(&set, later)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.member)
        .collect();
    assert_eq!(members, ["lse_b", "lse_a"]);
    assert_eq!(store.deny_prune(&set, later).await.expect("prune"), 1);
    assert_eq!(store.deny_prune(&set, later).await.expect("prune"), 0);
    assert_eq!(store.deny_list(&set, now).await.expect("list").len(), 2);
    // A member added after a prune goes to the end of the order.
    store
        .deny_add(&set, "lse_c", now + Duration::minutes(3))
        .await
        .expect("add c");
    let last = store.deny_list(&set, now).await.expect("list");
    assert_eq!(last.last().map(|e| e.member.as_str()), Some("lse_c"));
    assert!(
        store
            .deny_list("aws-deny:no-such-role", now)
            .await
            .expect("empty")
            .is_empty()
    );

    // Locks: one holder at a time; tokens only grow; a lapsed holder is fenced off.
    let name = format!("aws-deny:lock-{}", uuid_like());
    let ttl = std::time::Duration::from_millis(300);
    let t1 = store
        .lock_acquire(&name, ttl)
        .await
        .expect("acquire")
        .expect("free");
    assert_eq!(store.lock_acquire(&name, ttl).await.expect("busy"), None);
    assert!(store.lock_holds(&name, t1).await.expect("holds"));
    store.lock_release(&name, t1).await.expect("release");
    assert!(!store.lock_holds(&name, t1).await.expect("released"));
    let t2 = store
        .lock_acquire(&name, ttl)
        .await
        .expect("acquire")
        .expect("free again");
    assert!(t2 > t1, "{t2} > {t1}");
    // Let it lapse: the next taker gets a larger token, and the lapsed holder neither
    // holds the lock any more nor can release the new holder's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let t3 = loop {
        if let Some(t) = store.lock_acquire(&name, ttl * 10).await.expect("poll") {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lock never lapsed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    assert!(t3 > t2);
    assert!(!store.lock_holds(&name, t2).await.expect("fenced"));
    store.lock_release(&name, t2).await.expect("stale release");
    assert!(store.lock_holds(&name, t3).await.expect("still held"));
    store.lock_release(&name, t3).await.expect("release");
}

fn uuid_like() -> String {
    TaskId::generate()
        .as_str()
        .trim_start_matches("tsk_")
        .to_string()
}

/// `insert_once`: one winner among concurrent inserts of a key, on every backend; a key
/// can be inserted again once its expiry has passed.
async fn insert_once_contract(store: Arc<dyn LeaseStore>) {
    let now = OffsetDateTime::now_utc();
    let key = format!("jti:dpop:contract:{}", TaskId::generate());
    let racers: Vec<_> = (0..16)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { store.insert_once(&key, now + Duration::minutes(5)).await })
        })
        .collect();
    let mut won = 0;
    for r in racers {
        if r.await.expect("join").expect("insert") {
            won += 1;
        }
    }
    assert_eq!(won, 1, "exactly one insert of a key wins");
    assert!(
        !store
            .insert_once(&key, now + Duration::minutes(5))
            .await
            .expect("again")
    );
    assert!(
        store
            .insert_once(&format!("{key}-other"), now + Duration::minutes(5))
            .await
            .expect("other")
    );

    let short = format!("jti:dpop:contract:{}", TaskId::generate());
    assert!(
        store
            .insert_once(&short, now + Duration::seconds(1))
            .await
            .expect("short")
    );
    let again = common::eventually(std::time::Duration::from_secs(5), || {
        let (store, short) = (store.clone(), short.clone());
        async move {
            store
                .insert_once(&short, OffsetDateTime::now_utc() + Duration::minutes(1))
                .await
                .expect("insert")
                .then_some(())
        }
    })
    .await;
    assert!(again.is_some(), "an expired key can be inserted again");
}

#[tokio::test]
async fn embedded_store_insert_once_has_one_winner_and_expires() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = EmbeddedStore::open(&dir.path().join("leases.redb")).expect("open");
    insert_once_contract(Arc::new(store)).await;
}

#[tokio::test]
async fn redis_store_insert_once_has_one_winner_and_expires() {
    let redis = common::RedisServer::start(&[]);
    let store = mayfly::lease::redis::RedisStore::connect(&redis_config(redis.url(), "once"))
        .await
        .expect("connect");
    insert_once_contract(Arc::new(store)).await;
    let keys = redis.cli(&["--raw", "KEYS", "*"]);
    assert!(
        keys.lines().all(|k| k.starts_with("{once}:once:")),
        "{keys}"
    );
}

/// `shared_secret`: of many concurrent first callers one candidate is kept, and every
/// later call returns it whatever it offers; another name is another secret.
async fn shared_secret_contract(store: Arc<dyn LeaseStore>) -> [u8; 32] {
    let racers: Vec<_> = (0..8u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.shared_secret("contract", [i + 1; 32]).await })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for r in racers {
        seen.insert(r.await.expect("join").expect("secret"));
    }
    assert_eq!(seen.len(), 1, "every racer got the one kept secret");
    let kept = *seen.iter().next().expect("one");
    assert!((1..=8).contains(&kept[0]) && kept.iter().all(|b| *b == kept[0]));
    assert_eq!(
        store
            .shared_secret("contract", [0xee; 32])
            .await
            .expect("again"),
        kept
    );
    assert_eq!(
        store
            .shared_secret("other", [0xaa; 32])
            .await
            .expect("other"),
        [0xaa; 32]
    );
    kept
}

#[tokio::test]
async fn embedded_store_shared_secret_is_made_once_and_survives_reopening() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("leases.redb");
    let kept = shared_secret_contract(Arc::new(EmbeddedStore::open(&path).expect("open"))).await;
    let store = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(
        store
            .shared_secret("contract", [0x11; 32])
            .await
            .expect("after"),
        kept
    );
}

#[tokio::test]
async fn redis_store_shared_secret_is_made_once_for_every_client() {
    let redis = common::RedisServer::start(&[]);
    let a = mayfly::lease::redis::RedisStore::connect(&redis_config(redis.url(), "sec"))
        .await
        .expect("connect");
    let kept = shared_secret_contract(Arc::new(a)).await;
    let b = mayfly::lease::redis::RedisStore::connect(&redis_config(redis.url(), "sec"))
        .await
        .expect("connect");
    assert_eq!(
        b.shared_secret("contract", [0x11; 32]).await.expect("b"),
        kept,
        "a second replica's client reads the first one's secret"
    );
}

fn approval(requester: &str, now: OffsetDateTime, ttl: Duration) -> Approval {
    let request = HeldRequest {
        provider: ProviderKind::Jwt,
        target: "https://t".into(),
        actions: None,
        resources: None,
        ttl_secs: Some(60),
    };
    let principal = Principal::parse(requester).expect("principal");
    let task = TaskId::generate();
    Approval {
        id: format!("apr_{}", uuid::Uuid::new_v4().simple()),
        fingerprint: mayfly::approval::fingerprint(&principal, &task, &request),
        task_id: task,
        requester: principal,
        request,
        state: ApprovalState::Pending,
        created_at: now,
        expires_at: now + ttl,
        keep_until: now + Duration::hours(2),
        decided_by: None,
        reason: None,
    }
}

fn step(id: &str, from: ApprovalState, to: ApprovalState) -> ApprovalTransition {
    ApprovalTransition {
        id: id.into(),
        from,
        to,
        at: OffsetDateTime::now_utc(),
        expires_at: None,
        decided_by: Some("op".into()),
        reason: None,
    }
}

/// Approvals: durable records, compare-and-set transitions, a cap per requester.
async fn approval_contract(store: Arc<dyn LeaseStore>) {
    use ApprovalState::*;
    let now = OffsetDateTime::now_utc();
    let who = format!("spiffe://c.test/agent/{}", uuid::Uuid::new_v4().simple());
    let a = approval(&who, now, Duration::minutes(15));
    let b = approval(&who, now, Duration::minutes(15));
    assert!(store.create_approval(&a, 2).await.expect("a"));
    assert!(store.create_approval(&b, 2).await.expect("b"));
    let c = approval(&who, now, Duration::minutes(15));
    assert!(
        !store.create_approval(&c, 2).await.expect("c"),
        "over the requester's cap"
    );
    let other = approval("spiffe://c.test/agent/other", now, Duration::minutes(15));
    assert!(
        store.create_approval(&other, 2).await.expect("other"),
        "caps are per principal"
    );
    assert_eq!(
        store.approval(&a.id).await.expect("read").as_ref(),
        Some(&a)
    );
    assert_eq!(
        store
            .approval_for(&a.fingerprint)
            .await
            .expect("fp")
            .as_ref(),
        Some(&a)
    );
    assert_eq!(store.approval("apr_missing").await.expect("read"), None);

    let approved = store
        .transition_approval(&step(&a.id, Pending, Approved))
        .await
        .expect("approve")
        .expect("applied");
    assert_eq!(approved.state, Approved);
    assert_eq!(approved.decided_by.as_deref(), Some("op"));
    let again = store
        .transition_approval(&step(&a.id, Pending, Rejected))
        .await
        .expect("again");
    assert_eq!(again.map_err(|c| c.state), Err(Approved), "already decided");

    // Concurrent collections: exactly one wins.
    let mut joins = Vec::new();
    for _ in 0..8 {
        let (store, id) = (store.clone(), a.id.clone());
        joins.push(tokio::spawn(async move {
            store
                .transition_approval(&step(&id, Approved, Collected))
                .await
                .expect("collect")
                .is_ok()
        }));
    }
    let mut won = 0;
    for j in joins {
        won += usize::from(j.await.expect("join"));
    }
    assert_eq!(won, 1, "one collection of one approval");

    // A collected approval no longer counts against the cap.
    assert!(store.create_approval(&c, 2).await.expect("c after collect"));
    let pending: Vec<String> = store
        .approvals(Some(Pending), 100)
        .await
        .expect("list")
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert!(
        pending.contains(&b.id) && pending.contains(&c.id),
        "{pending:?}"
    );
    assert!(!pending.contains(&a.id));

    // A pending approval past its time cannot be approved: the transition's own clock
    // (`at`) is past `expires_at`, while one a moment before it still goes through.
    let late = approval("spiffe://c.test/agent/late", now, Duration::minutes(1));
    assert!(store.create_approval(&late, 2).await.expect("late"));
    let after = ApprovalTransition {
        at: late.expires_at + Duration::milliseconds(1),
        ..step(&late.id, Pending, Approved)
    };
    let refused = store.transition_approval(&after).await.expect("late");
    assert!(matches!(refused, Err(ref x) if x.state == Pending));
    let before = ApprovalTransition {
        at: late.expires_at - Duration::milliseconds(1),
        ..step(&late.id, Pending, Rejected)
    };
    let denied = store.transition_approval(&before).await.expect("in time");
    assert!(matches!(denied, Ok(ref x) if x.state == Rejected));
    assert!(matches!(
        store
            .transition_approval(&step("apr_missing", Pending, Approved))
            .await,
        Err(StoreError::NotFound(_))
    ));
}

fn hit(key: &str, window_ms: u64, threshold: u64, reset: bool) -> WindowHit {
    WindowHit {
        key: key.into(),
        window: std::time::Duration::from_millis(window_ms),
        threshold,
        reset,
    }
}

fn observation(at: OffsetDateTime, windows: Vec<WindowHit>) -> Observation {
    Observation {
        at,
        windows,
        risk: None,
        risk_keys: Vec::new(),
        risk_keep: std::time::Duration::from_secs(600),
    }
}

/// The control state: single-use keys, flags, sliding windows, risk events.
async fn control_contract(store: &dyn LeaseStore) {
    let now = OffsetDateTime::now_utc();
    let jti = format!("jti:bearer:https://iss:{}", uuid::Uuid::new_v4());
    assert!(
        store
            .insert_once(&jti, now + Duration::minutes(5))
            .await
            .expect("once")
    );
    assert!(
        !store
            .insert_once(&jti, now + Duration::minutes(5))
            .await
            .expect("twice")
    );
    // A key whose entry has expired can be inserted again.
    let short = format!("jti:bearer:https://iss:{}", uuid::Uuid::new_v4());
    assert!(
        store
            .insert_once(&short, now + Duration::milliseconds(300))
            .await
            .expect("short")
    );
    assert!(
        !store
            .insert_once(&short, now + Duration::milliseconds(300))
            .await
            .expect("live")
    );
    let again = common::eventually(std::time::Duration::from_secs(5), || async {
        store
            .insert_once(&short, OffsetDateTime::now_utc() + Duration::minutes(1))
            .await
            .expect("after expiry")
            .then_some(())
    })
    .await;
    assert!(again.is_some(), "an expired single-use key is purged");

    // Flags: set until a time, never shortened, independent keys.
    let flag = format!("deny:task:{}", uuid::Uuid::new_v4());
    let other = format!("deny:task:{}", uuid::Uuid::new_v4());
    assert_eq!(
        store
            .flags(std::slice::from_ref(&flag), now)
            .await
            .expect("flags"),
        vec![false]
    );
    store
        .set_flag(&flag, now + Duration::minutes(1))
        .await
        .expect("set");
    store
        .set_flag(&flag, now + Duration::seconds(1))
        .await
        .expect("shorter");
    assert_eq!(
        store
            .flags(&[flag.clone(), other.clone()], now)
            .await
            .expect("flags"),
        vec![true, false]
    );
    assert_eq!(
        store
            .flags(std::slice::from_ref(&flag), now + Duration::seconds(30))
            .await
            .expect("later"),
        vec![true],
        "a shorter set does not shorten the flag"
    );
    assert_eq!(
        store
            .flags(std::slice::from_ref(&flag), now + Duration::minutes(2))
            .await
            .expect("after"),
        vec![false]
    );

    // Windows: count within the window, per key; reset at the threshold when asked.
    let w = format!("w:{}", uuid::Uuid::new_v4());
    let p = format!("p:{}", uuid::Uuid::new_v4());
    let mut counts = Vec::new();
    for i in 0..3 {
        let at = now + Duration::milliseconds(i * 10);
        counts.push(
            store
                .observe(&observation(
                    at,
                    vec![hit(&w, 60_000, 3, true), hit(&p, 60_000, 3, false)],
                ))
                .await
                .expect("observe"),
        );
    }
    assert_eq!(counts, vec![vec![1, 1], vec![2, 2], vec![3, 3]]);
    let next = store
        .observe(&observation(
            now + Duration::milliseconds(40),
            vec![hit(&w, 60_000, 3, true), hit(&p, 60_000, 3, false)],
        ))
        .await
        .expect("observe");
    assert_eq!(
        next,
        vec![1, 4],
        "a reset window starts over; the other keeps sliding"
    );
    // Events older than the window no longer count.
    let later = store
        .observe(&observation(
            now + Duration::seconds(61),
            vec![hit(&p, 60_000, 3, false)],
        ))
        .await
        .expect("observe");
    assert_eq!(later, vec![1]);

    // Token buckets: a burst, then refused with the wait until the next token.
    let bucket = format!("provider:test:{}", uuid::Uuid::new_v4());
    let limit = RateLimit {
        per_second: 5.0,
        burst: 3.0,
    };
    for _ in 0..3 {
        assert_eq!(
            store.take_token(&bucket, limit).await.expect("take"),
            Ok(())
        );
    }
    let wait = store
        .take_token(&bucket, limit)
        .await
        .expect("take")
        .expect_err("spent");
    assert!(
        wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_millis(200),
        "{wait:?}"
    );
    let other = format!("provider:test:{}", uuid::Uuid::new_v4());
    assert_eq!(
        store.take_token(&other, limit).await.expect("take"),
        Ok(()),
        "buckets are per key"
    );

    // Risk events: recorded under every key given, read back while recent.
    let rt = format!("task:{}", uuid::Uuid::new_v4());
    let rp = format!("principal:{}", uuid::Uuid::new_v4());
    let mut obs = observation(now, Vec::new());
    obs.risk = Some(RiskEvent {
        at: now,
        weight: 30,
        name: "external:edr|x".into(),
    });
    obs.risk_keys = vec![rt.clone(), rp.clone()];
    store.observe(&obs).await.expect("risk");
    let got = store
        .risk_events(std::slice::from_ref(&rt), now - Duration::minutes(10))
        .await
        .expect("read");
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].weight, got[0].name.as_str()),
        (30, "external:edr|x")
    );
    assert!((got[0].at - now).abs() < Duration::milliseconds(2));
    assert_eq!(
        store
            .risk_events(&[rt.clone(), rp.clone()], now - Duration::minutes(10))
            .await
            .expect("both")
            .len(),
        2
    );
    assert!(
        store
            .risk_events(&[rt], now + Duration::seconds(1))
            .await
            .expect("later")
            .is_empty(),
        "events before `since` are not returned"
    );
    // One step: a window hit, then flags and risk read (one script on Redis).
    let q = format!("q:requests:{}", uuid::Uuid::new_v4());
    let got = store
        .observe_and_read(
            &observation(now, vec![hit(&q, 60_000, u64::MAX, false)]),
            &ControlRead {
                flags: vec![flag.clone(), other.clone()],
                risk_keys: vec![rp.clone()],
                risk_since: Some(now - Duration::minutes(10)),
            },
        )
        .await
        .expect("observe and read");
    assert_eq!(got.counts, vec![1]);
    assert_eq!(got.flags, vec![true, false]);
    assert_eq!(got.risk.len(), 1);
    assert_eq!(got.risk[0].weight, 30);
}

#[tokio::test]
async fn embedded_store_honours_the_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = EmbeddedStore::open(&dir.path().join("leases.redb")).expect("open");
    contract(Arc::new(store)).await;
}

#[tokio::test]
async fn embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("leases.redb");
    let now = OffsetDateTime::now_utc();
    let t = task("spiffe://c.test/agent/a", None, now);
    let l = lease(&t, now, Duration::seconds(1));
    {
        let store = EmbeddedStore::open(&path).expect("open");
        store.create_task(&t).await.expect("task");
        store
            .put_new(&l, now + Duration::seconds(60))
            .await
            .expect("lease");
        store.transition(activate(&l, now)).await.expect("activate");
    }
    let store = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(store.task(&t.id).await.expect("task"), Some(t));
    let back = store.lease(&l.id).await.expect("lease").expect("present");
    assert_eq!(back.state, LeaseState::Active);
    let due = store
        .claim_due(now + Duration::seconds(2), now + Duration::seconds(30), 10)
        .await
        .expect("due");
    assert_eq!(due.len(), 1, "the due index survives too");
}

#[tokio::test]
async fn embedded_control_state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("leases.redb");
    let now = OffsetDateTime::now_utc();
    {
        let store = EmbeddedStore::open(&path).expect("open");
        assert!(
            store
                .insert_once("jti:x", now + Duration::minutes(5))
                .await
                .expect("once")
        );
        store
            .set_flag("deny:task:t", now + Duration::minutes(5))
            .await
            .expect("flag");
        let mut obs = observation(now, Vec::new());
        obs.risk = Some(RiskEvent {
            at: now,
            weight: 60,
            name: "external:edr".into(),
        });
        obs.risk_keys = vec!["principal:p".into()];
        store.observe(&obs).await.expect("risk");
    }
    let store = EmbeddedStore::open(&path).expect("reopen");
    assert!(
        !store
            .insert_once("jti:x", now + Duration::minutes(5))
            .await
            .expect("again"),
        "a consumed single-use key stays consumed across a restart"
    );
    assert_eq!(
        store
            .flags(&["deny:task:t".into()], now)
            .await
            .expect("flag"),
        vec![true]
    );
    assert_eq!(
        store
            .risk_events(&["principal:p".into()], now - Duration::minutes(1))
            .await
            .expect("risk")
            .len(),
        1
    );
}

#[tokio::test]
async fn embedded_expired_control_entries_are_purged_one_batch_at_a_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("leases.redb")).expect("open"));
    let now = OffsetDateTime::now_utc();
    // Short-lived entries (written concurrently: one group commit), then, once they have
    // expired, writes that purge them in batches.
    let until = now + Duration::seconds(3);
    let mut joins = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        joins.push(tokio::spawn(async move {
            store
                .insert_once(&format!("jti:old:{i}"), until)
                .await
                .expect("old")
        }));
    }
    for j in joins {
        assert!(j.await.expect("join"));
    }
    assert_eq!(store.control_entries().expect("count"), 200);
    let wait = until - OffsetDateTime::now_utc() + Duration::milliseconds(100);
    tokio::time::sleep(std::time::Duration::try_from(wait).unwrap_or_default()).await;
    let now = OffsetDateTime::now_utc();
    for i in 0..10 {
        assert!(
            store
                .insert_once(&format!("jti:new:{i}"), now + Duration::minutes(1))
                .await
                .expect("new")
        );
    }
    assert_eq!(
        store.control_entries().expect("count"),
        10,
        "expired entries purged"
    );
    // Live entries are never dropped by a purge.
    for i in 0..10 {
        assert!(
            !store
                .insert_once(&format!("jti:new:{i}"), now + Duration::minutes(1))
                .await
                .expect("live")
        );
    }
}

fn redis_config(url: String, prefix: &str) -> mayfly::lease::redis::RedisConfig {
    mayfly::lease::redis::RedisConfig {
        url,
        key_prefix: prefix.into(),
        username: None,
        password_file: None,
        tls_ca_file: None,
        durability: mayfly::lease::redis::Durability::Server,
        op_timeout: std::time::Duration::from_secs(2),
    }
}

#[tokio::test]
async fn redis_store_honours_the_contract() {
    let redis = common::RedisServer::start(&[]);
    let store = mayfly::lease::redis::RedisStore::connect(&redis_config(redis.url(), "contract"))
        .await
        .expect("connect");
    contract(Arc::new(store)).await;
    // Everything lives under the one hash-tagged prefix.
    let keys = redis.cli(&["--raw", "KEYS", "*"]);
    assert!(keys.lines().all(|k| k.starts_with("{contract}:")), "{keys}");
}

#[tokio::test]
async fn redis_store_with_a_password_and_aof_durability_checks() {
    let redis = common::RedisServer::start(&[
        "--requirepass",
        "s3cret-pass",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]);
    let dir = tempfile::tempdir().expect("tmp");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret-pass\n").expect("write");
    let mut cfg = redis_config(redis.url(), "auth");
    // Without the password: refused.
    assert!(matches!(
        mayfly::lease::redis::RedisStore::connect(&cfg)
            .await
            .map(|_| ()),
        Err(StoreError::Unavailable(_))
    ));
    cfg.password_file = Some(pw);
    cfg.durability = mayfly::lease::redis::Durability::Aof { verify: true };
    let store = mayfly::lease::redis::RedisStore::connect(&cfg)
        .await
        .expect("connect with password");
    store.ping().await.expect("ping");
    drop(store);
    // A server without appendfsync always is refused for "aof" durability.
    let lax = common::RedisServer::start(&[]);
    let mut cfg = redis_config(lax.url(), "lax");
    cfg.durability = mayfly::lease::redis::Durability::Aof { verify: true };
    match mayfly::lease::redis::RedisStore::connect(&cfg).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("appendfsync"), "{msg}"),
        other => panic!("expected refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn redis_store_fails_closed_within_its_timeout_when_redis_is_gone() {
    let redis = common::RedisServer::start(&[]);
    let store = mayfly::lease::redis::RedisStore::connect(&redis_config(redis.url(), "gone"))
        .await
        .expect("connect");
    redis.stop();
    let now = OffsetDateTime::now_utc();
    let t = task("spiffe://c.test/agent/a", None, now);
    let started = std::time::Instant::now();
    let err = store.create_task(&t).await;
    assert!(matches!(err, Err(StoreError::Unavailable(_))), "{err:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(6),
        "bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn redis_store_over_tls_verifies_the_server_against_its_ca() {
    use mayfly::pki::{Ca, LeafSpec};
    let dir = tempfile::tempdir().expect("tmp");
    let ca = Ca::generate("redis CA", "redis.test").expect("ca");
    let leaf = ca
        .issue(&LeafSpec::server(
            None,
            &["localhost"],
            &["127.0.0.1".parse().expect("ip")],
            1,
        ))
        .expect("leaf");
    let (ca_pem, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("c.pem"),
        dir.path().join("k.pem"),
    );
    std::fs::write(&ca_pem, ca.cert_pem()).expect("write");
    std::fs::write(&cert, &leaf.cert_pem).expect("write");
    std::fs::write(&key, leaf.key_pem.expose()).expect("write");
    let port = common::free_port();
    let p = port.to_string();
    let (c, k, a) = (
        cert.display().to_string(),
        key.display().to_string(),
        ca_pem.display().to_string(),
    );
    let redis = common::RedisServer::start(&[
        "--tls-port",
        &p,
        "--tls-cert-file",
        &c,
        "--tls-key-file",
        &k,
        "--tls-ca-cert-file",
        &a,
        "--tls-auth-clients",
        "no",
    ]);
    let mut cfg = redis_config(format!("rediss://127.0.0.1:{port}"), "tls");
    // Without the CA the server's certificate is not trusted: refused, not downgraded.
    assert!(matches!(
        mayfly::lease::redis::RedisStore::connect(&cfg)
            .await
            .map(|_| ()),
        Err(StoreError::Unavailable(_))
    ));
    cfg.tls_ca_file = Some(ca_pem);
    let store = mayfly::lease::redis::RedisStore::connect(&cfg)
        .await
        .expect("tls connect");
    contract(Arc::new(store)).await;
    drop(redis);
}

#[tokio::test]
async fn redis_cluster_store_honours_the_contract() {
    // Three masters; every Mayfly key shares one hash tag, so scripts stay atomic.
    let nodes: Vec<common::RedisServer> = (0..3)
        .map(|_| {
            common::RedisServer::start(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
            ])
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for _ in 0..100 {
        if nodes[0]
            .cli(&["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let cfg = redis_config(format!("redis+cluster://{}", addrs.join(",")), "cluster");
    let store = mayfly::lease::redis::RedisStore::connect(&cfg)
        .await
        .expect("cluster connect");
    contract(Arc::new(store)).await;
}

/// Audit anchors: one per node, and they only move forward.
async fn anchor_contract(store: Arc<dyn LeaseStore>) {
    use mayfly::lease::AuditAnchor;
    let at = OffsetDateTime::now_utc();
    let anchor = |node: &str, seq: u64, hash: &str| AuditAnchor {
        node: node.into(),
        seq,
        hash: hash.into(),
        at,
    };
    assert!(store.anchors().await.expect("none yet").is_empty());
    assert!(
        store
            .put_anchor(&anchor("n1", 10, "aa"))
            .await
            .expect("put")
    );
    assert!(
        store
            .put_anchor(&anchor("n1", 12, "bb"))
            .await
            .expect("forward")
    );
    assert!(
        store
            .put_anchor(&anchor("n1", 12, "bb"))
            .await
            .expect("same")
    );
    assert!(
        !store
            .put_anchor(&anchor("n1", 11, "cc"))
            .await
            .expect("back"),
        "a lower seq is refused"
    );
    assert!(
        !store
            .put_anchor(&anchor("n1", 12, "dd"))
            .await
            .expect("fork"),
        "the same seq with another hash is refused"
    );
    assert!(store.put_anchor(&anchor("n2", 3, "ee")).await.expect("n2"));
    let mut all = store.anchors().await.expect("anchors");
    all.sort_by(|a, b| a.node.cmp(&b.node));
    assert_eq!(all, vec![anchor("n1", 12, "bb"), anchor("n2", 3, "ee")]);
}

#[tokio::test]
async fn embedded_store_keeps_audit_anchors_moving_forward() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = EmbeddedStore::open(&dir.path().join("leases.redb")).expect("open");
    anchor_contract(Arc::new(store)).await;
}

#[tokio::test]
async fn redis_store_keeps_audit_anchors_moving_forward() {
    let redis = common::RedisServer::start(&[]);
    let store = mayfly::lease::redis::RedisStore::connect(&redis_config(redis.url(), "anchors"))
        .await
        .expect("connect");
    anchor_contract(Arc::new(store)).await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_embedded_store_file_is_owner_only_even_if_it_existed_wider() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("leases.redb");
    drop(EmbeddedStore::open(&path).expect("create"));
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600, "created 0600");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    drop(EmbeddedStore::open(&path).expect("reopen"));
    assert_eq!(mode(&path), 0o600, "narrowed on open");
}

/// Three store connections (as three replicas) take from one provider bucket as fast as
/// they can for two seconds: the grants stay within rate × time + burst.
#[tokio::test]
async fn a_redis_token_bucket_holds_globally_across_connections() {
    let redis = common::RedisServer::start(&[]);
    let limit = RateLimit {
        per_second: 50.0,
        burst: 10.0,
    };
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(
            mayfly::lease::redis::RedisStore::connect(&redis_config(redis.url(), "bucket"))
                .await
                .expect("connect"),
        ));
    }
    let started = std::time::Instant::now();
    let run = std::time::Duration::from_secs(2);
    let mut joins = Vec::new();
    for store in &stores {
        for _ in 0..4 {
            let store = store.clone();
            joins.push(tokio::spawn(async move {
                let mut granted = 0u64;
                while started.elapsed() < run {
                    if store
                        .take_token("provider:aws", limit)
                        .await
                        .expect("take")
                        .is_ok()
                    {
                        granted += 1;
                    }
                }
                granted
            }));
        }
    }
    let mut granted = 0;
    for j in joins {
        granted += j.await.expect("join");
    }
    let secs = started.elapsed().as_secs_f64();
    let bound = limit.per_second * secs + limit.burst;
    println!("{granted} grants in {secs:.2} s across 3 connections (bound {bound:.0})");
    assert!(granted as f64 <= bound, "{granted} > {bound}");
    assert!(
        granted as f64 >= limit.per_second * 1.5,
        "the bucket refills: {granted}"
    );
}

async fn state_of(store: &dyn LeaseStore, id: &TaskId) -> TaskState {
    store.task(id).await.expect("read").expect("present").state
}

/// The embedded store keeps tasks decoded for the request path: a task's ending shows at
/// once on the next read, also to readers hammering the task while it ends.
#[tokio::test]
async fn embedded_task_reads_see_an_ending_as_soon_as_it_returns() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("leases.redb")).expect("open"));
    let now = OffsetDateTime::now_utc();
    for round in 0..30 {
        let t = task("spiffe://c.test/agent/a", None, now);
        store.create_task(&t).await.expect("task");
        assert_eq!(store.task(&t.id).await.expect("read"), Some(t.clone()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (store, id, stop) = (store.clone(), t.id.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        store.task(&id).await.expect("read");
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let to = if round % 2 == 0 {
            TaskState::Revoked
        } else {
            TaskState::Completed
        };
        let ended = store.end_task(&t.id, to, "test", now).await.expect("end");
        assert_eq!(ended.state, to);
        let read = store.task(&t.id).await.expect("read").expect("present");
        assert_eq!(read.state, to, "round {round}: the ending shows at once");
        assert_eq!(read.end_reason.as_deref(), Some("test"));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.await.expect("reader");
        }
        assert_eq!(state_of(&*store, &t.id).await, to);
    }
}

/// An ending whose caller stopped waiting (a dropped request) still commits, and then no
/// read may show the task as it was.
#[tokio::test]
async fn embedded_task_ending_shows_even_when_its_caller_stopped_waiting() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = EmbeddedStore::open(&dir.path().join("leases.redb")).expect("open");
    let now = OffsetDateTime::now_utc();
    let t = task("spiffe://c.test/agent/a", None, now);
    store.create_task(&t).await.expect("task");
    assert_eq!(state_of(&store, &t.id).await, TaskState::Active);
    // Polled once (the write is queued), then dropped before the commit answers.
    let mut ending = Box::pin(store.end_task(&t.id, TaskState::Revoked, "test", now));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(ending.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the ending answered before its commit");
    drop(ending);
    // The listing reads the file itself: wait for the commit to land there.
    let query = TaskQuery {
        principal: None,
        state: Some(TaskState::Revoked),
        after: None,
        limit: 10,
        now: None,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.tasks(&query).await.expect("list").items.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the ending never committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(state_of(&store, &t.id).await, TaskState::Revoked);
}

/// The decoded tasks are bounded, and reads past the bound stay right.
#[tokio::test]
async fn embedded_task_cache_is_bounded() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("leases.redb")).expect("open"));
    let now = OffsetDateTime::now_utc();
    let tasks: Vec<_> = (0..4_200)
        .map(|_| task("spiffe://c.test/agent/a", None, now))
        .collect();
    for chunk in tasks.chunks(600) {
        let writes = chunk.iter().map(|t| {
            let (store, t) = (store.clone(), t.clone());
            async move { store.create_task(&t).await }
        });
        for r in futures_util::future::join_all(writes).await {
            r.expect("task");
        }
    }
    for t in &tasks {
        assert_eq!(store.task(&t.id).await.expect("read").as_ref(), Some(t));
        assert!(
            store.cached_tasks() <= 4_096,
            "{} kept",
            store.cached_tasks()
        );
    }
    assert!(store.cached_tasks() > 0);
    // A task not found is not kept.
    let before = store.cached_tasks();
    assert_eq!(store.task(&TaskId::generate()).await.expect("read"), None);
    assert_eq!(store.cached_tasks(), before);
}
