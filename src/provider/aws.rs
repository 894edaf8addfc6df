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

use async_trait::async_trait;
use aws_sdk_sts::error::ProvideErrorMetadata;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use super::{CredentialProvider, MintRequest, Minted, ProviderError, RateLimit, Revocation};
use crate::identity::Principal;
use crate::lease::Lease;
use crate::secret::{Secret, fingerprint};
use crate::task::ProviderKind;

/// STS limit on the plaintext of an inline session policy.
pub const MAX_SESSION_POLICY_CHARS: usize = 2048;
/// IAM limit on the inline policies of one role, together.
pub const MAX_ROLE_POLICY_CHARS: usize = 10_240;
/// STS floor on `DurationSeconds`.
pub const MIN_SESSION_SECS: u64 = 900;
const DENY_SID_PREFIX: &str = "MayflyRevokedUntil";

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
            crate::config::url_allowed(u, raw.allow_insecure_http)
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

/// `max(900 s, lease TTL)`, refused when above the role's maximum.
pub fn session_secs(lease: &Lease, max: Duration) -> Result<u64, ProviderError> {
    let ttl = u64::try_from((lease.expires_at - lease.issued_at).whole_seconds()).unwrap_or(0);
    let secs = ttl.max(MIN_SESSION_SECS);
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

/// The deny policy as Mayfly keeps it: its own statements by expiry, and any other
/// statements (left untouched).
#[derive(Debug, Default, PartialEq)]
pub struct DenyPolicy {
    groups: BTreeMap<i64, BTreeSet<String>>,
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
            let until = s
                .get("Sid")
                .and_then(Value::as_str)
                .and_then(|sid| sid.strip_prefix(DENY_SID_PREFIX))
                .and_then(|t| t.parse::<i64>().ok());
            let leases = s
                .pointer("/Condition/StringEquals/aws:PrincipalTag~1mayfly:lease")
                .map(|v| match v {
                    Value::String(one) => vec![one.clone()],
                    other => {
                        serde_json::from_value::<Vec<String>>(other.clone()).unwrap_or_default()
                    }
                });
            match (until, leases) {
                (Some(t), Some(l)) => out.groups.entry(t).or_default().extend(l),
                _ => out.foreign.push(s),
            }
        }
        Ok(out)
    }

    /// Denies sessions tagged `lease` until `until` (rounded up to the minute, so
    /// leases group into few statements).
    pub fn add(&mut self, lease: &str, until: i64) {
        let until = (until + 59).div_euclid(60) * 60;
        self.groups
            .entry(until)
            .or_default()
            .insert(lease.to_string());
    }

    pub fn contains(&self, lease: &str) -> bool {
        self.groups.values().any(|l| l.contains(lease))
    }

    /// Drops statements whose sessions have all expired. Returns how many.
    pub fn prune(&mut self, now: i64) -> usize {
        let before = self.groups.len();
        self.groups.retain(|until, _| *until > now);
        before - self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.foreign.is_empty()
    }

    pub fn render(&self) -> String {
        let mut stmts = self.foreign.clone();
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

// ---------------------------------------------------------------------------------------
// Provider

pub struct AwsProvider {
    cfg: AwsConfig,
    sts: aws_sdk_sts::Client,
    iam: aws_sdk_iam::Client,
    /// One writer per role's deny policy in this process (IAM has no compare-and-set).
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

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
    /// web identity, instance metadata) and starts the deny-policy pruner.
    pub async fn start(cfg: AwsConfig) -> Result<Arc<Self>, String> {
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
        let locks = cfg
            .targets
            .values()
            .map(|t| (t.role_name.clone(), Arc::default()))
            .collect();
        let p = Arc::new(Self {
            sts: aws_sdk_sts::Client::new(&shared),
            iam: aws_sdk_iam::Client::new(&shared),
            cfg,
            locks,
        });
        if p.cfg.revocation == AwsRevocation::DenyPolicy {
            let weak = Arc::downgrade(&p);
            let every = p.cfg.prune_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(p) = weak.upgrade() else { break };
                    if let Err(e) = p.prune_all().await {
                        tracing::warn!(error = %e, "aws deny-policy prune failed; retrying next tick");
                    }
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
        let secs = session_secs(lease, max).unwrap_or(max.as_secs());
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
        let doc = policy.render();
        if doc.len() > MAX_ROLE_POLICY_CHARS {
            metrics::counter!("mayfly_aws_deny_policy_full_total").increment(1);
            return Err(ProviderError::Revoke(format!(
                "deny policy on role {role} would be {} characters (IAM allows {MAX_ROLE_POLICY_CHARS}); \
                 the revocation is retried as older entries expire",
                doc.len()
            )));
        }
        self.iam
            .put_role_policy()
            .role_name(role)
            .policy_name(&self.cfg.deny_policy_name)
            .policy_document(doc)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("iam PutRolePolicy", e))
    }

    /// Adds `lease` to the role's deny policy (pruning what has expired) and checks the
    /// write by reading it back, so a concurrent writer on another replica cannot have
    /// dropped it silently.
    async fn deny(&self, role: &str, lease: &str, until: i64) -> Result<(), ProviderError> {
        let lock = self.locks.get(role).cloned().unwrap_or_default();
        let _g = lock.lock().await;
        for _ in 0..3 {
            let mut p = self.read_deny(role).await?;
            p.prune(OffsetDateTime::now_utc().unix_timestamp());
            p.add(lease, until);
            self.write_deny(role, &p).await?;
            if self.read_deny(role).await?.contains(lease) {
                return Ok(());
            }
        }
        Err(ProviderError::Revoke(format!(
            "deny entry for {lease} on role {role} did not stick (concurrent writers)"
        )))
    }

    /// Drops expired deny statements from every role's policy.
    pub async fn prune_all(&self) -> Result<usize, ProviderError> {
        let mut dropped = 0;
        let roles: BTreeSet<&str> = self
            .cfg
            .targets
            .values()
            .map(|t| t.role_name.as_str())
            .collect();
        for role in roles {
            let lock = self.locks.get(role).cloned().unwrap_or_default();
            let _g = lock.lock().await;
            let mut p = self.read_deny(role).await?;
            let n = p.prune(OffsetDateTime::now_utc().unix_timestamp());
            if n > 0 {
                self.write_deny(role, &p).await?;
                dropped += n;
            }
        }
        Ok(dropped)
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
        let secs = session_secs(lease, target.max_session)?;
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
                self.deny(&target.role_name, lease.id.as_str(), end.unix_timestamp())
                    .await?;
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
}
