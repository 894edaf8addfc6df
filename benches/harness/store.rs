//! Lease-store measurements in process: reaper throughput with 100k leases due at once,
//! and filling a store with many live leases (for minting p99 at 1M stored leases).

#[path = "../../tests/common/redis_bin.rs"]
mod redis_bin;

use mayfly::audit::AuditLog;
use mayfly::identity::Principal;
use mayfly::lease::embedded::EmbeddedStore;
use mayfly::lease::redis::{Durability, RedisConfig, RedisStore};
use mayfly::lease::{Lease, LeaseState, LeaseStore};
use mayfly::provider::Providers;
use mayfly::provider::jwt::{JwtIssuer, JwtProvider, SigningAlg, SigningKey};
use mayfly::revocation::{ReaperConfig, RetryPolicy, Revoker};
use mayfly::task::{Grant, ProviderKind, TaskId};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

fn lease(task: &TaskId, now: OffsetDateTime, ttl: time::Duration) -> Lease {
    let grant = Grant {
        provider: ProviderKind::Jwt,
        target: "https://api.example.com".into(),
        actions: ["read".to_string()].into(),
        resources: Default::default(),
    };
    let who = Principal::parse("spiffe://dev.mayfly.local/agent/filler").expect("principal");
    Lease::pending(task, &who, &grant, now, now + ttl)
}

/// One lease as the broker writes a Mayfly-signed JWT's: once, already active, due at
/// its expiry; under a random (UUIDv4) id, as lease ids were before they became
/// time-ordered, when `random_id`.
pub async fn write_lease(
    store: &dyn LeaseStore,
    task: &TaskId,
    ttl: time::Duration,
    random_id: bool,
) {
    let now = OffsetDateTime::now_utc();
    let mut l = lease(task, now, ttl);
    l.state = LeaseState::Active;
    if random_id {
        l.id = format!("lse_{}", uuid::Uuid::new_v4().simple())
            .parse()
            .expect("id");
    }
    store.put_new(&l, l.expires_at).await.expect("lease");
}

/// Writes `n` active leases living `ttl` with `writers` concurrent writers (large groups
/// per commit); returns leases written per second.
pub async fn fill(
    store: Arc<dyn LeaseStore>,
    n: usize,
    ttl: time::Duration,
    writers: usize,
) -> f64 {
    fill_with(store, n, ttl, writers, false).await
}

/// `fill`, under random (UUIDv4) lease ids when `random_ids`.
pub async fn fill_with(
    store: Arc<dyn LeaseStore>,
    n: usize,
    ttl: time::Duration,
    writers: usize,
    random_ids: bool,
) -> f64 {
    let task = TaskId::generate();
    let left = Arc::new(AtomicUsize::new(n));
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..writers {
        let (store, task, left) = (store.clone(), task.clone(), left.clone());
        handles.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok()
            {
                write_lease(store.as_ref(), &task, ttl, random_ids).await;
            }
        }));
    }
    for h in handles {
        h.await.expect("join");
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Fills `due` leases expiring in 2 s, then reaps them as one replica would; reaped/s.
pub async fn reaper_rate(store: Arc<dyn LeaseStore>, dir: &Path, due: usize) -> f64 {
    fill(store.clone(), due, time::Duration::seconds(2), 400).await;
    let audit = AuditLog::open(
        &dir.join(format!("reaper-audit-{}.jsonl", TaskId::generate())),
        "bench",
    )
    .expect("audit");
    let (key, _) = SigningKey::generate(SigningAlg::ES256).expect("key");
    let mut providers = Providers::default();
    providers.insert(Arc::new(JwtProvider::new(Arc::new(JwtIssuer::new(
        "https://bench".into(),
        key,
    )))));
    let revoker = Revoker::new(
        store.clone(),
        providers,
        audit,
        ReaperConfig {
            interval: Duration::from_millis(100),
            batch: 1000,
            claim_hold: Duration::from_secs(30),
            retry: RetryPolicy {
                max_attempts: 3,
                base: Duration::from_secs(1),
                max: Duration::from_secs(10),
            },
        },
    );
    let later = OffsetDateTime::now_utc() + time::Duration::seconds(5);
    let t0 = Instant::now();
    let mut expired = 0;
    loop {
        let s = revoker.reap_once(later).await.expect("reap");
        expired += s.expired;
        if s.claimed == 0 {
            break;
        }
    }
    assert_eq!(expired, due, "every due lease expired once");
    expired as f64 / t0.elapsed().as_secs_f64()
}

pub fn embedded(path: &Path) -> Arc<dyn LeaseStore> {
    Arc::new(EmbeddedStore::open(path).expect("redb"))
}

pub async fn redis(port: u16, prefix: &str) -> Arc<dyn LeaseStore> {
    redis_with(port, prefix, Durability::Server).await
}

pub async fn redis_with(port: u16, prefix: &str, durability: Durability) -> Arc<dyn LeaseStore> {
    Arc::new(
        RedisStore::connect(&RedisConfig {
            url: format!("redis://127.0.0.1:{port}"),
            key_prefix: prefix.into(),
            username: None,
            password_file: None,
            tls_ca_file: None,
            durability,
            op_timeout: Duration::from_secs(30),
        })
        .await
        .expect("connect"),
    )
}

/// A loopback `redis-server`, killed on drop.
pub struct RedisServer(pub std::process::Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `redis-server` on `port` with its data in `dir`, no RDB snapshots, plus
/// `extra` flags; returns once it accepts connections.
pub fn redis_server(port: u16, dir: &Path, extra: &[&str]) -> RedisServer {
    let server = RedisServer(
        redis_bin::redis_command(port, dir)
            .args(extra)
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)"),
    );
    assert!(
        redis_bin::wait_for_pong(port),
        "redis-server did not start on {port}"
    );
    server
}
