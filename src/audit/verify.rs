//! Verifying a log or a rotated set as one hash chain, optionally against anchors.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::{ChainHead, GENESIS, ROTATED_KIND};

/// Length of the `,"hash":"<64 hex>"}` that closes every record.
const HASH_SUFFIX_LEN: usize = r#","hash":""#.len() + 64 + 2;

pub(super) struct Checked {
    pub(super) seq: u64,
    pub(super) prev: String,
    pub(super) hash: String,
    pub(super) kind: String,
    pub(super) node: String,
}

pub(super) fn check_record(line: &str) -> Result<Checked, String> {
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
