//! `[providers.aws]`: the raw TOML shape and its validated form, one conversion per
//! sub-structure.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

use super::MIN_SESSION_SECS;
use crate::provider::RateLimit;

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
pub(super) fn role_name(arn: &str) -> Option<&str> {
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

/// A duration key, its parse error named by the key.
fn duration(key: &'static str, v: &str) -> Result<Duration, CfgErr> {
    crate::duration::parse(v).map_err(|m| (key, m.to_string()))
}

fn region(raw: &str) -> Result<(), CfgErr> {
    let ok = !raw.is_empty()
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(("providers.aws.region", format!("{raw:?}")))
    }
}

impl AwsRevocation {
    fn from_raw(raw: &str) -> Result<Self, CfgErr> {
        match raw {
            "deny_policy" => Ok(Self::DenyPolicy),
            "expires_only" => Ok(Self::ExpiresOnly),
            other => Err((
                "providers.aws.revocation",
                format!("{other:?}: expected \"deny_policy\" or \"expires_only\""),
            )),
        }
    }
}

impl OnPolicyFull {
    fn from_raw(raw: &str) -> Result<Self, CfgErr> {
        match raw {
            "wait" => Ok(Self::Wait),
            "issued_before_deny" => Ok(Self::IssuedBeforeDeny),
            other => Err((
                "providers.aws.on_policy_full",
                format!("{other:?}: expected \"wait\" or \"issued_before_deny\""),
            )),
        }
    }
}

fn deny_policy_name(raw: &str) -> Result<(), CfgErr> {
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err((
            "providers.aws.deny_policy_name",
            "1..=128 of [A-Za-z0-9+=,.@_-]".into(),
        ))
    }
}

fn reconcile_interval(raw: &str) -> Result<Duration, CfgErr> {
    let key = "providers.aws.reconcile_interval";
    let d = duration(key, raw)?;
    if d < Duration::from_secs(1) {
        return Err((key, "must be at least 1s".into()));
    }
    Ok(d)
}

fn min_session(raw: &str) -> Result<Duration, CfgErr> {
    let key = "providers.aws.min_session_duration";
    let d = duration(key, raw)?;
    if !(1..=MIN_SESSION_SECS).contains(&d.as_secs()) {
        return Err((
            key,
            "must be 1s..=15m (STS itself refuses less than 15m)".into(),
        ));
    }
    Ok(d)
}

impl AwsTarget {
    fn from_raw(name: &str, t: RawAwsTarget) -> Result<Self, CfgErr> {
        let role = role_name(&t.role_arn).ok_or_else(|| {
            (
                "providers.aws.targets.role_arn",
                format!("{name}: {:?} is not an IAM role ARN", t.role_arn),
            )
        })?;
        let key = "providers.aws.targets.max_session_duration";
        let max_session = duration(key, &t.max_session_duration)?;
        if !(3600..=43_200).contains(&max_session.as_secs()) {
            return Err((
                key,
                format!("{name}: must be 1h..=12h (the role's MaxSessionDuration)"),
            ));
        }
        Ok(Self {
            role_name: role.to_string(),
            role_arn: t.role_arn,
            max_session,
            external_id: t.external_id,
        })
    }
}

fn targets(raw: BTreeMap<String, RawAwsTarget>) -> Result<BTreeMap<String, AwsTarget>, CfgErr> {
    if raw.is_empty() {
        return Err((
            "providers.aws.targets",
            "at least one target is required".into(),
        ));
    }
    raw.into_iter()
        .map(|(name, t)| Ok((name.clone(), AwsTarget::from_raw(&name, t)?)))
        .collect()
}

impl AwsConfig {
    pub fn from_raw(raw: RawAws) -> Result<Self, CfgErr> {
        region(&raw.region)?;
        if let Some(u) = &raw.endpoint_url {
            crate::net::url_allowed(u, raw.allow_insecure_http)
                .map_err(|m| ("providers.aws.endpoint_url", m))?;
        }
        let revocation = AwsRevocation::from_raw(&raw.revocation)?;
        deny_policy_name(&raw.deny_policy_name)?;
        let on_policy_full = OnPolicyFull::from_raw(&raw.on_policy_full)?;
        let reconcile_interval = reconcile_interval(&raw.reconcile_interval)?;
        let min_session = min_session(&raw.min_session_duration)?;
        let rate = crate::provider::rate_limit(raw.rate_limit_per_second, raw.rate_limit_burst)
            .map_err(|m| ("providers.aws.rate_limit_per_second", m))?;
        let targets = targets(raw.targets)?;
        Ok(Self {
            region: raw.region,
            endpoint_url: raw.endpoint_url,
            revocation,
            deny_policy_name: raw.deny_policy_name,
            prune_interval: duration("providers.aws.prune_interval", &raw.prune_interval)?,
            on_policy_full,
            reconcile_interval,
            min_session,
            timeout: duration("providers.aws.timeout", &raw.timeout)?,
            rate,
            targets,
        })
    }
}
