//! The role's deny policy as a document: statements grouped by expiry, the
//! `issued_before` cut-off, and rendering the store's deny set to fit IAM's size limit.

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use time::OffsetDateTime;

use super::{CUTOFF_MEMBER_PREFIX, CUTOFF_PLACEHOLDER, CUTOFF_SID_PREFIX, DENY_SID_PREFIX};
use crate::provider::ProviderError;

/// The deny policy as Mayfly keeps it: its own statements by expiry, an optional
/// role-wide cut-off on `aws:TokenIssueTime`, and any other statements (left untouched).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DenyPolicy {
    groups: BTreeMap<i64, BTreeSet<String>>,
    /// Unix time: every session of the role issued before it is denied.
    pub(super) issued_before: Option<i64>,
    pub(super) foreign: Vec<Value>,
}

impl DenyPolicy {
    /// Parses a policy document as IAM returns it (URL-encoded JSON, or plain JSON).
    pub fn parse(doc: &str) -> Result<Self, String> {
        let text = if doc.trim_start().starts_with('{') {
            doc.to_string()
        } else {
            percent_encoding::percent_decode_str(doc)
                .decode_utf8()
                .map_err(|e| format!("deny policy is not URL-encoded UTF-8: {e}"))?
                .into_owned()
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("deny policy is not JSON: {e}"))?;
        let stmts = match v.get("Statement") {
            Some(Value::Array(a)) => a.clone(),
            Some(s @ Value::Object(_)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let mut out = Self::default();
        for s in stmts {
            let sid = s.get("Sid").and_then(Value::as_str).unwrap_or_default();
            let until = sid
                .strip_prefix(DENY_SID_PREFIX)
                .and_then(|t| t.parse::<i64>().ok());
            let leases = s
                .pointer("/Condition/StringEquals/aws:PrincipalTag~1mayfly:lease")
                .map(|v| match v {
                    Value::String(one) => vec![one.clone()],
                    other => {
                        serde_json::from_value::<Vec<String>>(other.clone()).unwrap_or_default()
                    }
                });
            let cutoff = sid
                .strip_prefix(CUTOFF_SID_PREFIX)
                .and_then(|t| t.parse::<i64>().ok())
                .filter(|_| {
                    s.pointer("/Condition/DateLessThan/aws:TokenIssueTime")
                        .is_some_and(Value::is_string)
                });
            match (until, leases, cutoff) {
                (Some(t), Some(l), _) => out.groups.entry(t).or_default().extend(l),
                (_, _, Some(t)) => out.issued_before = out.issued_before.max(Some(t)),
                _ => out.foreign.push(s),
            }
        }
        Ok(out)
    }

    /// Denies sessions tagged `lease` until `until` (rounded up to the minute, so
    /// leases group into few statements).
    pub fn add(&mut self, lease: &str, until: i64) {
        let until = round_up_minute(until);
        self.groups
            .entry(until)
            .or_default()
            .insert(lease.to_string());
    }

    pub fn contains(&self, lease: &str) -> bool {
        self.groups.values().any(|l| l.contains(lease))
    }

    /// Every lease id denied, whatever its group.
    pub fn leases(&self) -> BTreeSet<&str> {
        self.groups
            .values()
            .flat_map(|l| l.iter().map(String::as_str))
            .collect()
    }

    pub fn issued_before(&self) -> Option<i64> {
        self.issued_before
    }

    /// Drops statements whose sessions have all expired. Returns how many.
    pub fn prune(&mut self, now: i64) -> usize {
        let before = self.groups.len();
        self.groups.retain(|until, _| *until > now);
        before - self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.issued_before.is_none() && self.foreign.is_empty()
    }

    /// The earliest time one of Mayfly's statements expires (room frees up then).
    pub(super) fn next_expiry(&self) -> Option<i64> {
        self.groups.keys().next().copied()
    }

    pub fn render(&self) -> String {
        let mut stmts = self.foreign.clone();
        if let Some(t) = self.issued_before {
            stmts.push(cutoff_statement(t));
        }
        for (until, leases) in &self.groups {
            stmts.push(json!({
                "Sid": format!("{DENY_SID_PREFIX}{until}"),
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:PrincipalTag/mayfly:lease": leases}},
            }));
        }
        json!({"Version": "2012-10-17", "Statement": stmts}).to_string()
    }
}

pub(super) fn round_up_minute(t: i64) -> i64 {
    (t + 59).div_euclid(60) * 60
}

/// `Deny *` to every session of the role whose token was issued before unix time `t`.
pub(super) fn cutoff_statement(t: i64) -> Value {
    let at = OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    json!({
        "Sid": format!("{CUTOFF_SID_PREFIX}{t}"),
        "Effect": "Deny",
        "Action": "*",
        "Resource": "*",
        "Condition": {"DateLessThan": {"aws:TokenIssueTime": at}},
    })
}

/// A role's deny policy as the store says it must be, fitted to IAM's size limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub policy: DenyPolicy,
    /// Lease ids the policy denies.
    pub written: BTreeSet<String>,
    /// Lease ids that did not fit, in the order they were added (first in, first out).
    pub waiting: Vec<String>,
}

/// Renders a role's deny policy from its deny set in the store (`entries`, in the order
/// they were added) beside the statements that are not Mayfly's (`foreign`, kept as IAM
/// holds them). The newest unexpired cut-off comes first; then lease entries in order,
/// as many as fit in `max` characters. Taking a *prefix* of that order keeps every entry
/// once written: later renderings only lose entries that expired, so an entry that did
/// not fit can never push out one that did.
pub fn render_from_store(
    entries: &[crate::lease::DenyEntry],
    foreign: Vec<Value>,
    max: usize,
) -> Result<Rendered, ProviderError> {
    let mut base = DenyPolicy {
        foreign,
        ..DenyPolicy::default()
    };
    base.issued_before = entries
        .iter()
        .filter_map(|e| {
            e.member
                .strip_prefix(CUTOFF_MEMBER_PREFIX)?
                .parse::<i64>()
                .ok()
        })
        .max();
    let leases: Vec<&crate::lease::DenyEntry> = entries
        .iter()
        .filter(|e| !e.member.starts_with('@'))
        .collect();
    let with = |k: usize| {
        let mut p = base.clone();
        for e in &leases[..k] {
            p.add(&e.member, e.until.unix_timestamp());
        }
        p
    };
    // Room for a cut-off statement is always kept, so that adding one (the
    // `issued_before_deny` fallback) never pushes out an entry already written.
    let reserve = if base.issued_before.is_some() {
        0
    } else {
        cutoff_statement(CUTOFF_PLACEHOLDER).to_string().len() + 1
    };
    let fits = |k: usize| with(k).render().len() + reserve <= max;
    if !fits(0) {
        return Err(ProviderError::Revoke(format!(
            "the deny policy's other statements alone exceed {max} characters"
        )));
    }
    // Size grows with every entry added, so the entries that fit are a prefix: find its
    // length by bisection instead of rendering once per entry.
    let (mut lo, mut hi) = (0, leases.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(Rendered {
        policy: with(lo),
        written: leases[..lo].iter().map(|e| e.member.clone()).collect(),
        waiting: leases[lo..].iter().map(|e| e.member.clone()).collect(),
    })
}
