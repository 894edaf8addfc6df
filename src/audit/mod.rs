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
//!
//! Files: `log` (the handle, recovery, rendering a record), `writer` (group commit,
//! rotation), `verify` (the chain check), `anchors`, `refusals`.

mod anchors;
mod log;
mod pump;
mod refusals;
mod verify;
mod writer;

use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use anchors::{publish_anchor, spawn_anchor_publisher};
pub use log::{AuditLog, MAX_JOURNAL_BACKLOG, log_set, rotated_files};
pub use refusals::{Refusals, SUMMARY_KIND, spawn_summary_flusher};
pub use verify::{ChainError, Verified, verify_file, verify_reader, verify_set};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
    /// A lease to write in the same commit as this record (`AuditLog::write_with_lease`);
    /// never written to the record.
    #[serde(skip)]
    pub staged_lease: Option<Box<crate::lease::NewLease>>,
    /// The request commits at its end (`Broker::commit`), so a lease may wait for it.
    #[serde(skip)]
    pub commits_at_end: bool,
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
    pub fn set<R>(&self, f: impl FnOnce(&mut AuditEvent) -> R) -> R {
        // A poisoned lock only means another thread panicked mid-update; the event is
        // still the best record we have.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
    /// Registers what takes back a state change this request just made (see
    /// `Broker::commit`).
    pub fn undo_with(&self, undo: crate::action::Undo) {
        self.set(|e| e.undo.push(undo));
    }
    /// The scope of a `/v1` request, which `Broker::commit` writes once the response is
    /// known: a lease minted in process may then be written with the record.
    pub fn for_request(mut event: AuditEvent) -> Self {
        event.commits_at_end = true;
        Self::new(event)
    }
    pub fn commits_at_end(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .commits_at_end
    }
    /// Reads the event in place (no copy of it).
    pub fn read<R>(&self, f: impl FnOnce(&AuditEvent) -> R) -> R {
        f(&self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub fn snapshot(&self) -> AuditEvent {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests;
