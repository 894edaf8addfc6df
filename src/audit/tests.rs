use super::*;
use sha2::{Digest, Sha256};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use time::OffsetDateTime;

async fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "test").expect("open");
    for i in 0..n {
        let mut e = AuditEvent::new("request");
        e.detail = Some(format!("event {i}"));
        log.write(e).await.expect("write");
    }
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write");
}

#[tokio::test]
async fn an_untouched_log_verifies() {
    let (_d, path) = log_with(5).await;
    assert_eq!(verify_file(&path), Ok(5));
}

#[tokio::test]
async fn a_changed_line_is_named() {
    let (_d, path) = log_with(5).await;
    let mut l = lines(&path);
    l[2] = l[2].replace("event 2", "event X");
    write_lines(&path, &l);
    assert!(matches!(
        verify_file(&path),
        Err(ChainError::Broken { line: 3, .. })
    ));
}

#[tokio::test]
async fn a_deleted_line_is_detected_where_the_gap_is() {
    let (_d, path) = log_with(5).await;
    let mut l = lines(&path);
    l.remove(1);
    write_lines(&path, &l);
    assert!(matches!(
        verify_file(&path),
        Err(ChainError::Broken { line: 2, .. })
    ));
}

#[tokio::test]
async fn swapped_lines_are_detected() {
    let (_d, path) = log_with(5).await;
    let mut l = lines(&path);
    l.swap(3, 4);
    write_lines(&path, &l);
    assert!(matches!(
        verify_file(&path),
        Err(ChainError::Broken { line: 4, .. })
    ));
}

#[tokio::test]
async fn removing_the_head_is_detected() {
    let (_d, path) = log_with(3).await;
    let l = lines(&path);
    write_lines(&path, &l[1..]);
    assert!(matches!(
        verify_file(&path),
        Err(ChainError::Broken { line: 1, .. })
    ));
}

#[tokio::test]
async fn reopening_continues_the_chain_and_drops_a_torn_tail() {
    let (_d, path) = log_with(3).await;
    let mut f = OpenOptions::new().append(true).open(&path).expect("open");
    f.write_all(b"{\"kind\":\"torn").expect("append");
    drop(f);
    let log = AuditLog::open(&path, "test").expect("reopen");
    log.write(AuditEvent::new("request")).await.expect("write");
    assert_eq!(verify_file(&path), Ok(4));
}

#[tokio::test]
async fn a_failing_sink_fails_the_write() {
    // /dev/full accepts the open and fails every write with ENOSPC: a real fault.
    let log = AuditLog::open(Path::new("/dev/full"), "test").expect("open");
    let err = log.write(AuditEvent::new("request")).await;
    assert!(matches!(err, Err(AuditError::Write(_))));
}

fn anchor_of(log: &AuditLog) -> crate::lease::AuditAnchor {
    let head = log.head();
    crate::lease::AuditAnchor {
        node: log.node().to_string(),
        seq: head.seq,
        hash: head.hash,
        at: OffsetDateTime::now_utc(),
    }
}

async fn write_n(log: &AuditLog, n: usize, tag: &str) {
    for i in 0..n {
        let mut e = AuditEvent::new("request");
        e.detail = Some(format!("{tag} {i} {}", "p".repeat(100)));
        log.write(e).await.expect("write");
    }
}

#[tokio::test]
async fn a_rotated_log_continues_its_chain_across_files_and_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let rotation = Rotation {
        rotate_bytes: 2000,
        retain_files: 0,
    };
    let log = AuditLog::open_rotating(&path, "n1", None, rotation).expect("open");
    write_n(&log, 40, "first").await;
    let rotated = rotated_files(&path).expect("list");
    assert!(rotated.len() >= 3, "rotated {} times", rotated.len());
    let set = log_set(&path).expect("set");
    let v = verify_set(&set, &[]).expect("one chain");
    assert_eq!(v.head, log.head());
    assert_eq!(v.first_seq, 1);
    // Every file after the first opens with the record that continues the chain.
    let first_line = lines(&set[1]).remove(0);
    assert!(
        first_line.contains(r#""kind":"audit.rotated""#),
        "{first_line}"
    );
    drop(log);

    // A restart (same directory) continues the same chain.
    let log = AuditLog::open_rotating(&path, "n1", None, rotation).expect("reopen");
    write_n(&log, 5, "second").await;
    let v = verify_set(&log_set(&path).expect("set"), &[anchor_of(&log)]).expect("verify");
    assert_eq!(v.anchored, vec!["n1".to_string()]);
    assert_eq!(v.records, v.head.seq);

    // A rotated file removed from the middle breaks the chain at the next file.
    let set = log_set(&path).expect("set");
    std::fs::remove_file(&set[1]).expect("rm");
    let rest = log_set(&path).expect("set");
    assert!(matches!(
        verify_set(&rest, &[]),
        Err(ChainError::Broken { line: 1, .. })
    ));
}

#[tokio::test]
async fn retention_keeps_the_newest_rotated_files_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let rotation = Rotation {
        rotate_bytes: 2000,
        retain_files: 2,
    };
    let log = AuditLog::open_rotating(&path, "n1", None, rotation).expect("open");
    write_n(&log, 60, "r").await;
    let rotated = rotated_files(&path).expect("list");
    assert_eq!(rotated.len(), 2);
    assert!(rotated[0].0 > 1, "the oldest were removed");
    let v = verify_set(&log_set(&path).expect("set"), &[]).expect("verifies");
    assert!(v.first_seq > 1);
    assert_eq!(v.head, log.head());
}

#[tokio::test]
async fn anchors_detect_a_truncated_or_rewritten_tail() {
    let (_d, path) = log_with(10).await;
    let log = AuditLog::open(&path, "test").expect("reopen");
    log.write(AuditEvent::new("request")).await.expect("write");
    let anchor = anchor_of(&log);
    drop(log);
    let all = lines(&path);
    assert!(verify_set(std::slice::from_ref(&path), std::slice::from_ref(&anchor)).is_ok());

    // The last three records cut off: the chain alone still verifies...
    write_lines(&path, &all[..all.len() - 3]);
    assert!(verify_file(&path).is_ok());
    // ...the anchor does not.
    assert!(matches!(
        verify_set(std::slice::from_ref(&path), std::slice::from_ref(&anchor)),
        Err(ChainError::Truncated {
            anchored: 11,
            last: 8,
            ..
        })
    ));

    // The tail rewritten and re-chained by someone who can write the file.
    write_lines(&path, &all[..all.len() - 1]);
    let log = AuditLog::open(&path, "test").expect("reopen");
    let mut forged = AuditEvent::new("request");
    forged.detail = Some("nothing to see".into());
    log.write(forged).await.expect("write");
    drop(log);
    assert!(verify_file(&path).is_ok());
    assert!(matches!(
        verify_set(std::slice::from_ref(&path), std::slice::from_ref(&anchor)),
        Err(ChainError::Rewritten { seq: 11, .. })
    ));

    // An anchor of a node that never wrote here is no anchor for this log.
    let mut other = anchor.clone();
    other.node = "elsewhere".into();
    assert!(matches!(
        verify_set(std::slice::from_ref(&path), &[other]),
        Err(ChainError::NoAnchor(_))
    ));
}

#[tokio::test]
async fn long_attacker_strings_are_capped_and_hashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "test").expect("open");
    let junk = format!("identity: unknown issuer {}", "é".repeat(5000));
    let mut e = AuditEvent::new("request");
    e.detail = Some(junk.clone());
    log.write(e).await.expect("write");
    let line = lines(&path).remove(0);
    assert!(line.len() < 1400, "record is {} bytes", line.len());
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    let detail = v["detail"].as_str().expect("detail");
    let digest = hex::encode(Sha256::digest(junk.as_bytes()));
    assert!(detail.starts_with("identity: unknown issuer é"));
    assert!(
        detail.ends_with(&format!("…[{} bytes, sha256:{digest}]", junk.len())),
        "{detail}"
    );
    assert_eq!(verify_file(&path), Ok(1));
}

#[test]
fn repeated_refusals_are_counted_and_the_first_is_written() {
    let r = Refusals::new();
    assert!(r.observe("192.0.2.1", "token_unknown_issuer", Some("/v1/tasks")));
    for _ in 0..99 {
        assert!(!r.observe("192.0.2.1", "token_unknown_issuer", Some("/v1/tasks")));
    }
    assert!(r.observe("192.0.2.2", "token_unknown_issuer", None));
    let summaries = r.drain();
    assert_eq!(summaries.len(), 1, "only pairs with uncounted refusals");
    assert_eq!(summaries[0].count, Some(99));
    assert_eq!(summaries[0].source.as_deref(), Some("192.0.2.1"));
    assert_eq!(summaries[0].code, Some("token_unknown_issuer"));
    assert_eq!(summaries[0].kind, SUMMARY_KIND);
    // A new interval starts afresh.
    assert!(r.observe("192.0.2.1", "token_unknown_issuer", None));
    assert!(r.drain().is_empty());
}

#[cfg(unix)]
#[tokio::test]
async fn audit_files_are_owner_only_even_if_they_existed_wider() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "").expect("create");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let log = AuditLog::open_rotating(
        &path,
        "test",
        None,
        Rotation {
            rotate_bytes: 500,
            retain_files: 0,
        },
    )
    .expect("open");
    write_n(&log, 5, "m").await;
    for f in log_set(&path).expect("set") {
        let mode = std::fs::metadata(&f).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
}

/// The direct rendering (serialise once, append `ts` and `node`) and the capped one
/// (through a JSON value) give the same bytes for a record with every kind of field,
/// escapes included; a string over the cap is capped whichever way it is rendered.
#[test]
fn direct_and_capped_rendering_agree() {
    use super::log::{render_body_at, render_body_capped};
    let mut e = AuditEvent::new("request");
    e.request_id = Some("req-1".into());
    e.principal = Some("spiffe://dev.mayfly.local/agent/\"quoted\"\\slash\u{1}ctl é".into());
    e.action = Some(crate::action::Action::MintCredential);
    e.decision = Some("allow");
    e.policies = vec!["dev-mint-jwt".into(), "second".into()];
    e.status = Some(201);
    e.provider = Some("jwt");
    e.actions = Some(vec!["read".into(), "write".into()]);
    e.risk = Some(40);
    e.detail = Some("x".repeat(MAX_FIELD_BYTES));
    let ts = "2026-11-30T00:00:00Z";
    let direct = render_body_at(&e, "node-a", ts).expect("direct");
    assert_eq!(
        direct,
        render_body_capped(&e, "node-a", ts).expect("capped")
    );
    let v: serde_json::Value = serde_json::from_slice(&direct).expect("json");
    assert_eq!(v["ts"], ts);
    assert_eq!(v["node"], "node-a");

    // One byte over the cap, or a string that only escaping makes long: capped (or
    // kept) exactly as the value path does.
    for long in [
        "y".repeat(MAX_FIELD_BYTES + 1),
        "\"".repeat(MAX_FIELD_BYTES / 2 + 1),
    ] {
        e.detail = Some(long.clone());
        let body = render_body_at(&e, "node-a", ts).expect("render");
        assert_eq!(body, render_body_capped(&e, "node-a", ts).expect("capped"));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let kept = v["detail"].as_str().expect("detail");
        assert_eq!(kept == long, long.len() <= MAX_FIELD_BYTES, "{kept}");
    }
}
