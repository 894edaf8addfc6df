//! The writer thread: group-commits queued records, truncates back on a failed write,
//! and rotates the file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use super::log::{Head, Job, open_private_append, render};
use super::{AuditError, AuditEvent, ChainHead, ROTATED_KIND, Rotation, rotated_files};

/// Records appended (and fsynced) together at most.
const MAX_BATCH: usize = 1024;

pub(super) struct Writer {
    pub(super) path: PathBuf,
    /// Index the next rotated file gets.
    pub(super) next_index: u64,
    pub(super) rotation: Rotation,
    pub(super) node: String,
    pub(super) shared: Arc<Mutex<ChainHead>>,
    pub(super) tap: Option<crate::webhook::Webhook>,
}

impl Writer {
    pub(super) fn run(mut self, mut file: File, mut head: Head, mut rx: mpsc::Receiver<Job>) {
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

    pub(super) fn publish(&self, head: &Head) {
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = head.clone();
    }

    /// Renames the current file to `<path>.NNNNNN` and starts a new one whose first
    /// record continues the chain; then applies retention.
    fn rotate(&mut self, head: &mut Head) -> Result<File, String> {
        let (mut file, rotated_name) = self.next_file()?;
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
        self.rotated(&rotated_name, head.seq);
        Ok(file)
    }

    /// Renames the current file to `<path>.NNNNNN` and opens a new, empty one; returns
    /// it and the rotated file's name.
    pub(super) fn next_file(&mut self) -> Result<(File, String), String> {
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("audit path has no file name")?
            .to_string();
        let rotated_name;
        if self.path.exists() {
            rotated_name = format!("{name}.{:06}", self.next_index);
            let rotated = self.path.with_file_name(&rotated_name);
            if rotated.exists() {
                return Err(format!("{} already exists", rotated.display()));
            }
            std::fs::rename(&self.path, &rotated).map_err(|e| e.to_string())?;
            self.next_index += 1;
        } else {
            // An earlier attempt renamed the file and then failed to start the next one.
            rotated_name = format!("{name}.{:06}", self.next_index.saturating_sub(1));
        }
        let file = open_private_append(&self.path).map_err(|e| e.to_string())?;
        Ok((file, rotated_name))
    }

    /// After a rotation's first record is durable: metrics, log, retention.
    pub(super) fn rotated(&self, rotated_name: &str, seq: u64) {
        sync_dir(&self.path);
        metrics::counter!("mayfly_audit_rotations_total").increment(1);
        tracing::info!(rotated = %rotated_name, seq, "audit log rotated");
        if self.rotation.retain_files == 0 {
            return;
        }
        let files = match rotated_files(&self.path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "audit retention: cannot list rotated files");
                return;
            }
        };
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
}

/// Makes a rename durable (the directory entry), best effort.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}
