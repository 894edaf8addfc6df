//! Lease-store benchmark: lease-write throughput and latency (one active-lease write, as
//! the broker records a Mayfly-signed JWT) and reaper throughput with 100k leases due at once.
//! Embedded (redb) is the baseline; Redis is measured against it in the same run.
//!
//! `make bench-store` (or `cargo bench --bench store`). Needs `redis-server` on PATH.
#![allow(
    clippy::expect_used,
    reason = "a benchmark aborts on any failure, loudly"
)]

// The harness's lease-store helpers: one way to write a lease and to time the reaper.
#[path = "../tests/common/loopback.rs"]
mod loopback;
#[allow(
    dead_code,
    reason = "this bench uses only part of the harness's helpers"
)]
#[path = "harness/store.rs"]
mod shared;

use loopback::free_port;

use mayfly::lease::LeaseStore;
use mayfly::lease::embedded::EmbeddedStore;
use mayfly::lease::redis::Durability;
use mayfly::task::TaskId;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONCURRENCY: usize = 50;
const WRITE_SECONDS: u64 = 5;
const DUE: usize = 100_000;

struct WriteResult {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn lease_writes(store: Arc<dyn LeaseStore>) -> WriteResult {
    let task = TaskId::generate();
    let deadline = Instant::now() + Duration::from_secs(WRITE_SECONDS);
    let mut handles = Vec::new();
    for _ in 0..CONCURRENCY {
        let (store, task) = (store.clone(), task.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                shared::write_lease(store.as_ref(), &task, time::Duration::hours(1), false).await;
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("join"));
    }
    all.sort();
    let q = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    WriteResult {
        per_sec: all.len() as f64 / WRITE_SECONDS as f64,
        p50: q(0.50),
        p99: q(0.99),
    }
}

#[tokio::main]
async fn main() {
    mayfly::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    println!(
        "lease writes: {CONCURRENCY} concurrent writers, {WRITE_SECONDS}s each; reaper: {DUE} leases due at once\n"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>14}",
        "store", "writes/s", "p50", "p99", "reaped/s"
    );

    let embedded: Arc<dyn LeaseStore> =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb")).expect("redb"));
    let base = lease_writes(embedded.clone()).await;
    let base_reap = shared::reaper_rate(embedded, dir.path(), DUE).await;
    let row = |name: &str, w: &WriteResult, r: f64| {
        println!(
            "{name:<34} {:>10.0} {:>10.2?} {:>10.2?} {:>14.0}   (x{:.2} writes, x{:.2} reaping vs embedded)",
            w.per_sec,
            w.p50,
            w.p99,
            r,
            w.per_sec / base.per_sec,
            r / base_reap
        );
    };
    row("embedded (redb, fsync per commit)", &base, base_reap);

    let p1 = free_port();
    let _r1 = shared::redis_server(p1, dir.path(), &["--appendonly", "no"]);
    let s1 = shared::redis(p1, "bench").await;
    let w1 = lease_writes(s1.clone()).await;
    let r1 = shared::reaper_rate(s1, dir.path(), DUE).await;
    row("redis (no persistence)", &w1, r1);

    let p2 = free_port();
    let aof_dir = dir.path().join("aof");
    std::fs::create_dir_all(&aof_dir).expect("dir");
    let _r2 = shared::redis_server(
        p2,
        &aof_dir,
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let s2 = shared::redis(p2, "bench").await;
    let w2 = lease_writes(s2).await;
    let only_writes = |name: &str, w: &WriteResult| {
        println!(
            "{name:<34} {:>10.0} {:>10.2?} {:>10.2?} {:>14}   (x{:.2} writes vs embedded)",
            w.per_sec,
            w.p50,
            w.p99,
            "-",
            w.per_sec / base.per_sec
        );
    };
    only_writes("redis (AOF appendfsync always)", &w2);

    // WAIT 1: a master and one replica; each write acknowledged by the replica.
    let (pm, pr) = (free_port(), free_port());
    let (md, rd) = (dir.path().join("m"), dir.path().join("r"));
    std::fs::create_dir_all(&md).expect("dir");
    std::fs::create_dir_all(&rd).expect("dir");
    let _m = shared::redis_server(
        pm,
        &md,
        &["--repl-diskless-sync-delay", "0", "--appendonly", "no"],
    );
    let pm_s = pm.to_string();
    let _r = shared::redis_server(
        pr,
        &rd,
        &["--replicaof", "127.0.0.1", &pm_s, "--appendonly", "no"],
    );
    // Full sync of an empty master takes well under a second without the diskless delay.
    std::thread::sleep(Duration::from_secs(2));
    let wait = Durability::Wait {
        replicas: 1,
        timeout: Duration::from_secs(1),
    };
    let s3 = shared::redis_with(pm, "bench", wait).await;
    let w3 = lease_writes(s3).await;
    only_writes("redis (WAIT 1 replica)", &w3);
}
