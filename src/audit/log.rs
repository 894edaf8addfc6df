//! The audit log handle: opening (and recovering) the file, rendering a chained record,
//! and the rotated file set.

use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot};

use super::verify::check_record;
use super::writer::Writer;
use super::{AuditError, AuditEvent, ChainHead, GENESIS, MAX_FIELD_BYTES, Rotation};

pub(super) struct Job {
    pub(super) event: AuditEvent,
    pub(super) ack: oneshot::Sender<Result<(), AuditError>>,
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

pub(super) fn render(event: &AuditEvent, head: &mut Head, node: &str) -> Result<Vec<u8>, String> {
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
