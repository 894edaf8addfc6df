//! The `aws` provider: STS `AssumeRole` sessions cut to the grant.
//!
//! Each credential is an `AssumeRole` into the target's role with an inline session
//! policy allowing exactly the grant's actions on its resources, session tags
//! `mayfly:task` and `mayfly:lease`, `SourceIdentity` derived from the principal, and
//! `RoleSessionName` = the lease id, for `max(900 s, lease TTL)`.
//!
//! STS sessions cannot be revoked one by one. With `revocation = "deny_policy"` Mayfly
//! keeps an inline policy on the role that denies everything to sessions tagged with a
//! revoked lease id, grouped in statements by the time the last of their sessions dies,
//! and drops each statement once that time has passed. The lease id is known before the
//! session exists, so even a session minted just before a crash can be denied. With
//! `revocation = "expires_only"` a revoked lease reports when its session dies.
//!
//! The lease store, not IAM, says what the policy must hold: a revocation records its
//! entry in the role's deny set first, and every write renders the whole document from
//! that set, as the one writer of the role (a fenced lock in the store). A reconciler on
//! every replica compares IAM with the rendering each `reconcile_interval` and rewrites
//! on drift. When the entries outgrow IAM's size limit, `on_policy_full` either defers
//! the surplus (back-pressure) or denies every session issued before now.

use async_trait::async_trait;
use aws_sdk_sts::error::ProvideErrorMetadata;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use super::{CredentialProvider, MintRequest, Minted, ProviderError, RateLimit, Revocation};
use crate::audit::{AuditEvent, AuditLog};
use crate::identity::Principal;
use crate::lease::{Lease, LeaseStore};
use crate::secret::{Secret, fingerprint};
use crate::task::ProviderKind;

/// STS limit on the plaintext of an inline session policy.
pub const MAX_SESSION_POLICY_CHARS: usize = 2048;
/// IAM limit on the inline policies of one role, together.
pub const MAX_ROLE_POLICY_CHARS: usize = 10_240;
/// STS floor on `DurationSeconds`.
pub const MIN_SESSION_SECS: u64 = 900;
const DENY_SID_PREFIX: &str = "MayflyRevokedUntil";
const CUTOFF_SID_PREFIX: &str = "MayflyIssuedBefore";
/// A cut-off time of the same rendered length as any real one until 2286.
const CUTOFF_PLACEHOLDER: i64 = 2_000_000_000;
/// Deny-set members that are not lease ids start with `@`; lease ids never do.
const CUTOFF_MEMBER_PREFIX: &str = "@issued_before:";

// ---------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: String,
    /// One endpoint for both STS and IAM (an emulator). Leave out on AWS: the SDK picks
    /// the regional STS endpoint and the global IAM one.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// `deny_policy` (revoked sessions are denied through an inline role policy) or
    /// `expires_only` (a revoked session keeps working until it expires).
    #[serde(default = "default_revocation")]
    pub revocation: String,
    #[serde(default = "default_policy_name")]
    pub deny_policy_name: String,
    /// How often expired deny statements are pruned (besides at every revocation).
    #[serde(default = "default_prune")]
    pub prune_interval: String,
    /// What a revocation does when the role's deny policy is full: `wait` (stay
    /// `revoking`, retried as entries expire) or `issued_before_deny` (deny every session
    /// of the role issued before now).
    #[serde(default = "default_on_full")]
    pub on_policy_full: String,
    /// How often every replica compares IAM's deny policy with the store's rendering.
    #[serde(default = "default_reconcile")]
    pub reconcile_interval: String,
    /// The shortest session Mayfly asks STS for. STS refuses less than 15 minutes; a
    /// lower value is only for emulators (tests that need sessions to die quickly).
    #[serde(default = "default_min_session")]
    pub min_session_duration: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default = "default_rate")]
    pub rate_limit_per_second: f64,
    #[serde(default = "default_burst")]
    pub rate_limit_burst: f64,
    pub targets: BTreeMap<String, RawAwsTarget>,
}

fn default_revocation() -> String {
    "deny_policy".into()
}
fn default_policy_name() -> String {
    "mayfly-revoked-sessions".into()
}
fn default_prune() -> String {
    "5m".into()
}
fn default_on_full() -> String {
    "wait".into()
}
fn default_reconcile() -> String {
    "60s".into()
}
fn default_min_session() -> String {
    "15m".into()
}
fn default_timeout() -> String {
    "10s".into()
}
fn default_rate() -> f64 {
    // STS allows ~600 AssumeRole/s per account and region; leave headroom for others.
    500.0
}
fn default_burst() -> f64 {
    100.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsTarget {
    pub role_arn: String,
    /// The role's `MaxSessionDuration` (1h–12h); a lease longer than this is refused.
    #[serde(default = "default_max_session")]
    pub max_session_duration: String,
    #[serde(default)]
    pub external_id: Option<String>,
}

fn default_max_session() -> String {
    "1h".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsRevocation {
    DenyPolicy,
    ExpiresOnly,
}

/// What happens when a role's deny policy has no room for another entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPolicyFull {
    /// The revocation stays `revoking` (back-pressure, not a failed attempt) and is
    /// retried as entries expire; it never becomes `irrevocable` for lack of room.
    Wait,
    /// Deny every session of the role issued before now (`aws:TokenIssueTime`): kills
    /// the surplus and every innocent session of the role minted before that time.
    IssuedBeforeDeny,
}

#[derive(Debug, Clone)]
pub struct AwsTarget {
    pub role_arn: String,
    pub role_name: String,
    pub max_session: Duration,
    pub external_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub region: String,
    pub endpoint_url: Option<String>,
    pub revocation: AwsRevocation,
    pub deny_policy_name: String,
    pub prune_interval: Duration,
    pub on_policy_full: OnPolicyFull,
    pub reconcile_interval: Duration,
    pub min_session: Duration,
    pub timeout: Duration,
    pub rate: Option<RateLimit>,
    pub targets: BTreeMap<String, AwsTarget>,
}

type CfgErr = (&'static str, String);

/// `arn:aws:iam::123456789012:role/path/name` → `name`.
fn role_name(arn: &str) -> Option<&str> {
    let rest = arn.strip_prefix("arn:")?;
    let mut parts = rest.splitn(5, ':');
    let (_partition, service, _region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if service != "iam" || account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let name = resource.strip_prefix("role/")?.rsplit('/').next()?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    ok.then_some(name)
}

impl AwsConfig {
    pub fn from_raw(raw: RawAws) -> Result<Self, CfgErr> {
        let e = |k: &'static str, m: String| (k, m);
        if raw.region.is_empty()
            || !raw
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(e("providers.aws.region", format!("{:?}", raw.region)));
        }
        if let Some(u) = &raw.endpoint_url {
            crate::net::url_allowed(u, raw.allow_insecure_http)
                .map_err(|m| e("providers.aws.endpoint_url", m))?;
        }
        let revocation = match raw.revocation.as_str() {
            "deny_policy" => AwsRevocation::DenyPolicy,
            "expires_only" => AwsRevocation::ExpiresOnly,
            other => {
                return Err(e(
                    "providers.aws.revocation",
                    format!("{other:?}: expected \"deny_policy\" or \"expires_only\""),
                ));
            }
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 128
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
        };
        if !name_ok(&raw.deny_policy_name) {
            return Err(e(
                "providers.aws.deny_policy_name",
                "1..=128 of [A-Za-z0-9+=,.@_-]".into(),
            ));
        }
        let d =
            |k: &'static str, v: &str| crate::duration::parse(v).map_err(|m| e(k, m.to_string()));
        let on_policy_full = match raw.on_policy_full.as_str() {
            "wait" => OnPolicyFull::Wait,
            "issued_before_deny" => OnPolicyFull::IssuedBeforeDeny,
            other => {
                return Err(e(
                    "providers.aws.on_policy_full",
                    format!("{other:?}: expected \"wait\" or \"issued_before_deny\""),
                ));
            }
        };
        let reconcile_interval = d("providers.aws.reconcile_interval", &raw.reconcile_interval)?;
        if reconcile_interval < Duration::from_secs(1) {
            return Err(e(
                "providers.aws.reconcile_interval",
                "must be at least 1s".into(),
            ));
        }
        let min_session = d(
            "providers.aws.min_session_duration",
            &raw.min_session_duration,
        )?;
        if !(1..=MIN_SESSION_SECS).contains(&min_session.as_secs()) {
            return Err(e(
                "providers.aws.min_session_duration",
                "must be 1s..=15m (STS itself refuses less than 15m)".into(),
            ));
        }
        let rate = super::rate_limit(raw.rate_limit_per_second, raw.rate_limit_burst)
            .map_err(|m| e("providers.aws.rate_limit_per_second", m))?;
        if raw.targets.is_empty() {
            return Err(e(
                "providers.aws.targets",
                "at least one target is required".into(),
            ));
        }
        let mut targets = BTreeMap::new();
        for (name, t) in raw.targets {
            let role = role_name(&t.role_arn).ok_or_else(|| {
                e(
                    "providers.aws.targets.role_arn",
                    format!("{name}: {:?} is not an IAM role ARN", t.role_arn),
                )
            })?;
            let max_session = d(
                "providers.aws.targets.max_session_duration",
                &t.max_session_duration,
            )?;
            if !(3600..=43_200).contains(&max_session.as_secs()) {
                return Err(e(
                    "providers.aws.targets.max_session_duration",
                    format!("{name}: must be 1h..=12h (the role's MaxSessionDuration)"),
                ));
            }
            targets.insert(
                name,
                AwsTarget {
                    role_name: role.to_string(),
                    role_arn: t.role_arn,
                    max_session,
                    external_id: t.external_id,
                },
            );
        }
        Ok(Self {
            region: raw.region,
            endpoint_url: raw.endpoint_url,
            revocation,
            deny_policy_name: raw.deny_policy_name,
            prune_interval: d("providers.aws.prune_interval", &raw.prune_interval)?,
            on_policy_full,
            reconcile_interval,
            min_session,
            timeout: d("providers.aws.timeout", &raw.timeout)?,
            rate,
            targets,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Pure parts: session policy, duration, source identity, deny policy

/// The inline session policy for a grant, compact JSON. Refuses (never widens) when it
/// would exceed STS's limit, and refuses an empty resource list rather than `*`.
pub fn session_policy(
    actions: &BTreeSet<String>,
    resources: &BTreeSet<String>,
) -> Result<String, ProviderError> {
    for a in actions {
        let ok = a.split_once(':').is_some_and(|(svc, op)| {
            !svc.is_empty()
                && svc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !op.is_empty()
                && op.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'*')
        });
        if !ok {
            return Err(ProviderError::InvalidGrant(format!(
                "{a:?} is not an IAM action (service:Action)"
            )));
        }
    }
    if resources.is_empty() {
        return Err(ProviderError::InvalidGrant(
            "an aws grant must name its resources (ARNs, or \"*\" explicitly)".into(),
        ));
    }
    if let Some(r) = resources
        .iter()
        .find(|r| *r != "*" && !r.starts_with("arn:"))
    {
        return Err(ProviderError::InvalidGrant(format!(
            "resource {r:?} is not an ARN"
        )));
    }
    // Scope validation refuses these already; the policy is the last place a widened
    // grant could slip through, so check again where it is written.
    if let Some(r) = resources
        .iter()
        .find(|r| r.contains(crate::task::IAM_RESOURCE_METACHARS))
    {
        return Err(ProviderError::InvalidGrant(format!(
            "resource {r:?} holds an IAM wildcard or policy variable"
        )));
    }
    let doc = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": actions,
            "Resource": resources,
        }]
    })
    .to_string();
    if doc.len() > MAX_SESSION_POLICY_CHARS {
        return Err(ProviderError::PolicyTooLarge {
            what: "session policy",
            len: doc.len(),
            max: MAX_SESSION_POLICY_CHARS,
        });
    }
    Ok(doc)
}

/// `max(min, lease TTL)` (`min` is STS's 900 s floor outside tests), refused when above
/// the role's maximum.
pub fn session_secs(lease: &Lease, min: Duration, max: Duration) -> Result<u64, ProviderError> {
    let ttl = u64::try_from((lease.expires_at - lease.issued_at).whole_seconds()).unwrap_or(0);
    let secs = ttl.max(min.as_secs());
    if secs > max.as_secs() {
        return Err(ProviderError::InvalidGrant(format!(
            "lease TTL {ttl} s exceeds the role's maximum session of {} s",
            max.as_secs()
        )));
    }
    Ok(secs)
}

/// `SourceIdentity` (2–64 of `[A-Za-z0-9_+=,.@-]`) for a principal. A SPIFFE ID maps
/// one-to-one (`spiffe://td/a/b` → `td+a+b`, `+` never occurs in SPIFFE IDs) when it fits;
/// anything else is a readable prefix plus a digest of the whole principal.
pub fn source_identity(p: &Principal) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c);
    if let Principal::Spiffe(id) = p {
        let s = id
            .as_str()
            .trim_start_matches("spiffe://")
            .replace('/', "+");
        if (2..=64).contains(&s.len()) && s.chars().all(allowed) {
            return s;
        }
    }
    let full = p.as_str();
    let readable: String = full
        .trim_start_matches("https://")
        .trim_start_matches("spiffe://")
        .chars()
        .map(|c| if allowed(c) { c } else { '-' })
        .take(41)
        .collect();
    let digest = hex::encode(Sha256::digest(full.as_bytes()));
    format!("{readable},{}", &digest[..22])
}

/// The deny policy as Mayfly keeps it: its own statements by expiry, an optional
/// role-wide cut-off on `aws:TokenIssueTime`, and any other statements (left untouched).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DenyPolicy {
    groups: BTreeMap<i64, BTreeSet<String>>,
    /// Unix time: every session of the role issued before it is denied.
    issued_before: Option<i64>,
    foreign: Vec<Value>,
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
    fn next_expiry(&self) -> Option<i64> {
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

fn round_up_minute(t: i64) -> i64 {
    (t + 59).div_euclid(60) * 60
}

/// `Deny *` to every session of the role whose token was issued before unix time `t`.
fn cutoff_statement(t: i64) -> Value {
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

// ---------------------------------------------------------------------------------------
// Provider

pub struct AwsProvider {
    cfg: AwsConfig,
    sts: aws_sdk_sts::Client,
    iam: aws_sdk_iam::Client,
    /// The source of truth for what each role's deny policy must hold, and the home of
    /// the role locks every replica shares.
    store: Arc<dyn LeaseStore>,
    audit: AuditLog,
    roles: BTreeMap<String, RoleState>,
}

/// What this process knows about one role.
struct RoleState {
    /// The longest session any target of the role can mint.
    max_session: Duration,
    /// Serialises this process's syncs of the role (so only one of its tasks waits for
    /// the shared lock) and remembers what the last sync saw in IAM.
    synced: tokio::sync::Mutex<Option<Synced>>,
}

/// What a sync left in IAM, checked by reading it back.
#[derive(Debug, Clone, Default)]
struct Synced {
    written: BTreeSet<String>,
    issued_before: Option<i64>,
    next_expiry: Option<i64>,
}

impl Synced {
    /// Whether IAM denies `lease`'s session: it is listed, or a cut-off covers it (its
    /// `AssumeRole` was sent no later than `issued_at + timeout`, before the cut-off).
    fn denies(&self, lease: &Lease, timeout: Duration) -> bool {
        self.written.contains(lease.id.as_str())
            || self
                .issued_before
                .is_some_and(|t| covered_by_cutoff(lease, t, timeout))
    }
}

fn covered_by_cutoff(lease: &Lease, cutoff: i64, timeout: Duration) -> bool {
    (lease.issued_at + timeout).unix_timestamp() < cutoff
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncCause {
    Revocation,
    Reconcile,
}

/// A sync stopped because another replica took the role lock from under it.
enum SyncError {
    FenceLost,
    Provider(ProviderError),
}

impl From<ProviderError> for SyncError {
    fn from(e: ProviderError) -> Self {
        SyncError::Provider(e)
    }
}

fn store_err(e: crate::lease::StoreError) -> ProviderError {
    ProviderError::Unavailable(format!("lease store: {e}"))
}

fn deny_set(role: &str) -> String {
    format!("aws-deny:{role}")
}

fn role_lock(role: &str) -> String {
    format!("aws-deny:{role}")
}

/// Rounds of "lock, render, write, check the fence" before a sync gives up.
const FENCE_ROUNDS: usize = 3;

/// The text between `<tag>` and `</tag>` in an XML error body, if any.
fn xml_field<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = body[start..].find(&format!("</{tag}>"))?;
    Some(&body[start..start + len])
}

fn sdk_error<E>(
    what: &str,
    e: aws_sdk_sts::error::SdkError<E, aws_sdk_sts::config::http::HttpResponse>,
) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use aws_sdk_sts::error::SdkError;
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            let raw = se.raw();
            let status = raw.status().as_u16();
            // Some endpoints (emulators, proxies) answer in an error shape the SDK does not
            // parse: fall back to the XML body and the HTTP status.
            let body = raw
                .body()
                .bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let code = err
                .code()
                .or_else(|| xml_field(&body, "Code"))
                .unwrap_or("Unknown")
                .to_string();
            let message = err
                .message()
                .or_else(|| xml_field(&body, "Message"))
                .unwrap_or_default();
            let msg = super::http::reason(&format!("{what}: {code}: {message}"));
            match code.as_str() {
                "PackedPolicyTooLarge" | "PackedPolicyTooLargeException" => {
                    ProviderError::PolicyTooLarge {
                        what: "packed session policy and tags",
                        len: 0,
                        max: MAX_SESSION_POLICY_CHARS,
                    }
                }
                "AccessDenied"
                | "AccessDeniedException"
                | "UnauthorizedOperation"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "ExpiredTokenException"
                | "RegionDisabledException" => ProviderError::Denied(msg),
                "Throttling"
                | "ThrottlingException"
                | "ServiceUnavailable"
                | "InternalFailure"
                | "ServiceFailure" => ProviderError::Unavailable(msg),
                _ if status == 403 => ProviderError::Denied(msg),
                _ if status >= 500 || status == 429 => ProviderError::Unavailable(msg),
                _ => ProviderError::Rejected(msg),
            }
        }
        other => {
            ProviderError::Unavailable(format!("{what}: {}", super::http::error_chain(&other)))
        }
    }
}

impl AwsProvider {
    /// Builds the SDK clients from the default credential chain (environment, profile,
    /// web identity, instance metadata) and starts the deny-policy reconciler.
    pub async fn start(
        cfg: AwsConfig,
        store: Arc<dyn LeaseStore>,
        audit: AuditLog,
    ) -> Result<Arc<Self>, String> {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(cfg.region.clone()))
            .timeout_config(timeouts);
        if let Some(u) = &cfg.endpoint_url {
            loader = loader.endpoint_url(u);
        }
        let shared = loader.load().await;
        let mut roles: BTreeMap<String, RoleState> = BTreeMap::new();
        for t in cfg.targets.values() {
            let r = roles
                .entry(t.role_name.clone())
                .or_insert_with(|| RoleState {
                    max_session: t.max_session,
                    synced: tokio::sync::Mutex::default(),
                });
            r.max_session = r.max_session.max(t.max_session);
        }
        let p = Arc::new(Self {
            sts: aws_sdk_sts::Client::new(&shared),
            iam: aws_sdk_iam::Client::new(&shared),
            cfg,
            store,
            audit,
            roles,
        });
        if p.cfg.revocation == AwsRevocation::DenyPolicy {
            let weak = Arc::downgrade(&p);
            // Pruning and reconciling are one pass (render from the store, compare, write
            // on difference): run it at the shorter of the two intervals.
            let every = p.cfg.prune_interval.min(p.cfg.reconcile_interval);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(p) = weak.upgrade() else { break };
                    p.reconcile_all().await;
                }
            });
        }
        Ok(p)
    }

    pub fn rate(&self) -> Option<RateLimit> {
        self.cfg.rate
    }

    fn target(&self, lease: &Lease) -> Result<&AwsTarget, ProviderError> {
        self.cfg.targets.get(&lease.target).ok_or_else(|| {
            ProviderError::NotAllowed(format!("no aws target {:?} is configured", lease.target))
        })
    }

    /// When the session of `lease` dies at the latest (from the handle, or computed
    /// from the lease for a session minted just before a crash).
    fn session_end(&self, lease: &Lease) -> OffsetDateTime {
        if let Some(t) = lease
            .handle
            .as_ref()
            .and_then(|h| h.get("session_expires_at"))
            .and_then(Value::as_i64)
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        {
            return t;
        }
        let max = self
            .cfg
            .targets
            .get(&lease.target)
            .map_or(Duration::from_secs(43_200), |t| t.max_session);
        let secs = session_secs(lease, self.cfg.min_session, max).unwrap_or(max.as_secs());
        lease.issued_at + Duration::from_secs(secs) + self.cfg.timeout
    }

    async fn read_deny(&self, role: &str) -> Result<DenyPolicy, ProviderError> {
        match self
            .iam
            .get_role_policy()
            .role_name(role)
            .policy_name(&self.cfg.deny_policy_name)
            .send()
            .await
        {
            Ok(out) => DenyPolicy::parse(out.policy_document()).map_err(ProviderError::Revoke),
            Err(e) => {
                let missing = e
                    .as_service_error()
                    .is_some_and(|se| se.is_no_such_entity_exception());
                if missing {
                    Ok(DenyPolicy::default())
                } else {
                    Err(sdk_error("iam GetRolePolicy", e))
                }
            }
        }
    }

    async fn write_deny(&self, role: &str, policy: &DenyPolicy) -> Result<(), ProviderError> {
        if policy.is_empty() {
            return match self
                .iam
                .delete_role_policy()
                .role_name(role)
                .policy_name(&self.cfg.deny_policy_name)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_no_such_entity_exception()) =>
                {
                    Ok(())
                }
                Err(e) => Err(sdk_error("iam DeleteRolePolicy", e)),
            };
        }
        self.iam
            .put_role_policy()
            .role_name(role)
            .policy_name(&self.cfg.deny_policy_name)
            .policy_document(policy.render())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("iam PutRolePolicy", e))
    }

    /// How long a sync may hold the role lock: a store read, three IAM reads and one
    /// write, each bounded by `timeout`, with room to spare. A holder slower than this
    /// finds its fencing token gone and redoes its sync.
    fn lock_ttl(&self) -> Duration {
        self.cfg.timeout * 6 + Duration::from_secs(5)
    }

    /// Waits for the role lock (polling the shared store) up to one lock lifetime, so a
    /// lock left by a crashed holder lapses first. Busy past that: back-pressure.
    async fn lock_role(&self, role: &str) -> Result<u64, ProviderError> {
        let name = role_lock(role);
        let deadline = tokio::time::Instant::now() + self.lock_ttl();
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(token) = self
                .store
                .lock_acquire(&name, self.lock_ttl())
                .await
                .map_err(store_err)?
            {
                return Ok(token);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::Deferred {
                    reason: format!("deny policy of role {role} is locked by another writer"),
                    retry_after_secs: 1,
                });
            }
            // Jitter from the clock's sub-millisecond digits keeps replicas from polling
            // in step.
            let jitter = u64::from(OffsetDateTime::now_utc().nanosecond() % 5_000_000);
            tokio::time::sleep(pause + Duration::from_nanos(jitter)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Makes IAM's copy of `role`'s deny policy what the store says it must be, as the
    /// one writer of the role (its lock in the shared store). A writer whose lock lapsed
    /// mid-way (its fencing token no longer holds after its write) may have overwritten a
    /// newer writer: it takes the lock again and redoes the sync from the store.
    async fn sync_role(&self, role: &str, cause: SyncCause) -> Result<Synced, ProviderError> {
        let state = self
            .roles
            .get(role)
            .ok_or_else(|| ProviderError::NotAllowed(format!("no aws target uses role {role}")))?;
        for _ in 0..FENCE_ROUNDS {
            let token = self.lock_role(role).await?;
            let out = self.sync_locked(role, state, token, cause).await;
            if let Err(e) = self.store.lock_release(&role_lock(role), token).await {
                tracing::warn!(role, error = %e, "role lock release failed; it lapses on its own");
            }
            match out {
                Ok(s) => return Ok(s),
                Err(SyncError::Provider(e)) => return Err(e),
                Err(SyncError::FenceLost) => {
                    metrics::counter!("mayfly_aws_role_lock_fence_lost_total").increment(1);
                    tracing::warn!(
                        role,
                        token,
                        "role lock lapsed during a deny-policy write; redoing it"
                    );
                }
            }
        }
        Err(ProviderError::Revoke(format!(
            "lost the lock of role {role} {FENCE_ROUNDS} times while writing its deny policy"
        )))
    }

    async fn sync_locked(
        &self,
        role: &str,
        state: &RoleState,
        token: u64,
        cause: SyncCause,
    ) -> Result<Synced, SyncError> {
        let set = deny_set(role);
        let now = OffsetDateTime::now_utc();
        self.store.deny_prune(&set, now).await.map_err(store_err)?;
        let entries = self.store.deny_list(&set, now).await.map_err(store_err)?;
        let mut iam = self.read_deny(role).await?;
        let mut want = render_from_store(&entries, iam.foreign.clone(), MAX_ROLE_POLICY_CHARS)?;
        if !want.waiting.is_empty() {
            metrics::counter!("mayfly_aws_deny_policy_full_total").increment(1);
            if self.cfg.on_policy_full == OnPolicyFull::IssuedBeforeDeny
                && self
                    .uncovered(&want.waiting, want.policy.issued_before)
                    .await?
            {
                self.cut_off(role, state, &want.waiting, now).await?;
                let entries = self.store.deny_list(&set, now).await.map_err(store_err)?;
                want = render_from_store(&entries, iam.foreign.clone(), MAX_ROLE_POLICY_CHARS)?;
            }
        }
        metrics::gauge!("mayfly_aws_deny_policy_entries", "role" => role.to_string())
            .set(want.written.len() as f64);
        metrics::gauge!("mayfly_aws_deny_policy_waiting", "role" => role.to_string())
            .set(want.waiting.len() as f64);
        if iam != want.policy {
            // Expired statements still in IAM are not drift; anything else is, when a
            // periodic pass finds it.
            iam.prune(now.unix_timestamp());
            if cause == SyncCause::Reconcile {
                self.report_drift(role, &iam, &want).await;
            }
            self.write_deny(role, &want.policy).await?;
            if !self
                .store
                .lock_holds(&role_lock(role), token)
                .await
                .map_err(store_err)?
            {
                return Err(SyncError::FenceLost);
            }
            // IAM is eventually consistent: give the write a moment to show.
            let mut stuck = true;
            for i in 0..3u32 {
                if self.read_deny(role).await? == want.policy {
                    stuck = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200) * (i + 1)).await;
            }
            if stuck {
                return Err(SyncError::Provider(ProviderError::Revoke(format!(
                    "the deny policy written to role {role} does not read back as written"
                ))));
            }
            metrics::counter!("mayfly_aws_deny_policy_writes_total", "role" => role.to_string())
                .increment(1);
        }
        Ok(Synced {
            next_expiry: want.policy.next_expiry(),
            issued_before: want.policy.issued_before,
            written: want.written,
        })
    }

    /// Whether some waiting lease is not yet covered by the cut-off in force.
    async fn uncovered(
        &self,
        waiting: &[String],
        cutoff: Option<i64>,
    ) -> Result<bool, ProviderError> {
        let Some(cutoff) = cutoff else {
            return Ok(true);
        };
        for id in waiting {
            let lease = match id.parse::<crate::task::LeaseId>() {
                Ok(id) => self.store.lease(&id).await.map_err(store_err)?,
                Err(_) => None,
            };
            // A member that is no lease of this store names no session Mayfly minted:
            // nothing to cut off for it (and no reason to move the cut-off every pass).
            if lease.is_some_and(|l| !covered_by_cutoff(&l, cutoff, self.cfg.timeout)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The `issued_before_deny` fallback: records a cut-off at `now` in the store (it
    /// lasts until every session issued before it has died), audits and alerts.
    async fn cut_off(
        &self,
        role: &str,
        state: &RoleState,
        waiting: &[String],
        now: OffsetDateTime,
    ) -> Result<(), ProviderError> {
        let t = now.unix_timestamp();
        let until = now + state.max_session + self.cfg.timeout;
        self.store
            .deny_add(
                &deny_set(role),
                &format!("{CUTOFF_MEMBER_PREFIX}{t}"),
                until,
            )
            .await
            .map_err(store_err)?;
        metrics::counter!("mayfly_aws_issued_before_deny_total", "role" => role.to_string())
            .increment(1);
        tracing::error!(
            role,
            issued_before = t,
            waiting = waiting.len(),
            "aws deny policy full: denying every session of the role issued before now (on_policy_full = issued_before_deny)"
        );
        let mut e = AuditEvent::new("aws.deny_policy.issued_before");
        e.provider = Some("aws");
        e.outcome = Some(format!("issued_before {t}"));
        e.detail = Some(format!(
            "role {role}: deny policy full with {} revocation(s) waiting; every session of the role issued before {t} is denied until {}",
            waiting.len(),
            until.unix_timestamp()
        ));
        e.revoked = waiting.to_vec();
        self.record(e).await;
        Ok(())
    }

    /// A periodic pass found IAM's policy different from the store's rendering: audit
    /// what a person or another tool changed (revoked leases missing from IAM, entries
    /// the store does not hold, a cut-off added or removed), and count it.
    async fn report_drift(&self, role: &str, iam: &DenyPolicy, want: &Rendered) {
        let have = iam.leases();
        let mut missing = Vec::new();
        for id in want.written.iter().filter(|id| !have.contains(id.as_str())) {
            // An entry whose revocation is still in flight is not drift yet.
            let revoked = match id.parse::<crate::task::LeaseId>() {
                Ok(lid) => self
                    .store
                    .lease(&lid)
                    .await
                    .ok()
                    .flatten()
                    .is_none_or(|l| l.state != crate::lease::LeaseState::Revoking),
                Err(_) => true,
            };
            if revoked {
                missing.push(id.clone());
            }
        }
        let unknown = have
            .iter()
            .filter(|id| !want.written.contains(**id))
            .count();
        let cutoff_changed = iam.issued_before() != want.policy.issued_before();
        if missing.is_empty() && unknown == 0 && !cutoff_changed {
            return;
        }
        metrics::counter!("mayfly_aws_deny_policy_drift_total", "role" => role.to_string())
            .increment(1);
        tracing::warn!(
            role,
            missing = missing.len(),
            unknown,
            cutoff_changed,
            "aws deny policy drifted from the store; rewriting it"
        );
        let mut e = AuditEvent::new("aws.deny_policy.drift");
        e.provider = Some("aws");
        e.outcome = Some("rewritten".into());
        e.detail = Some(format!(
            "role {role}: {} revoked entr(ies) missing from IAM restored, {unknown} unknown entr(ies) removed{}",
            missing.len(),
            if cutoff_changed {
                ", issued-before cut-off restored"
            } else {
                ""
            }
        ));
        e.revoked = missing;
        self.record(e).await;
    }

    async fn record(&self, event: AuditEvent) {
        // The IAM change is made; failing to record it must not undo it. Logged loudly.
        if let Err(e) = self.audit.write(event).await {
            tracing::error!(error = %e, "audit record of an aws deny-policy change could not be written");
        }
    }

    /// Denies the session of `lease` until `until`: records the entry in the store
    /// first (so no later rendering can drop it), then syncs the role's policy, unless a
    /// sync of this process already wrote it.
    async fn deny(
        &self,
        lease: &Lease,
        role: &str,
        until: OffsetDateTime,
    ) -> Result<(), ProviderError> {
        let state = self
            .roles
            .get(role)
            .ok_or_else(|| ProviderError::NotAllowed(format!("no aws target uses role {role}")))?;
        // Stored with the expiry of the statement it lands in (rounded up to the
        // minute), so the store and IAM drop it at the same moment.
        let until = OffsetDateTime::from_unix_timestamp(round_up_minute(until.unix_timestamp()))
            .map_err(|e| ProviderError::Revoke(e.to_string()))?;
        self.store
            .deny_add(&deny_set(role), lease.id.as_str(), until)
            .await
            .map_err(store_err)?;
        let mut synced = state.synced.lock().await;
        // A sync that started after the entry was added and read it back covers it.
        if synced
            .as_ref()
            .is_some_and(|s| s.denies(lease, self.cfg.timeout))
        {
            return Ok(());
        }
        let fresh = self.sync_role(role, SyncCause::Revocation).await?;
        let denied = fresh.denies(lease, self.cfg.timeout);
        let next = fresh.next_expiry;
        *synced = Some(fresh);
        if denied {
            return Ok(());
        }
        // No room: look again when the first statement expires, or after the next
        // reconcile pass (which admits waiting entries as soon as room frees), whichever
        // comes first.
        let reconcile = i64::try_from(self.cfg.reconcile_interval.as_secs()).unwrap_or(60);
        let wait = next
            .map_or(60, |t| t - OffsetDateTime::now_utc().unix_timestamp() + 1)
            .min(reconcile)
            .clamp(1, 60);
        Err(ProviderError::Deferred {
            reason: format!("deny policy of role {role} is full"),
            retry_after_secs: u64::try_from(wait).unwrap_or(60),
        })
    }

    /// One reconcile pass over every role (each replica runs it every interval).
    pub async fn reconcile_all(&self) {
        for (role, state) in &self.roles {
            let mut synced = state.synced.lock().await;
            match self.sync_role(role, SyncCause::Reconcile).await {
                Ok(s) => {
                    *synced = Some(s);
                    metrics::counter!("mayfly_aws_deny_policy_reconcile_total", "outcome" => "ok")
                        .increment(1);
                }
                Err(e) => {
                    metrics::counter!("mayfly_aws_deny_policy_reconcile_total", "outcome" => "error")
                        .increment(1);
                    tracing::warn!(role, error = %e, "aws deny-policy reconcile failed; retrying next tick");
                }
            }
        }
    }
}

#[async_trait]
impl CredentialProvider for AwsProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Aws
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        let lease = req.lease;
        let target = self.target(lease)?;
        let policy = session_policy(&lease.actions, &lease.resources)?;
        let secs = session_secs(lease, self.cfg.min_session, target.max_session)?;
        let tag = |k: &str, v: &str| {
            aws_sdk_sts::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(|e| ProviderError::Mint(e.to_string()))
        };
        let mut call = self
            .sts
            .assume_role()
            .role_arn(&target.role_arn)
            .role_session_name(lease.id.as_str())
            .policy(policy)
            .duration_seconds(i32::try_from(secs).unwrap_or(i32::MAX))
            .tags(tag("mayfly:task", lease.task_id.as_str())?)
            .tags(tag("mayfly:lease", lease.id.as_str())?)
            .source_identity(source_identity(req.caller.principal()));
        if let Some(x) = &target.external_id {
            call = call.external_id(x);
        }
        let out = call
            .send()
            .await
            .map_err(|e| sdk_error("sts AssumeRole", e))?;
        let c = out.credentials().ok_or_else(|| {
            ProviderError::Unavailable("sts AssumeRole returned no credentials".into())
        })?;
        let expires = OffsetDateTime::from_unix_timestamp(c.expiration().secs())
            .map_err(|e| ProviderError::Mint(e.to_string()))?;
        let expiration = expires
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| ProviderError::Mint(e.to_string()))?;
        Ok(Minted {
            fingerprint: fingerprint(c.session_token().as_bytes()),
            credential: Secret::new(json!({
                "Version": 1,
                "AccessKeyId": c.access_key_id(),
                "SecretAccessKey": c.secret_access_key(),
                "SessionToken": c.session_token(),
                "Expiration": expiration,
            })),
            handle: Some(json!({
                "role_arn": target.role_arn,
                "access_key_id": c.access_key_id(),
                "session_expires_at": expires.unix_timestamp(),
            })),
        })
    }

    async fn revoke(&self, lease: &Lease) -> Result<Revocation, ProviderError> {
        let end = self.session_end(lease);
        if end <= OffsetDateTime::now_utc() {
            return Ok(Revocation::Revoked);
        }
        match self.cfg.revocation {
            AwsRevocation::ExpiresOnly => Ok(Revocation::ExpiresOnly { at: end }),
            AwsRevocation::DenyPolicy => {
                let target = self.target(lease)?;
                self.deny(lease, &target.role_name, end).await?;
                Ok(Revocation::Revoked)
            }
        }
    }

    fn outlives_lease(&self, lease: &Lease) -> bool {
        self.session_end(lease) > lease.expires_at + Duration::from_secs(2)
    }

    async fn ready(&self) -> Result<(), ProviderError> {
        self.sts
            .get_caller_identity()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("sts GetCallerIdentity", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn session_policy_is_exactly_the_grant() {
        let doc = session_policy(
            &set(&["s3:GetObject", "s3:PutObject"]),
            &set(&["arn:aws:s3:::bucket/reports/*"]),
        )
        .expect("policy");
        let v: Value = serde_json::from_str(&doc).expect("json");
        assert_eq!(v["Statement"][0]["Effect"], "Allow");
        assert_eq!(
            v["Statement"][0]["Action"],
            json!(["s3:GetObject", "s3:PutObject"])
        );
        assert_eq!(
            v["Statement"][0]["Resource"],
            json!(["arn:aws:s3:::bucket/reports/*"])
        );
        assert!(!doc.contains(' '), "compact: {doc}");
    }

    #[test]
    fn session_policy_refuses_rather_than_widens() {
        let many: BTreeSet<String> = (0..60)
            .map(|i| format!("arn:aws:s3:::bucket-with-a-long-name/prefix/{i:04}/*"))
            .collect();
        match session_policy(&set(&["s3:GetObject"]), &many) {
            Err(ProviderError::PolicyTooLarge { len, max, .. }) => {
                assert!(len > max);
                assert_eq!(max, 2048);
            }
            other => panic!("expected PolicyTooLarge, got {other:?}"),
        }
        assert!(matches!(
            session_policy(&set(&["s3:GetObject"]), &BTreeSet::new()),
            Err(ProviderError::InvalidGrant(_))
        ));
        assert!(matches!(
            session_policy(&set(&["GetObject"]), &set(&["*"])),
            Err(ProviderError::InvalidGrant(_))
        ));
        assert!(matches!(
            session_policy(&set(&["s3:GetObject"]), &set(&["bucket"])),
            Err(ProviderError::InvalidGrant(_))
        ));
        for wild in ["arn:aws:s3:::reports/?", "arn:aws:s3:::${aws:username}/*"] {
            assert!(matches!(
                session_policy(&set(&["s3:GetObject"]), &set(&[wild])),
                Err(ProviderError::InvalidGrant(m)) if m.contains("IAM wildcard")
            ));
        }
    }

    #[test]
    fn source_identity_is_valid_and_distinct() {
        let valid = |s: &str| {
            (2..=64).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        };
        let a = Principal::parse("spiffe://dev.mayfly.local/agent/demo").expect("p");
        assert_eq!(source_identity(&a), "dev.mayfly.local+agent+demo");
        let long = Principal::parse(&format!("spiffe://example.org/{}", "x/".repeat(40) + "y"))
            .expect("p");
        let o1 = Principal::parse(
            "https://token.actions.githubusercontent.com#repo:acme/app:ref:refs/heads/main",
        )
        .expect("p");
        let o2 = Principal::parse(
            "https://token.actions.githubusercontent.com#repo:acme/app:ref:refs/heads/dev",
        )
        .expect("p");
        for p in [&a, &long, &o1, &o2] {
            assert!(valid(&source_identity(p)), "{}", source_identity(p));
        }
        assert_ne!(source_identity(&o1), source_identity(&o2));
    }

    #[test]
    fn role_names_from_arns() {
        assert_eq!(
            role_name("arn:aws:iam::123456789012:role/deploy"),
            Some("deploy")
        );
        assert_eq!(
            role_name("arn:aws:iam::123456789012:role/team/ci/deploy"),
            Some("deploy")
        );
        assert_eq!(role_name("arn:aws:iam::123456789012:user/deploy"), None);
        assert_eq!(role_name("arn:aws:s3:::bucket"), None);
        assert_eq!(role_name("arn:aws:iam::12:role/x"), None);
    }

    #[test]
    fn deny_policy_groups_prunes_and_round_trips() {
        let mut p = DenyPolicy::default();
        p.add("lse_a", 1_000);
        p.add("lse_b", 1_010);
        p.add("lse_c", 5_000);
        assert!(p.contains("lse_a") && p.contains("lse_c"));
        let doc = p.render();
        let encoded =
            percent_encoding::utf8_percent_encode(&doc, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let back = DenyPolicy::parse(&encoded).expect("parse");
        assert_eq!(back, p);
        let mut q = back;
        assert_eq!(q.prune(2_000), 1);
        assert!(!q.contains("lse_a") && !q.contains("lse_b") && q.contains("lse_c"));
        assert_eq!(q.prune(10_000), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn deny_policy_keeps_foreign_statements() {
        let doc = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Ops","Effect":"Deny","Action":"s3:*","Resource":"*"}]}"#;
        let mut p = DenyPolicy::parse(doc).expect("parse");
        p.add("lse_x", 100);
        p.prune(1_000);
        assert!(!p.is_empty());
        assert!(p.render().contains("\"Sid\":\"Ops\""));
    }

    fn entry(member: &str, until: i64, seq: u64) -> crate::lease::DenyEntry {
        crate::lease::DenyEntry {
            member: member.into(),
            until: OffsetDateTime::from_unix_timestamp(until).expect("time"),
            seq,
        }
    }

    #[test]
    fn rendering_from_the_store_fills_in_order_and_never_drops_a_written_entry() {
        let t0 = 1_900_000_000;
        // Sessions ending over several minutes, so entries spread over many statements.
        let entries: Vec<_> = (0..400u64)
            .map(|i| entry(&format!("lse_{i:032x}"), t0 + 60 * (i as i64 % 7), i + 1))
            .collect();
        let r = render_from_store(&entries, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
        assert!(r.policy.render().len() <= MAX_ROLE_POLICY_CHARS);
        assert!(
            r.written.len() > 200 && r.written.len() < 400,
            "{}",
            r.written.len()
        );
        assert_eq!(r.written.len() + r.waiting.len(), 400);
        // The written ones are exactly the first ones added; the rest wait in order.
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(r.written.contains(&e.member), i < r.written.len());
        }
        assert_eq!(r.waiting[0], entries[r.written.len()].member);
        // A later rendering with one more entry keeps every entry written before.
        let mut more = entries.clone();
        more.push(entry("lse_new", t0 + 9_999, 401));
        let r2 = render_from_store(&more, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
        assert!(r.written.is_subset(&r2.written));
        // Once the first statement expires, waiting entries move in, in order.
        let later: Vec<_> = more
            .iter()
            .filter(|e| e.until.unix_timestamp() > t0)
            .cloned()
            .collect();
        let r3 = render_from_store(&later, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
        assert!(r3.written.contains(&r.waiting[0]));
    }

    #[test]
    fn issued_before_cutoff_renders_parses_back_and_takes_the_newest() {
        let entries = vec![
            entry("@issued_before:1900000000", 1_900_050_000, 1),
            entry("lse_a", 1_900_000_900, 2),
            entry("@issued_before:1900000100", 1_900_050_100, 3),
        ];
        let r = render_from_store(&entries, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
        assert_eq!(r.policy.issued_before(), Some(1_900_000_100));
        assert_eq!(r.written, set(&["lse_a"]));
        let doc = r.policy.render();
        let v: Value = serde_json::from_str(&doc).expect("json");
        assert_eq!(
            v["Statement"][0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"],
            "2030-03-17T17:48:20Z"
        );
        assert_eq!(DenyPolicy::parse(&doc).expect("parse"), r.policy);
        // A statement that only looks like a cut-off (no issue-time condition) stays foreign.
        let fake = r#"{"Statement":[{"Sid":"MayflyIssuedBefore1","Effect":"Deny","Action":"*","Resource":"*"}]}"#;
        let p = DenyPolicy::parse(fake).expect("parse");
        assert_eq!(p.issued_before(), None);
        assert!(!p.is_empty());
    }

    #[test]
    fn a_lease_is_covered_by_a_cutoff_only_if_sent_before_it() {
        let now = OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("t");
        let mut lease = Lease::pending(
            &crate::task::TaskId::generate(),
            &Principal::parse("spiffe://a.test/agent/x").expect("p"),
            &crate::task::Grant {
                provider: ProviderKind::Aws,
                target: "deploy".into(),
                actions: set(&["s3:GetObject"]),
                resources: set(&["*"]),
            },
            now,
            now + Duration::from_secs(600),
        );
        let timeout = Duration::from_secs(10);
        assert!(!covered_by_cutoff(&lease, 1_900_000_010, timeout));
        assert!(covered_by_cutoff(&lease, 1_900_000_011, timeout));
        lease.issued_at = now + Duration::from_secs(5);
        assert!(!covered_by_cutoff(&lease, 1_900_000_011, timeout));
    }

    fn raw(extra: &str) -> RawAws {
        toml::from_str(&format!(
            "region = \"us-east-1\"\n{extra}\n[targets.t]\nrole_arn = \"arn:aws:iam::123456789012:role/deploy\"\n"
        ))
        .expect("toml")
    }

    #[test]
    fn policy_full_and_reconcile_settings_parse_with_safe_defaults() {
        let c = AwsConfig::from_raw(raw("")).expect("defaults");
        assert_eq!(c.on_policy_full, OnPolicyFull::Wait);
        assert_eq!(c.reconcile_interval, Duration::from_secs(60));
        assert_eq!(c.min_session, Duration::from_secs(900));
        let c = AwsConfig::from_raw(raw(
            "on_policy_full = \"issued_before_deny\"\nreconcile_interval = \"5s\"",
        ))
        .expect("fallback");
        assert_eq!(c.on_policy_full, OnPolicyFull::IssuedBeforeDeny);
        assert_eq!(c.reconcile_interval, Duration::from_secs(5));
        for (bad, key) in [
            ("on_policy_full = \"drop\"", "providers.aws.on_policy_full"),
            (
                "reconcile_interval = \"0s\"",
                "providers.aws.reconcile_interval",
            ),
            (
                "min_session_duration = \"1h\"",
                "providers.aws.min_session_duration",
            ),
        ] {
            match AwsConfig::from_raw(raw(bad)) {
                Err((k, _)) => assert_eq!(k, key, "{bad}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
    }
}
