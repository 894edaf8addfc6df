#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The audit journal of the embedded store (docs/audit-log.md): a lease and its audit
//! record are one commit; the file is fed from the journal in order, across restarts,
//! without duplicates, and refuses to open over a gap.

mod common;

use mayfly::audit::{AuditEvent, AuditLog, Rotation, verify_file, verify_set};
use mayfly::identity::OnceKey;
use mayfly::lease::embedded::EmbeddedStore;
use mayfly::lease::{AuditJournal, Joined, LeaseStore, NewLease};
use mayfly::task::{Task, TaskState};
use std::path::Path;
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

fn new_lease(task: &Task, now: OffsetDateTime, once: Option<&str>) -> NewLease {
    let mut lease = common::lease(task, now, Duration::minutes(5));
    lease
        .activate("fp".into(), None)
        .expect("a pending lease activates");
    NewLease {
        due_at: lease.expires_at,
        lease,
        once: once.map(|k| OnceKey {
            key: k.into(),
            until: now + Duration::minutes(5),
        }),
    }
}

fn event(i: usize) -> AuditEvent {
    let mut e = AuditEvent::new("request");
    e.detail = Some(format!("event {i}"));
    e
}

/// `n` records written, and the file caught up with them.
async fn write_flushed(log: &AuditLog, n: usize) {
    for i in 0..n {
        log.write(event(i)).await.expect("write");
    }
    log.flush().await.expect("flush");
}

fn journaled(dir: &Path, rotation: Rotation) -> (Arc<EmbeddedStore>, AuditLog) {
    let store = Arc::new(EmbeddedStore::open(&dir.join("store.redb")).expect("store"));
    let log = AuditLog::open_journaled(
        &dir.join("audit.jsonl"),
        "n1",
        None,
        rotation,
        store.clone(),
    )
    .expect("journaled log");
    (store, log)
}

fn seqs(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect()
}

#[tokio::test]
async fn concurrent_records_reach_the_file_in_order_and_the_chain_verifies() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_store, log) = journaled(dir.path(), Rotation::default());
    assert!(log.joins_leases());
    let writes: Vec<_> = (0..200)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.write(event(i)).await })
        })
        .collect();
    for w in writes {
        w.await.expect("join").expect("write");
    }
    log.flush().await.expect("flush");
    let path = dir.path().join("audit.jsonl");
    assert_eq!(verify_file(&path), Ok(200));
    assert_eq!(seqs(&path), (1..=200).collect::<Vec<_>>());
    assert_eq!(log.head().seq, 200);
}

#[tokio::test]
async fn a_lease_and_its_record_are_one_write_and_a_refused_one_writes_neither() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, log) = journaled(dir.path(), Rotation::default());
    let now = OffsetDateTime::now_utc();
    let t = common::task("spiffe://example.org/agent", None, now);
    store.create_task(&t).await.expect("task");

    let first = new_lease(&t, now, Some("jti-1"));
    let id = first.lease.id.clone();
    let mut ev = event(0);
    ev.lease_id = Some(id.to_string());
    assert_eq!(
        log.write_with_lease(ev, first).await.expect("write"),
        Joined::Written
    );
    assert!(store.lease(&id).await.expect("read").is_some());

    // The same single-use key again: refused, and neither lease nor record written.
    let replay = new_lease(&t, now, Some("jti-1"));
    let replay_id = replay.lease.id.clone();
    assert_eq!(
        log.write_with_lease(event(1), replay).await.expect("write"),
        Joined::Replayed
    );
    assert!(store.lease(&replay_id).await.expect("read").is_none());

    // The task ends: a lease staged before is refused at commit.
    store
        .end_task(&t.id, TaskState::Completed, "done", now)
        .await
        .expect("end");
    let late = new_lease(&t, now, None);
    let late_id = late.lease.id.clone();
    assert_eq!(
        log.write_with_lease(event(2), late).await.expect("write"),
        Joined::TaskEnded(TaskState::Completed)
    );
    assert!(store.lease(&late_id).await.expect("read").is_none());

    log.flush().await.expect("flush");
    let path = dir.path().join("audit.jsonl");
    assert_eq!(
        verify_file(&path),
        Ok(1),
        "only the written lease has a record"
    );
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains(id.as_str()));
}

#[tokio::test]
async fn records_committed_before_a_crash_reach_the_file_after_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("audit.jsonl");
    {
        // The broker died after these commits, before its pump wrote a line.
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("store");
        assert_eq!(store.attach(0).expect("attach"), 0);
        for i in 0..7 {
            let body = format!(r#"{{"detail":"event {i}","kind":"request","node":"n1","ts":"t"}}"#);
            store
                .append("request", body.into_bytes(), None)
                .await
                .expect("append");
        }
    }
    let (_store, log) = journaled(dir.path(), Rotation::default());
    log.flush().await.expect("flush");
    assert_eq!(verify_file(&path), Ok(7));
    log.write(event(7)).await.expect("write");
    log.flush().await.expect("flush");
    assert_eq!(seqs(&path), (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn records_already_in_the_file_are_not_written_twice_after_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("audit.jsonl");
    {
        let (_store, log) = journaled(dir.path(), Rotation::default());
        write_flushed(&log, 5).await;
        // Stopped before a later write trimmed the journal: it still holds 1..=5.
    }
    let (_store, log) = journaled(dir.path(), Rotation::default());
    log.write(event(5)).await.expect("write");
    log.flush().await.expect("flush");
    assert_eq!(seqs(&path), (1..=6).collect::<Vec<_>>());
    assert_eq!(verify_file(&path), Ok(6));
}

#[tokio::test]
async fn a_journal_that_skips_records_the_file_lacks_refuses_to_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("audit.jsonl");
    {
        let (_store, log) = journaled(dir.path(), Rotation::default());
        write_flushed(&log, 3).await;
    }
    {
        // Records 4 and 5 committed, then the writes trimmed 1..=3; then the file is lost.
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("store");
        store.attach(3).expect("attach");
        store.trim_through(3);
        for _ in 0..2 {
            let body = br#"{"kind":"request","node":"n1","ts":"t"}"#.to_vec();
            store.append("request", body, None).await.expect("append");
        }
    }
    std::fs::remove_file(&path).expect("rm");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).expect("store"));
    let err = AuditLog::open_journaled(&path, "n1", None, Rotation::default(), store)
        .expect_err("a gap must not be papered over");
    assert!(err.to_string().contains("records 1 to 3"), "{err}");
}

#[tokio::test]
async fn a_rotating_journaled_log_verifies_as_one_chain() {
    let dir = tempfile::tempdir().expect("tmp");
    let rotation = Rotation {
        rotate_bytes: 4 * 1024,
        retain_files: 0,
    };
    let (_store, log) = journaled(dir.path(), rotation);
    let path = dir.path().join("audit.jsonl");
    // A rotation record joins the chain with the next write after the file is full:
    // write until two rotations are in.
    let mut files = Vec::new();
    for i in 0..4000 {
        log.write(event(i)).await.expect("write");
        if i % 20 == 19 {
            log.flush().await.expect("flush");
            files = mayfly::audit::log_set(&path).expect("set");
            if files.len() > 2 {
                break;
            }
        }
    }
    assert!(files.len() > 2, "rotated twice: {files:?}");
    let verified = verify_set(&files, &[]).expect("the set verifies as one chain");
    let records: usize = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read").lines().count())
        .sum();
    assert_eq!(records as u64, log.head().seq);
    assert_eq!(verified.records, records as u64);
    let rotations = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .expect("read")
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|l| l.contains(r#""kind":"audit.rotated""#))
        .count();
    assert_eq!(
        rotations,
        files.len() - 1,
        "each later file starts with its rotation record, in the chain"
    );
}

#[tokio::test]
async fn a_lost_audit_file_over_an_empty_journal_starts_a_new_chain_that_is_fed() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("audit.jsonl");
    {
        let (store, log) = journaled(dir.path(), Rotation::default());
        write_flushed(&log, 5).await;
        // Any later write trims what the file holds: the journal is empty.
        let now = OffsetDateTime::now_utc();
        store
            .create_task(&common::task("spiffe://example.org/agent", None, now))
            .await
            .expect("task");
        assert!(store.read_after(0, 10).expect("read").is_empty());
    }
    std::fs::remove_file(&path).expect("rm");
    let (_store, log) = journaled(dir.path(), Rotation::default());
    for i in 0..3 {
        log.write(event(i)).await.expect("a new chain is accepted");
    }
    log.flush().await.expect("flush");
    assert_eq!(seqs(&path), vec![1, 2, 3]);
    assert_eq!(verify_file(&path), Ok(3));
}

#[tokio::test]
async fn while_the_file_cannot_be_fed_new_records_are_refused_and_shutdown_still_returns() {
    let dir = tempfile::tempdir().expect("tmp");
    let rotation = Rotation {
        rotate_bytes: 1024,
        retain_files: 0,
    };
    let (store, log) = journaled(dir.path(), rotation);
    // Taken after the log opened: the pump's first rotation fails (a real fault on its
    // write path).
    std::fs::create_dir(dir.path().join("audit.jsonl.000001")).expect("dir");
    let mut refused = None;
    for i in 0..2000 {
        match log.write(event(i)).await {
            Ok(()) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("the log fails closed once its file cannot be fed");
    assert!(err.to_string().contains("cannot be written"), "{err}");
    let committed = store.read_after(0, 10_000).expect("read").len();
    assert!(
        committed > 0,
        "records already committed stay in the journal"
    );
    // Dropping the last handle stops the pump even though it is still failing.
    let stopped = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::task::spawn_blocking(move || drop(log)),
    )
    .await;
    assert!(stopped.is_ok(), "shutdown hung on a failing pump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_100_000_records_behind_its_journal_refuses_new_records_until_it_catches_up() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().expect("tmp");
    let (_store, log) = journaled(dir.path(), Rotation::default());
    let path = dir.path().join("audit.jsonl");
    let max = mayfly::audit::MAX_JOURNAL_BACKLOG;
    // A stalled disk: the file is not fed while the journal keeps committing.
    log.hold_feeding(true);
    let journaled = futures_util::stream::iter(0..max)
        .map(|i| {
            let log = log.clone();
            async move { log.write(event(i as usize)).await }
        })
        .buffer_unordered(512)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    assert_eq!(
        journaled as u64, max,
        "records under the bound are journaled"
    );
    assert!(seqs(&path).is_empty(), "the file was not fed while held");
    let err = log
        .write(event(0))
        .await
        .expect_err("past the bound a new record is refused");
    assert!(
        err.to_string().contains(&format!(
            "the audit file is {max} records behind its journal"
        )),
        "{err}"
    );
    // The disk comes back: the file catches up, in order, and records are taken again.
    log.hold_feeding(false);
    log.flush().await.expect("the file catches up");
    log.write(event(0))
        .await
        .expect("taken again once the file caught up");
    log.flush().await.expect("flush");
    assert_eq!(verify_file(&path).expect("the file verifies"), max + 1);
    assert_eq!(seqs(&path), (1..=max + 1).collect::<Vec<_>>());
}
