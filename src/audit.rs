//! The audit trail: JSON lines, one record per request (decision, mint, revocation) and
//! one per background revocation, each chained to the previous record by SHA-256.
//!
//! Record layout (see `docs/audit-log.md`): the event fields plus `seq`, `ts`, `node`,
//! `prev` (the previous record's `hash`, 64 zeros for the first) and, always last,
//! `hash` = SHA-256 of the line's bytes up to `,"hash":…` closed with `}`. Verification is
//! textual, so it never depends on how a JSON library orders keys.
//!
//! Writes are group-committed: a writer thread takes every record queued, appends them in
//! one `write`, `fdatasync`s once and then acknowledges each caller. A request that needs
//! its record (every credential) waits for that acknowledgement; if the write fails the
//! caller gets an error and the file is truncated back to the last good record.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_SUFFIX_LEN: usize = r#","hash":""#.len() + 64 + 2;
const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("audit record could not be written: {0}")]
    Write(String),
    #[error("audit writer has stopped")]
    Stopped,
}

/// The fields of one audit event. Absent fields are omitted from the record.
/// Never put a secret here: credentials appear only as `credential_fingerprint`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvent {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<crate::action::Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Anomaly rule that fired (`anomaly.triggered`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What would take back this request's state changes; never written to the record.
    #[serde(skip)]
    pub undo: Vec<crate::action::Undo>,
    /// A credential under a delegated task: the RFC 8693 `sub` of the delegation (its
    /// root principal) and `act` (the current holder, earlier holders nested deeper), as
    /// the token and introspection carry them. `principal` stays the caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<serde_json::Value>,
}

impl AuditEvent {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            ..Default::default()
        }
    }
}

/// The event of the request being served: the API layer opens it, the broker adds
/// fields, and the API layer writes it once the response is known.
#[derive(Debug, Clone)]
pub struct AuditScope(Arc<Mutex<AuditEvent>>);

impl AuditScope {
    pub fn new(event: AuditEvent) -> Self {
        Self(Arc::new(Mutex::new(event)))
    }
    pub fn set(&self, f: impl FnOnce(&mut AuditEvent)) {
        // A poisoned lock only means another thread panicked mid-update; the event is
        // still the best record we have.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }
    /// Registers what takes back a state change this request just made (see
    /// `Broker::commit`).
    pub fn undo_with(&self, undo: crate::action::Undo) {
        self.set(|e| e.undo.push(undo));
    }
    pub fn snapshot(&self) -> AuditEvent {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Job {
    event: AuditEvent,
    ack: oneshot::Sender<Result<(), AuditError>>,
}

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

struct Head {
    seq: u64,
    hash: String,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, continuing its chain, and starts the writer.
    pub fn open(path: &Path, node: &str) -> Result<Self, AuditError> {
        Self::open_with_tap(path, node, None)
    }

    /// `open`, forwarding each durable record of the kinds the webhook wants to it.
    pub fn open_with_tap(
        path: &Path,
        node: &str,
        tap: Option<crate::webhook::Webhook>,
    ) -> Result<Self, AuditError> {
        let open_err = |reason: String| AuditError::Open {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| open_err(e.to_string()))?;
        let head = recover_head(&mut file).map_err(open_err)?;
        let (tx, rx) = mpsc::channel(8192);
        let node = node.to_string();
        std::thread::Builder::new()
            .name("mayfly-audit".into())
            .spawn(move || writer(file, head, node, rx, tap))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            tx,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` and returns once it is durable on disk.
    pub async fn write(&self, event: AuditEvent) -> Result<(), AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Job { event, ack })
            .await
            .map_err(|_| AuditError::Stopped)?;
        done.await.map_err(|_| AuditError::Stopped)?
    }
}

/// Finds the last complete record to continue the chain; drops a torn final line (a
/// record that was being written when the process died was never acknowledged).
fn recover_head(file: &mut File) -> Result<Head, String> {
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(Head {
            seq: 0,
            hash: GENESIS.to_string(),
        });
    }
    let len = meta.len();
    let start = len.saturating_sub(256 * 1024);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(|e| e.to_string())?;
    let complete = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if start == 0 => 0,
        None => return Err("last audit record is longer than 256 KiB".into()),
    };
    if complete < tail.len() {
        tracing::warn!(
            dropped = tail.len() - complete,
            "audit log ends with a torn record; truncating it"
        );
        file.set_len(start + complete as u64)
            .map_err(|e| e.to_string())?;
    }
    let body = &tail[..complete];
    let last = body
        .strip_suffix(b"\n")
        .and_then(|b| b.rsplit(|c| *c == b'\n').next())
        .filter(|l| !l.is_empty());
    let Some(last) = last else {
        return Ok(Head {
            seq: 0,
            hash: GENESIS.to_string(),
        });
    };
    let line = std::str::from_utf8(last).map_err(|e| e.to_string())?;
    let rec = check_record(line).map_err(|e| format!("last audit record is invalid: {e}"))?;
    Ok(Head {
        seq: rec.seq,
        hash: rec.hash,
    })
}

fn render(event: &AuditEvent, head: &mut Head, node: &str) -> Result<Vec<u8>, String> {
    let mut value = serde_json::to_value(event).map_err(|e| e.to_string())?;
    let map = value
        .as_object_mut()
        .ok_or_else(|| "audit event is not an object".to_string())?;
    let seq = head.seq + 1;
    let ts = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .map_err(|e| e.to_string())?;
    map.insert("seq".into(), seq.into());
    map.insert("ts".into(), ts.into());
    map.insert("node".into(), node.into());
    map.insert("prev".into(), head.hash.clone().into());
    let body = serde_json::to_string(&value).map_err(|e| e.to_string())?;
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    let mut line = body.into_bytes();
    line.pop(); // the closing '}', re-added after the hash field
    line.extend_from_slice(format!(r#","hash":"{hash}"}}"#).as_bytes());
    line.push(b'\n');
    head.seq = seq;
    head.hash = hash;
    Ok(line)
}

fn writer(
    mut file: File,
    mut head: Head,
    node: String,
    mut rx: mpsc::Receiver<Job>,
    tap: Option<crate::webhook::Webhook>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut next = Head {
            seq: head.seq,
            hash: head.hash.clone(),
        };
        let mut buf = Vec::with_capacity(batch.len() * 512);
        let mut lines = Vec::with_capacity(batch.len());
        let mut render_err = None;
        for job in &batch {
            match render(&job.event, &mut next, &node) {
                Ok(line) => {
                    lines.push((job.event.kind, buf.len(), buf.len() + line.len() - 1));
                    buf.extend_from_slice(&line);
                }
                Err(e) => {
                    render_err = Some(e);
                    break;
                }
            }
        }
        let good_len = file.metadata().map(|m| m.len()).ok();
        let result = match render_err {
            Some(e) => Err(AuditError::Write(e)),
            None => crate::metrics::timed("mayfly_audit_sync_seconds", || {
                file.write_all(&buf).and_then(|()| file.sync_data())
            })
            .map_err(|e| AuditError::Write(e.to_string())),
        };
        metrics::histogram!("mayfly_audit_batch_records").record(batch.len() as f64);
        match &result {
            Ok(()) => {
                head = next;
                // Only durable records leave the process.
                if let Some(tap) = &tap {
                    for (kind, start, end) in &lines {
                        if let Ok(line) = std::str::from_utf8(&buf[*start..*end]) {
                            tap.offer(kind, line);
                        }
                    }
                }
            }
            Err(e) => {
                metrics::counter!("mayfly_audit_write_failures_total").increment(1);
                tracing::error!(error = %e, records = batch.len(), "audit write failed; requests fail closed");
                // Drop whatever part of the batch reached the file: none of it was
                // acknowledged, and a partial line would break the chain.
                if let Some(len) = good_len {
                    let _ = file.set_len(len);
                }
            }
        }
        for job in batch {
            let _ = job.ack.send(result.clone());
        }
    }
}

struct Checked {
    seq: u64,
    prev: String,
    hash: String,
}

fn check_record(line: &str) -> Result<Checked, String> {
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.ends_with("\"}") {
        return Err("record does not end with its hash field".into());
    }
    let split = line.len() - HASH_SUFFIX_LEN;
    let (body_open, suffix) = line.split_at(split);
    let claimed = suffix
        .strip_prefix(r#","hash":""#)
        .and_then(|s| s.strip_suffix("\"}"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| "record does not end with its hash field".to_string())?;
    let body = format!("{body_open}}}");
    let actual = hex::encode(Sha256::digest(body.as_bytes()));
    if actual != claimed {
        return Err("record hash does not match its content (record altered)".into());
    }
    let value: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("record is not JSON: {e}"))?;
    let seq = value
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or("record has no seq")?;
    let prev = value
        .get("prev")
        .and_then(serde_json::Value::as_str)
        .ok_or("record has no prev")?
        .to_string();
    Ok(Checked {
        seq,
        prev,
        hash: claimed.to_string(),
    })
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("cannot read {0}")]
    Io(String),
    #[error("line {line}: {reason}")]
    Broken { line: usize, reason: String },
}

/// Verifies a whole audit file. Returns the number of records, or the first bad line.
pub fn verify_file(path: &Path) -> Result<u64, ChainError> {
    let file = File::open(path).map_err(|e| ChainError::Io(format!("{}: {e}", path.display())))?;
    verify_reader(BufReader::new(file))
}

pub fn verify_reader(reader: impl BufRead) -> Result<u64, ChainError> {
    let mut prev_hash = GENESIS.to_string();
    let mut prev_seq = 0u64;
    let mut count = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let broken = |reason: String| ChainError::Broken {
            line: line_no,
            reason,
        };
        let line = line.map_err(|e| broken(e.to_string()))?;
        let rec = check_record(&line).map_err(broken)?;
        if rec.prev != prev_hash {
            return Err(broken(if line_no == 1 {
                "first record does not start the chain (records before it removed?)".into()
            } else {
                "prev does not match the previous record's hash (record removed, reordered or inserted)"
                    .into()
            }));
        }
        if rec.seq != prev_seq + 1 {
            return Err(broken(format!(
                "seq {} follows seq {prev_seq} (record removed or reordered)",
                rec.seq
            )));
        }
        prev_hash = rec.hash;
        prev_seq = rec.seq;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
