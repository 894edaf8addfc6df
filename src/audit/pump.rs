//! The pump: feeds the audit file from the store's audit journal (`lease::journal`).
//!
//! A journaled record is durable once its store commit is; the pump then chains it into
//! the file in journal order (the journal's sequence number is the record's `seq`),
//! fsyncs once per batch, publishes the chain head, forwards records to the webhook and
//! lets the store trim what the file now holds. A rotation is itself a journal record,
//! so the chain and the journal never disagree on a number.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::log::{Head, chain, render_body};
use super::writer::Writer;
use super::{AuditEvent, ROTATED_KIND};
use crate::lease::{AuditJournal, JournalSignal};

/// Records read from the journal and fsynced together at most.
const MAX_BATCH: usize = 2048;
/// How long the pump lets records gather before it feeds them to the file. The file
/// lags the journal by about this much; no request waits for it.
const LINGER: Duration = Duration::from_millis(10);
/// How long the pump sleeps after a failure before it tries again.
const RETRY: Duration = Duration::from_millis(200);

pub(super) struct Pump {
    pub(super) writer: Writer,
    pub(super) journal: Weak<dyn AuditJournal>,
    pub(super) signal: Arc<JournalSignal>,
    pub(super) stop: Arc<AtomicBool>,
    /// Set while the file cannot be written: the log refuses new records meanwhile.
    pub(super) failing: Arc<AtomicBool>,
    /// Fault injection (`AuditLog::hold_feeding`): while set, nothing is fed.
    pub(super) held: Arc<AtomicBool>,
}

/// A batch rendered for the file: the bytes, and each line's kind and span.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    lines: Vec<(String, usize, usize)>,
}

impl Pump {
    pub(super) fn run(mut self, mut file: File, mut head: Head) {
        let mut rotation_asked = false;
        loop {
            let committed = self.signal.wait_after(head.seq, Duration::from_millis(50));
            metrics::gauge!("mayfly_audit_journal_backlog")
                .set(committed.saturating_sub(head.seq) as f64);
            if committed <= head.seq {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                continue;
            }
            if self.held.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if !self.stop.load(Ordering::SeqCst) {
                // Off every request's path: let a batch gather, one fsync for all of it.
                std::thread::sleep(LINGER);
            }
            let Some(journal) = self.journal.upgrade() else {
                break;
            };
            match self.feed(journal.as_ref(), &mut file, &mut head) {
                Ok(rotated) => {
                    self.failing.store(false, Ordering::SeqCst);
                    journal.trim_through(head.seq);
                    // Once the asked-for rotation happened, the new file may be asked
                    // for its own (a large batch can fill it at once).
                    rotation_asked &= !rotated;
                    if !rotation_asked && self.due_for_rotation(&file) {
                        self.ask_rotation(journal.as_ref());
                        rotation_asked = true;
                    }
                }
                Err(e) => {
                    self.failing.store(true, Ordering::SeqCst);
                    metrics::counter!("mayfly_audit_write_failures_total").increment(1);
                    tracing::error!(error = %e, "cannot feed the audit file from the journal; retrying (records stay in the journal)");
                    if self.stop.load(Ordering::SeqCst) {
                        // Shutting down: the next start feeds what is left.
                        break;
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    fn due_for_rotation(&self, file: &File) -> bool {
        file.metadata()
            .is_ok_and(|m| m.is_file() && m.len() >= self.writer.rotation.rotate_bytes)
    }

    /// The rotation record goes through the journal, so it gets its place in the chain.
    fn ask_rotation(&self, journal: &dyn AuditJournal) {
        match render_body(&AuditEvent::new(ROTATED_KIND), &self.writer.node) {
            Ok(body) => journal.append_later(ROTATED_KIND, body),
            Err(e) => tracing::error!(error = %e, "cannot render the audit rotation record"),
        }
    }

    /// One batch: read, chain, append, fsync, publish; returns whether it rotated the
    /// file. On failure nothing more is published and what reached the file after the
    /// last published record is cut back off.
    fn feed(
        &mut self,
        journal: &dyn AuditJournal,
        file: &mut File,
        head: &mut Head,
    ) -> Result<bool, String> {
        let rows = journal
            .read_after(head.seq, MAX_BATCH)
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Err(format!(
                "the journal has no record after seq {} though later ones committed",
                head.seq
            ));
        }
        let mut next = head.clone();
        let mut batch = Batch::default();
        let mut rotated = false;
        for (seq, kind, body) in rows {
            if seq != next.seq + 1 {
                return Err(format!(
                    "audit journal skips from seq {} to {seq}",
                    next.seq
                ));
            }
            let mut extra = String::new();
            if kind == ROTATED_KIND {
                // Everything before the rotation record belongs to the current file.
                self.flush(file, &batch)?;
                *head = next.clone();
                self.publish(head, &batch);
                batch = Batch::default();
                let (f, rotated_name) = self.writer.next_file()?;
                *file = f;
                let detail = format!("continues {rotated_name} (last seq {})", head.seq);
                extra = format!(
                    r#","detail":{}"#,
                    serde_json::to_string(&detail).map_err(|e| e.to_string())?
                );
                self.writer.rotated(&rotated_name, seq);
                rotated = true;
            }
            let line = chain(&body, &extra, &mut next)?;
            let start = batch.buf.len();
            batch.buf.extend_from_slice(&line);
            batch.lines.push((kind, start, batch.buf.len() - 1));
        }
        self.flush(file, &batch)?;
        *head = next;
        self.publish(head, &batch);
        Ok(rotated)
    }

    fn flush(&self, file: &mut File, batch: &Batch) -> Result<(), String> {
        if batch.buf.is_empty() {
            return Ok(());
        }
        let good_len = file.metadata().map(|m| m.len()).ok();
        let written = crate::metrics::timed("mayfly_audit_sync_seconds", || {
            file.write_all(&batch.buf).and_then(|()| file.sync_data())
        });
        metrics::histogram!("mayfly_audit_batch_records").record(batch.lines.len() as f64);
        written.map_err(|e| {
            // A partial line would break the chain; the records are still journaled.
            if let Some(len) = good_len {
                let _ = file.set_len(len);
            }
            e.to_string()
        })
    }

    fn publish(&self, head: &Head, batch: &Batch) {
        self.writer.publish(head);
        if let Some(tap) = &self.writer.tap {
            for (kind, start, end) in &batch.lines {
                if let Ok(line) = std::str::from_utf8(&batch.buf[*start..*end]) {
                    tap.offer(kind, line);
                }
            }
        }
    }
}
