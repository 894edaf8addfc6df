//! The audit log handle: opening (and recovering) the file, rendering a chained record,
//! and the rotated file set.

use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot};

use crate::lease::{AuditJournal, Joined, JournalSignal, NewLease};

use super::verify::check_record;
use super::writer::Writer;
use super::{AuditError, AuditEvent, ChainHead, GENESIS, MAX_FIELD_BYTES, Rotation};

pub(super) struct Job {
    pub(super) event: AuditEvent,
    pub(super) ack: oneshot::Sender<Result<(), AuditError>>,
}

/// Where records go: the file's own writer thread (one fsync per group of records), or
/// the store's audit journal, which the pump feeds to the file.
#[derive(Clone)]
enum Sink {
    File(mpsc::Sender<Job>),
    Journal {
        journal: Arc<dyn AuditJournal>,
        signal: Arc<JournalSignal>,
        /// The pump's last attempt to write the file failed: new records are refused
        /// until one succeeds (those already journaled are kept and fed later).
        failing: Arc<AtomicBool>,
        /// Fault injection: while set, the pump does not feed the file (`hold_feeding`).
        held: Arc<AtomicBool>,
        _pump: Arc<PumpGuard>,
    },
}

/// Stops the pump once the last handle is gone, after it has fed what is committed.
struct PumpGuard {
    stop: Arc<AtomicBool>,
    signal: Arc<JournalSignal>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for PumpGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.signal.nudge();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Journaled records the file may lag behind by before new records are refused: the
/// journal is bounded even when the file cannot be written.
pub const MAX_JOURNAL_BACKLOG: u64 = 100_000;

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    sink: Sink,
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

pub(super) type Head = ChainHead;

/// Opens `path` for appending, readable for recovery, owner-only (0600) whether it is
/// created now or existed with a wider mode.
pub(super) fn open_private_append(path: &Path) -> std::io::Result<File> {
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
        let (file, head, writer) = open_file(path, node, tap, rotation)?;
        let shared = writer.shared.clone();
        let (tx, rx) = mpsc::channel(8192);
        std::thread::Builder::new()
            .name("mayfly-audit".into())
            .spawn(move || writer.run(file, head, rx))
            .map_err(|e| open_error(path, e.to_string()))?;
        Ok(Self {
            sink: Sink::File(tx),
            path: path.to_path_buf(),
            node: node.to_string(),
            head: shared,
        })
    }

    /// `open_rotating`, with records committed to `journal` (the lease store) and the
    /// file fed from it: a credential's lease and audit record are then one durable
    /// write (`write_with_lease`).
    pub fn open_journaled(
        path: &Path,
        node: &str,
        tap: Option<crate::webhook::Webhook>,
        rotation: Rotation,
        journal: Arc<dyn AuditJournal>,
    ) -> Result<Self, AuditError> {
        let (file, head, writer) = open_file(path, node, tap, rotation)?;
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            // A device or pipe cannot be truncated back or rotated by the pump: such a
            // log keeps its own writer, and every record its own fsync.
            drop(file);
            return Self::open_rotating(path, node, writer.tap, rotation);
        }
        journal
            .attach(head.seq)
            .map_err(|e| open_error(path, e.to_string()))?;
        let shared = writer.shared.clone();
        let signal = journal.signal();
        let stop = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let pump = super::pump::Pump {
            writer,
            journal: Arc::downgrade(&journal),
            signal: signal.clone(),
            stop: stop.clone(),
            failing: failing.clone(),
            held: held.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("mayfly-audit".into())
            .spawn(move || pump.run(file, head))
            .map_err(|e| open_error(path, e.to_string()))?;
        let guard = PumpGuard {
            stop,
            signal: signal.clone(),
            thread: Mutex::new(Some(thread)),
        };
        Ok(Self {
            sink: Sink::Journal {
                journal,
                signal,
                failing,
                held,
                _pump: Arc::new(guard),
            },
            path: path.to_path_buf(),
            node: node.to_string(),
            head: shared,
        })
    }

    /// Fault injection for tests: holds the pump (or lets it go again) as a stalled disk
    /// would. Records keep committing to the journal and the file falls behind, up to
    /// [`MAX_JOURNAL_BACKLOG`]. Nothing in the broker calls it; a file log ignores it.
    #[doc(hidden)]
    pub fn hold_feeding(&self, held: bool) {
        if let Sink::Journal { held: h, .. } = &self.sink {
            h.store(held, Ordering::SeqCst);
        }
    }

    /// Whether a lease can be written with its audit record (`write_with_lease`).
    pub fn joins_leases(&self) -> bool {
        matches!(self.sink, Sink::Journal { .. })
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
        match &self.sink {
            Sink::File(tx) => {
                let (ack, done) = oneshot::channel();
                tx.send(Job { event, ack })
                    .await
                    .map_err(|_| AuditError::Stopped)?;
                done.await.map_err(|_| AuditError::Stopped)?
            }
            Sink::Journal { .. } => match self.journal(event, None).await? {
                Joined::Written => Ok(()),
                other => Err(AuditError::Write(format!(
                    "unexpected journal outcome {other:?}"
                ))),
            },
        }
    }

    /// Appends `event` and writes `lease` in the same durable commit; returns what the
    /// store did (a spent single-use key or an ended task write nothing at all).
    pub async fn write_with_lease(
        &self,
        event: AuditEvent,
        lease: NewLease,
    ) -> Result<Joined, AuditError> {
        self.journal(event, Some(lease)).await
    }

    async fn journal(
        &self,
        event: AuditEvent,
        lease: Option<NewLease>,
    ) -> Result<Joined, AuditError> {
        let Sink::Journal {
            journal,
            signal,
            failing,
            ..
        } = &self.sink
        else {
            return Err(AuditError::Write(
                "this audit log does not journal leases".into(),
            ));
        };
        if failing.load(Ordering::SeqCst) {
            return Err(AuditError::Write(
                "the audit file cannot be written (records already committed stay in the journal)"
                    .into(),
            ));
        }
        let backlog = signal.committed().saturating_sub(self.head().seq);
        if backlog >= MAX_JOURNAL_BACKLOG {
            return Err(AuditError::Write(format!(
                "the audit file is {backlog} records behind its journal"
            )));
        }
        let body = render_body(&event, &self.node).map_err(AuditError::Write)?;
        journal
            .append(event.kind, body, lease)
            .await
            .map_err(|e| AuditError::Write(e.to_string()))
    }

    /// Waits until the file holds every record committed so far (journaled logs; a file
    /// log's records are in the file when `write` returns).
    pub async fn flush(&self) -> Result<(), AuditError> {
        let Sink::Journal { signal, .. } = &self.sink else {
            return Ok(());
        };
        let target = signal.committed();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.head().seq < target {
            if std::time::Instant::now() >= deadline {
                return Err(AuditError::Write(format!(
                    "the audit file is still at seq {} of {target}",
                    self.head().seq
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

fn open_error(path: &Path, reason: String) -> AuditError {
    AuditError::Open {
        path: path.to_path_buf(),
        reason,
    }
}

/// Opens the file, recovers the chain head (from the last rotated file when the current
/// one is empty) and prepares its writer.
fn open_file(
    path: &Path,
    node: &str,
    tap: Option<crate::webhook::Webhook>,
    rotation: Rotation,
) -> Result<(File, Head, Writer), AuditError> {
    let open_err = |reason: String| open_error(path, reason);
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
    let writer = Writer {
        path: path.to_path_buf(),
        next_index: rotated.last().map_or(1, |(i, _)| i + 1),
        rotation,
        node: node.to_string(),
        shared: Arc::new(Mutex::new(head.clone())),
        tap,
    };
    Ok((file, head, writer))
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

/// The event as the JSON object a record starts from: its fields (strings capped), `ts`
/// and `node`; the chain adds `seq`, `prev` and `hash` (see [`chain`]).
pub(super) fn render_body(event: &AuditEvent, node: &str) -> Result<Vec<u8>, String> {
    let ts = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .map_err(|e| e.to_string())?;
    render_body_at(event, node, &ts)
}

/// [`render_body`] with its `ts`. When no string of the event needs capping (almost
/// every record), the event is serialised once and `ts` and `node` appended; otherwise
/// it goes through a JSON value, which [`cap_strings`] walks. Both give the same bytes
/// (`direct_and_capped_rendering_agree` holds them to it).
pub(super) fn render_body_at(event: &AuditEvent, node: &str, ts: &str) -> Result<Vec<u8>, String> {
    let mut body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    if !no_long_strings(&body) {
        return render_body_capped(event, node, ts);
    }
    if body.len() < 3 || body.pop() != Some(b'}') {
        return Err("audit event is not a non-empty object".to_string());
    }
    body.extend_from_slice(br#","ts":"#);
    serde_json::to_writer(&mut body, ts).map_err(|e| e.to_string())?;
    body.extend_from_slice(br#","node":"#);
    serde_json::to_writer(&mut body, node).map_err(|e| e.to_string())?;
    body.push(b'}');
    Ok(body)
}

pub(super) fn render_body_capped(
    event: &AuditEvent,
    node: &str,
    ts: &str,
) -> Result<Vec<u8>, String> {
    let mut value = serde_json::to_value(event).map_err(|e| e.to_string())?;
    cap_strings(&mut value);
    let map = value
        .as_object_mut()
        .ok_or_else(|| "audit event is not an object".to_string())?;
    map.insert("ts".into(), ts.into());
    map.insert("node".into(), node.into());
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// Whether no string in the serialised `json` needs capping: each string's escaped form,
/// counted here, is never shorter than the string itself.
fn no_long_strings(json: &[u8]) -> bool {
    let (mut inside, mut escaped, mut len) = (false, false, 0usize);
    for &b in json {
        if !inside {
            if b == b'"' {
                (inside, len) = (true, 0);
            }
            continue;
        }
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            inside = false;
            continue;
        }
        len += 1;
        if len > MAX_FIELD_BYTES {
            return false;
        }
    }
    true
}

/// Chains a rendered body after `head`: adds `extra` (already-encoded `,"key":value`
/// pairs, or nothing), `seq` and `prev`, then `hash` over everything before it; advances
/// `head`. The line ends with a newline.
pub(super) fn chain(body: &[u8], extra: &str, head: &mut Head) -> Result<Vec<u8>, String> {
    let open = body
        .strip_suffix(b"}")
        .filter(|o| o.len() > 1 && o.first() == Some(&b'{'))
        .ok_or("audit record body is not a non-empty JSON object")?;
    let seq = head.seq + 1;
    let mut line = Vec::with_capacity(body.len() + extra.len() + 220);
    line.extend_from_slice(open);
    line.extend_from_slice(extra.as_bytes());
    line.extend_from_slice(format!(r#","seq":{seq},"prev":"{}"}}"#, head.hash).as_bytes());
    let hash = hex::encode(Sha256::digest(&line));
    line.pop(); // the closing '}', re-added after the hash field
    line.extend_from_slice(format!(r#","hash":"{hash}"}}"#).as_bytes());
    line.push(b'\n');
    head.seq = seq;
    head.hash = hash;
    Ok(line)
}

pub(super) fn render(event: &AuditEvent, head: &mut Head, node: &str) -> Result<Vec<u8>, String> {
    chain(&render_body(event, node)?, "", head)
}
