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
//!
//! Bounded cost: every string value of a record is capped at [`MAX_FIELD_BYTES`] (the
//! rest replaced by its length and SHA-256, so a value stays correlatable), and repeated
//! unauthenticated refusals are counted by [`Refusals`] and written as one summary record
//! per source and code per interval instead of one record each.
//!
//! Rotation: past `rotate_bytes` the file is renamed `<path>.NNNNNN` and a new one is
//! started whose first record (`audit.rotated`) continues the chain from the previous
//! file's head, so a rotated set verifies as one chain ([`verify_set`]). The chain head
//! is published to the lease store at an interval ([`spawn_anchor_publisher`]); a
//! truncated or rewritten tail no longer matches its anchor.

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
/// Longest string value kept verbatim in a record (bytes). Longer values (attacker-chosen
/// `iss`, headers, reasons) keep this prefix, their length and their SHA-256.
pub const MAX_FIELD_BYTES: usize = 1024;
/// Kind of the first record of every file after a rotation.
pub const ROTATED_KIND: &str = "audit.rotated";

/// When the log file is rotated and how many rotated files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the file reaches this size.
    pub rotate_bytes: u64,
    /// Rotated files kept (oldest removed first); 0 keeps all.
    pub retain_files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            rotate_bytes: 64 * 1024 * 1024,
            retain_files: 0,
        }
    }
}

/// The last durable record of the chain: what an anchor publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

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
    /// Refusals a `refusals.summary` record stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Start of the interval a summary covers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
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

/// Kind of a record that stands for repeated unauthenticated refusals.
pub const SUMMARY_KIND: &str = "refusals.summary";
/// `(source, code)` pairs counted at once; the rest are counted under source `other`.
const MAX_SUMMARY_KEYS: usize = 4096;

/// Unauthenticated refusals of the current interval, by source and code. The first of
/// each pair is written as a full (capped) record; the rest only add to a count, written
/// as one `refusals.summary` record when the interval closes. A flood of junk costs one
/// record per source and code per interval, and the trail still shows it.
#[derive(Debug)]
pub struct Refusals {
    open: Mutex<RefusalWindow>,
}

#[derive(Debug)]
struct RefusalWindow {
    since: OffsetDateTime,
    counts: std::collections::HashMap<(String, &'static str), Counted>,
}

#[derive(Debug)]
struct Counted {
    route: Option<String>,
    /// Refusals not written individually.
    suppressed: u64,
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new()
    }
}

impl Refusals {
    pub fn new() -> Self {
        Self {
            open: Mutex::new(RefusalWindow {
                since: OffsetDateTime::now_utc(),
                counts: Default::default(),
            }),
        }
    }

    /// Counts one refusal; `true` when it is the first of its source and code in this
    /// interval and must be written in full.
    pub fn observe(&self, source: &str, code: &'static str, route: Option<&str>) -> bool {
        let mut w = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (source.to_string(), code);
        if !w.counts.contains_key(&key) && w.counts.len() >= MAX_SUMMARY_KEYS {
            key = ("other".to_string(), "other");
        }
        match w.counts.get_mut(&key) {
            Some(c) => {
                c.suppressed += 1;
                false
            }
            None => {
                let first = key.0 != "other";
                w.counts.insert(
                    key,
                    Counted {
                        route: route.map(str::to_string),
                        suppressed: u64::from(!first),
                    },
                );
                first
            }
        }
    }

    /// Closes the interval: one summary event per pair with refusals not written
    /// individually.
    pub fn drain(&self) -> Vec<AuditEvent> {
        let now = OffsetDateTime::now_utc();
        let mut w = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let since = std::mem::replace(&mut w.since, now);
        let counts = std::mem::take(&mut w.counts);
        drop(w);
        let since = since.format(&Rfc3339).ok();
        let mut out: Vec<AuditEvent> = counts
            .into_iter()
            .filter(|(_, c)| c.suppressed > 0)
            .map(|((source, code), c)| {
                let mut ev = AuditEvent::new(SUMMARY_KIND);
                ev.source = Some(source);
                ev.code = Some(code);
                ev.route = c.route;
                ev.decision = Some("deny");
                ev.count = Some(c.suppressed);
                ev.since = since.clone();
                ev
            })
            .collect();
        out.sort_by(|a, b| (&a.source, a.code).cmp(&(&b.source, b.code)));
        out
    }

    /// Writes the closing interval's summaries.
    pub async fn flush(&self, log: &AuditLog) -> Result<usize, AuditError> {
        let events = self.drain();
        let n = events.len();
        for ev in events {
            log.write(ev).await?;
        }
        Ok(n)
    }
}

/// Writes refusal summaries every `every` until aborted.
pub fn spawn_summary_flusher(
    refusals: Arc<Refusals>,
    log: AuditLog,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = refusals.flush(&log).await {
                tracing::error!(error = %e, "cannot write refusal summaries");
            }
        }
    })
}

/// Publishes this log's chain head to `store` now, if it moved since `last`; returns the
/// seq published (or `last`).
pub async fn publish_anchor(
    log: &AuditLog,
    store: &dyn crate::lease::LeaseStore,
    last: u64,
) -> u64 {
    let head = log.head();
    if head.seq == 0 || head.seq == last {
        return last;
    }
    let anchor = crate::lease::AuditAnchor {
        node: log.node().to_string(),
        seq: head.seq,
        hash: head.hash,
        at: OffsetDateTime::now_utc(),
    };
    match store.put_anchor(&anchor).await {
        Ok(true) => {
            metrics::gauge!("mayfly_audit_anchor_seq").set(anchor.seq as f64);
            anchor.seq
        }
        Ok(false) => {
            metrics::counter!("mayfly_audit_anchor_behind_total").increment(1);
            tracing::error!(
                node = %anchor.node,
                seq = anchor.seq,
                "audit chain head is behind its published anchor: this node's log was truncated or replaced"
            );
            last
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish the audit anchor; retrying");
            last
        }
    }
}

/// Publishes the chain head every `every` until aborted.
pub fn spawn_anchor_publisher(
    log: AuditLog,
    store: Arc<dyn crate::lease::LeaseStore>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut last = 0;
        loop {
            tick.tick().await;
            last = publish_anchor(&log, store.as_ref(), last).await;
        }
    })
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
    node: String,
    head: Arc<Mutex<ChainHead>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

type Head = ChainHead;

/// Opens `path` for appending, readable for recovery, owner-only (0600) whether it is
/// created now or existed with a wider mode.
fn open_private_append(path: &Path) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.create(true).append(true).read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(path)?;
    #[cfg(unix)]
    if path.is_file() {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// The rotated files of the log at `base` (`<base>.NNNNNN`), oldest first.
pub fn rotated_files(base: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = base.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match base.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(n) = file_name.to_str() else {
            continue;
        };
        let Some(index) = n
            .strip_prefix(&prefix)
            .filter(|i| i.len() == 6 && i.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|i| i.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((index, dir.join(n)));
    }
    out.sort();
    Ok(out)
}

/// Every file of the log at `base`, in chain order: rotated files, then `base` itself.
pub fn log_set(base: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_files(base)?.into_iter().map(|(_, p)| p).collect();
    if base.is_file() {
        files.push(base.to_path_buf());
    }
    Ok(files)
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, continuing its chain, and starts the writer.
    pub fn open(path: &Path, node: &str) -> Result<Self, AuditError> {
        Self::open_rotating(path, node, None, Rotation::default())
    }

    /// `open`, forwarding each durable record of the kinds the webhook wants to it.
    pub fn open_with_tap(
        path: &Path,
        node: &str,
        tap: Option<crate::webhook::Webhook>,
    ) -> Result<Self, AuditError> {
        Self::open_rotating(path, node, tap, Rotation::default())
    }

    /// `open_with_tap`, rotating as `rotation` says.
    pub fn open_rotating(
        path: &Path,
        node: &str,
        tap: Option<crate::webhook::Webhook>,
        rotation: Rotation,
    ) -> Result<Self, AuditError> {
        let open_err = |reason: String| AuditError::Open {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        let rotated = rotated_files(path).map_err(|e| open_err(e.to_string()))?;
        let mut file = open_private_append(path).map_err(|e| open_err(e.to_string()))?;
        let mut head = recover_head(&mut file).map_err(open_err)?;
        if head.seq == 0
            && let Some((_, last)) = rotated.last()
        {
            // Rotated, then stopped before the new file got its first record: the chain
            // continues from the last rotated file.
            let mut prev = File::open(last).map_err(|e| open_err(e.to_string()))?;
            head = recover_head(&mut prev).map_err(open_err)?;
        }
        let shared = Arc::new(Mutex::new(head.clone()));
        let (tx, rx) = mpsc::channel(8192);
        let w = Writer {
            path: path.to_path_buf(),
            next_index: rotated.last().map_or(1, |(i, _)| i + 1),
            rotation,
            node: node.to_string(),
            shared: shared.clone(),
            tap,
        };
        std::thread::Builder::new()
            .name("mayfly-audit".into())
            .spawn(move || w.run(file, head, rx))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            tx,
            path: path.to_path_buf(),
            node: node.to_string(),
            head: shared,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The last durable record of the chain.
    pub fn head(&self) -> ChainHead {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

/// Caps every string in `v` at [`MAX_FIELD_BYTES`]: a longer one keeps its prefix (cut
/// on a character boundary), its length and the SHA-256 of the whole value.
fn cap_strings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.len() > MAX_FIELD_BYTES => {
            let mut cut = MAX_FIELD_BYTES;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            let digest = hex::encode(Sha256::digest(s.as_bytes()));
            *s = format!("{}…[{} bytes, sha256:{digest}]", &s[..cut], s.len());
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(cap_strings),
        serde_json::Value::Object(map) => map.values_mut().for_each(cap_strings),
        _ => {}
    }
}

fn render(event: &AuditEvent, head: &mut Head, node: &str) -> Result<Vec<u8>, String> {
    let mut value = serde_json::to_value(event).map_err(|e| e.to_string())?;
    cap_strings(&mut value);
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

struct Writer {
    path: PathBuf,
    /// Index the next rotated file gets.
    next_index: u64,
    rotation: Rotation,
    node: String,
    shared: Arc<Mutex<ChainHead>>,
    tap: Option<crate::webhook::Webhook>,
}

impl Writer {
    fn run(mut self, mut file: File, mut head: Head, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let mut next = head.clone();
            let mut buf = Vec::with_capacity(batch.len() * 512);
            let mut lines = Vec::with_capacity(batch.len());
            let mut render_err = None;
            for job in &batch {
                match render(&job.event, &mut next, &self.node) {
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
                    self.publish(&head);
                    // Only durable records leave the process.
                    if let Some(tap) = &self.tap {
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
            // Rotate before acknowledging, so a caller that saw its write done sees the
            // set as it is on disk.
            if result.is_ok()
                && file
                    .metadata()
                    .is_ok_and(|m| m.is_file() && m.len() >= self.rotation.rotate_bytes)
            {
                match self.rotate(&mut head) {
                    Ok(f) => file = f,
                    Err(e) => {
                        // Keep appending to the current file; the next batch tries again.
                        metrics::counter!("mayfly_audit_rotation_failures_total").increment(1);
                        tracing::error!(error = %e, "audit log rotation failed; still appending to the current file");
                    }
                }
            }
            for job in batch {
                let _ = job.ack.send(result.clone());
            }
        }
    }

    fn publish(&self, head: &Head) {
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = head.clone();
    }

    /// Renames the current file to `<path>.NNNNNN` and starts a new one whose first
    /// record continues the chain; then applies retention.
    fn rotate(&mut self, head: &mut Head) -> Result<File, String> {
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("audit path has no file name")?
            .to_string();
        let rotated_name;
        let rotated;
        if self.path.exists() {
            rotated_name = format!("{name}.{:06}", self.next_index);
            rotated = self.path.with_file_name(&rotated_name);
            if rotated.exists() {
                return Err(format!("{} already exists", rotated.display()));
            }
            std::fs::rename(&self.path, &rotated).map_err(|e| e.to_string())?;
            self.next_index += 1;
        } else {
            // An earlier attempt renamed the file and then failed to start the next one.
            rotated_name = format!("{name}.{:06}", self.next_index.saturating_sub(1));
            rotated = self.path.with_file_name(&rotated_name);
        }
        let mut file = open_private_append(&self.path).map_err(|e| e.to_string())?;
        let mut ev = AuditEvent::new(ROTATED_KIND);
        ev.detail = Some(format!("continues {rotated_name} (last seq {})", head.seq));
        let mut next = head.clone();
        let line = render(&ev, &mut next, &self.node)?;
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|e| e.to_string())?;
        sync_dir(&self.path);
        *head = next;
        self.publish(head);
        metrics::counter!("mayfly_audit_rotations_total").increment(1);
        tracing::info!(rotated = %rotated.display(), seq = head.seq, "audit log rotated");
        if self.rotation.retain_files > 0 {
            let files = rotated_files(&self.path).map_err(|e| e.to_string())?;
            let excess = files.len().saturating_sub(self.rotation.retain_files);
            for (_, old) in files.into_iter().take(excess) {
                match std::fs::remove_file(&old) {
                    Ok(()) => {
                        tracing::info!(removed = %old.display(), "audit retention: oldest rotated file removed")
                    }
                    Err(e) => {
                        tracing::warn!(file = %old.display(), error = %e, "audit retention: cannot remove")
                    }
                }
            }
        }
        Ok(file)
    }
}

/// Makes a rename durable (the directory entry), best effort.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

struct Checked {
    seq: u64,
    prev: String,
    hash: String,
    kind: String,
    node: String,
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
    let text = |k: &str| {
        value
            .get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok(Checked {
        seq,
        prev,
        hash: claimed.to_string(),
        kind: text("kind"),
        node: text("node"),
    })
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("cannot read {0}")]
    Io(String),
    #[error("{}line {line}: {reason}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Broken {
        /// The file of a rotated set (`None` when one stream was verified).
        file: Option<PathBuf>,
        line: usize,
        reason: String,
    },
    #[error("no audit log files at {0}")]
    Empty(PathBuf),
    /// The log ends before the record its node anchored: its tail was truncated.
    #[error(
        "node {node}: anchored seq {anchored} is past the log's last record (seq {last}): the tail was truncated"
    )]
    Truncated {
        node: String,
        anchored: u64,
        last: u64,
    },
    /// The anchored record is there, with another hash: the tail was rewritten.
    #[error(
        "node {node}: record seq {seq} does not match its anchor (hash {found}, anchored {anchored}): the log was rewritten"
    )]
    Rewritten {
        node: String,
        seq: u64,
        found: String,
        anchored: String,
    },
    #[error("no anchor in the store for node(s) {0}")]
    NoAnchor(String),
}

/// What a verified log (or rotated set) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub files: usize,
    pub records: u64,
    /// Seq of the first record (above 1 when retention removed older files).
    pub first_seq: u64,
    pub head: ChainHead,
    /// Nodes whose anchors matched.
    pub anchored: Vec<String>,
}

/// Verifies a whole audit file. Returns the number of records, or the first bad line.
pub fn verify_file(path: &Path) -> Result<u64, ChainError> {
    let file = File::open(path).map_err(|e| ChainError::Io(format!("{}: {e}", path.display())))?;
    verify_reader(BufReader::new(file))
}

pub fn verify_reader(reader: impl BufRead) -> Result<u64, ChainError> {
    let mut chain = Chain::new(&[]);
    chain.feed(reader, None, false)?;
    Ok(chain.count)
}

/// Verifies the files of a rotated set, in order, as one chain; then checks every
/// anchor whose node wrote records in it. The first file may start past seq 1 only with
/// an `audit.rotated` record (its predecessors were removed by retention).
pub fn verify_set(
    files: &[PathBuf],
    anchors: &[crate::lease::AuditAnchor],
) -> Result<Verified, ChainError> {
    if files.is_empty() {
        return Err(ChainError::Empty(PathBuf::new()));
    }
    let mut chain = Chain::new(anchors);
    for (i, path) in files.iter().enumerate() {
        let file =
            File::open(path).map_err(|e| ChainError::Io(format!("{}: {e}", path.display())))?;
        chain.feed(BufReader::new(file), Some(path), i == 0)?;
    }
    let mut verified = chain.finish()?;
    verified.files = files.len();
    Ok(verified)
}

struct Chain<'a> {
    prev_hash: String,
    prev_seq: u64,
    first_seq: u64,
    count: u64,
    anchors: &'a [crate::lease::AuditAnchor],
    /// Per anchor: matched at its seq.
    matched: Vec<bool>,
    nodes: std::collections::BTreeSet<String>,
}

impl<'a> Chain<'a> {
    fn new(anchors: &'a [crate::lease::AuditAnchor]) -> Self {
        Self {
            prev_hash: GENESIS.to_string(),
            prev_seq: 0,
            first_seq: 0,
            count: 0,
            anchors,
            matched: vec![false; anchors.len()],
            nodes: Default::default(),
        }
    }

    /// `may_continue`: the stream may start with a rotation record that continues a
    /// file no longer present.
    fn feed(
        &mut self,
        reader: impl BufRead,
        file: Option<&Path>,
        may_continue: bool,
    ) -> Result<(), ChainError> {
        for (i, line) in reader.lines().enumerate() {
            let line_no = i + 1;
            let broken = |reason: String| ChainError::Broken {
                file: file.map(Path::to_path_buf),
                line: line_no,
                reason,
            };
            let line = line.map_err(|e| broken(e.to_string()))?;
            let rec = check_record(&line).map_err(broken)?;
            if self.count == 0 && may_continue && rec.kind == ROTATED_KIND && rec.seq > 1 {
                // Earlier files were removed by retention: start from here.
                self.prev_hash = rec.prev.clone();
                self.prev_seq = rec.seq - 1;
            }
            if rec.prev != self.prev_hash {
                return Err(broken(if self.count == 0 {
                    "first record does not start the chain (records before it removed?)".into()
                } else if line_no == 1 {
                    "file does not continue the previous file's chain (file missing, reordered or replaced?)".into()
                } else {
                    "prev does not match the previous record's hash (record removed, reordered or inserted)"
                        .into()
                }));
            }
            if rec.seq != self.prev_seq + 1 {
                return Err(broken(format!(
                    "seq {} follows seq {} (record removed or reordered)",
                    rec.seq, self.prev_seq
                )));
            }
            if self.count == 0 {
                self.first_seq = rec.seq;
            }
            for (a, m) in self.anchors.iter().zip(self.matched.iter_mut()) {
                if a.seq == rec.seq && a.node == rec.node {
                    if a.hash != rec.hash {
                        return Err(ChainError::Rewritten {
                            node: a.node.clone(),
                            seq: a.seq,
                            found: rec.hash.clone(),
                            anchored: a.hash.clone(),
                        });
                    }
                    *m = true;
                }
            }
            self.nodes.insert(rec.node);
            self.prev_hash = rec.hash;
            self.prev_seq = rec.seq;
            self.count += 1;
        }
        Ok(())
    }

    fn finish(self) -> Result<Verified, ChainError> {
        let mut anchored = Vec::new();
        for (a, m) in self.anchors.iter().zip(&self.matched) {
            if !self.nodes.contains(&a.node) {
                continue;
            }
            if *m {
                anchored.push(a.node.clone());
            } else if a.seq > self.prev_seq {
                return Err(ChainError::Truncated {
                    node: a.node.clone(),
                    anchored: a.seq,
                    last: self.prev_seq,
                });
            } else {
                // The anchored seq is in the chain but was written by another node: the
                // log was replaced with another node's chain.
                return Err(ChainError::Rewritten {
                    node: a.node.clone(),
                    seq: a.seq,
                    found: "(a record of another node)".into(),
                    anchored: a.hash.clone(),
                });
            }
        }
        if !self.anchors.is_empty() && anchored.is_empty() {
            return Err(ChainError::NoAnchor(
                self.nodes.into_iter().collect::<Vec<_>>().join(", "),
            ));
        }
        Ok(Verified {
            files: 0,
            records: self.count,
            first_seq: self.first_seq,
            head: ChainHead {
                seq: self.prev_seq,
                hash: self.prev_hash,
            },
            anchored,
        })
    }
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
}
