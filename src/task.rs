//! Tasks: what an agent declared it is doing, and the scope inside which every credential
//! it asks for must fit. `Raw*` types are what the network sends; `TryFrom` turns them into
//! validated values, so an invalid scope cannot exist as a `Scope`.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::identity::Principal;

pub const MAX_PURPOSE_LEN: usize = 1024;
pub const MAX_GRANTS: usize = 32;
pub const MAX_ITEMS: usize = 64;
pub const MAX_TARGET_LEN: usize = 512;
pub const MAX_TOKEN_LEN: usize = 256;
pub const MAX_LABELS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("purpose must be 1..={MAX_PURPOSE_LEN} characters without control characters")]
    Purpose,
    #[error("scope must hold 1..={MAX_GRANTS} grants")]
    GrantCount,
    #[error("unknown provider {0:?} (known: jwt, vault, aws)")]
    UnknownProvider(String),
    #[error("target must be 1..={MAX_TARGET_LEN} printable characters")]
    Target,
    #[error("{field} must hold 1..={MAX_ITEMS} entries")]
    ItemCount { field: &'static str },
    #[error("{field} entry {value:?} is empty, too long or has forbidden characters")]
    Item { field: &'static str, value: String },
    #[error("resource pattern {0:?} may only use '*' as its last character")]
    Wildcard(String),
    /// IAM reads `?` as a wildcard and `${…}` as a policy variable, so an `aws` resource
    /// holding them would grant more than the scope Mayfly and Cedar checked.
    #[error("aws resource {0:?} holds an IAM wildcard or policy-variable character (? $ {{ }})")]
    IamWildcard(String),
    #[error("grant for {provider}:{target} appears twice in the scope")]
    DuplicateGrant { provider: String, target: String },
    #[error("at most {MAX_LABELS} labels, keys and values 1..=64 printable characters")]
    Labels,
    #[error("ttl: {0}")]
    Duration(#[from] crate::duration::DurationError),
    #[error("delegatee is not a valid principal: {0}")]
    Delegatee(String),
    /// RFC 8707 §2: a `resource` must be an absolute URI without a fragment.
    #[error("resource {0:?} is not an absolute URI without a fragment (RFC 8707)")]
    Resource(String),
}

/// Most RFC 8707 `resource` values one request may name.
pub const MAX_RESOURCES: usize = 8;

/// RFC 8707 §2: each `resource` is an absolute URI (a scheme and what follows) with no
/// fragment; at most [`MAX_RESOURCES`], duplicates collapse, order is kept.
pub fn check_resources(values: Vec<String>) -> Result<Vec<String>, ScopeError> {
    if values.len() > MAX_RESOURCES {
        return Err(ScopeError::ItemCount { field: "resource" });
    }
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for v in values {
        check_target(&v).map_err(|_| ScopeError::Resource(v.clone()))?;
        // The url crate only parses absolute URIs (a scheme is required).
        let ok = url::Url::parse(&v).is_ok() && !v.contains('#');
        if !ok {
            return Err(ScopeError::Resource(v));
        }
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

macro_rules! id_type {
    ($name:ident, $prefix:literal) => {
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A new id: a UUIDv7 (millisecond time, then 74 random bits), time-ordered so
            /// that store indexes keyed by id grow at one end.
            pub fn generate() -> Self {
                Self(format!(concat!($prefix, "{}"), Uuid::now_v7().simple()))
            }
            /// An id whose 128 bits are chosen by the caller (a keyed digest): never a
            /// value anyone could compute from public inputs alone.
            #[allow(dead_code, reason = "the macro defines it for every id type")]
            pub(crate) fn from_bits(bits: [u8; 16]) -> Self {
                Self(format!(concat!($prefix, "{}"), hex::encode(bits)))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let hex = s.strip_prefix($prefix).ok_or(IdError)?;
                if hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    Ok(Self(s.to_string()))
                } else {
                    Err(IdError)
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed identifier")]
pub struct IdError;

id_type!(TaskId, "tsk_");
id_type!(LeaseId, "lse_");

/// Which provider mints a grant's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Jwt,
    Vault,
    Aws,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Jwt => "jwt",
            ProviderKind::Vault => "vault",
            ProviderKind::Aws => "aws",
        }
    }
}

impl FromStr for ProviderKind {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, ScopeError> {
        match s {
            "jwt" => Ok(Self::Jwt),
            "vault" => Ok(Self::Vault),
            "aws" => Ok(Self::Aws),
            other => Err(ScopeError::UnknownProvider(other.to_string())),
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A grant as sent over the network.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub provider: String,
    pub target: String,
    pub actions: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
}

/// One validated slice of authority: `actions` on `resources` of `target` via `provider`.
/// Resource patterns may end in `*` (prefix match); nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub provider: ProviderKind,
    pub target: String,
    pub actions: BTreeSet<String>,
    pub resources: BTreeSet<String>,
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

fn token_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOKEN_LEN
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

fn token_set(
    field: &'static str,
    items: Vec<String>,
    allow_empty: bool,
) -> Result<BTreeSet<String>, ScopeError> {
    if items.len() > MAX_ITEMS || (items.is_empty() && !allow_empty) {
        return Err(ScopeError::ItemCount { field });
    }
    items
        .into_iter()
        .map(|v| {
            if token_ok(&v) {
                Ok(v)
            } else {
                Err(ScopeError::Item { field, value: v })
            }
        })
        .collect()
}

fn check_patterns(resources: &BTreeSet<String>) -> Result<(), ScopeError> {
    for r in resources {
        if r.trim_end_matches('*').contains('*') || r.ends_with("**") {
            return Err(ScopeError::Wildcard(r.clone()));
        }
    }
    Ok(())
}

/// Characters IAM interprets inside a resource ARN but Mayfly's containment treats as
/// literals: `?` (one-character wildcard), `$`, `{`, `}` (policy variables `${…}`).
pub const IAM_RESOURCE_METACHARS: &[char] = &['?', '$', '{', '}'];

fn check_provider_resources(
    provider: ProviderKind,
    resources: &BTreeSet<String>,
) -> Result<(), ScopeError> {
    if provider == ProviderKind::Aws
        && let Some(r) = resources
            .iter()
            .find(|r| r.contains(IAM_RESOURCE_METACHARS))
    {
        return Err(ScopeError::IamWildcard(r.clone()));
    }
    Ok(())
}

fn check_target(target: &str) -> Result<(), ScopeError> {
    if target.is_empty() || target.len() > MAX_TARGET_LEN || !printable(target) {
        return Err(ScopeError::Target);
    }
    Ok(())
}

impl TryFrom<RawGrant> for Grant {
    type Error = ScopeError;
    fn try_from(raw: RawGrant) -> Result<Self, ScopeError> {
        let provider = raw.provider.parse()?;
        check_target(&raw.target)?;
        let actions = token_set("actions", raw.actions, false)?;
        let resources = token_set("resources", raw.resources, true)?;
        check_patterns(&resources)?;
        check_provider_resources(provider, &resources)?;
        Ok(Self {
            provider,
            target: raw.target,
            actions,
            resources,
        })
    }
}

/// Does resource pattern `outer` cover everything `inner` can name?
/// Patterns only carry a trailing `*`, which keeps this exact.
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    match outer.strip_suffix('*') {
        Some(prefix) => inner.starts_with(prefix),
        None => outer == inner,
    }
}

impl Grant {
    /// Is `other` within this grant: same provider and target, a subset of the actions,
    /// and every resource pattern covered by one of ours?
    pub fn covers(&self, other: &Grant) -> bool {
        self.provider == other.provider
            && self.target == other.target
            && other.actions.is_subset(&self.actions)
            && other
                .resources
                .iter()
                .all(|r| self.resources.iter().any(|mine| pattern_covers(mine, r)))
    }

    /// `provider:target`, the key of a grant within a scope.
    pub fn key(&self) -> String {
        format!("{}:{}", self.provider, self.target)
    }
}

/// A validated, non-empty set of grants with at most one grant per provider and target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scope(Vec<Grant>);

impl Scope {
    pub fn new(grants: Vec<Grant>) -> Result<Self, ScopeError> {
        if grants.is_empty() || grants.len() > MAX_GRANTS {
            return Err(ScopeError::GrantCount);
        }
        let mut seen = BTreeSet::new();
        for g in &grants {
            if !seen.insert((g.provider, g.target.clone())) {
                return Err(ScopeError::DuplicateGrant {
                    provider: g.provider.to_string(),
                    target: g.target.clone(),
                });
            }
        }
        Ok(Self(grants))
    }

    pub fn grants(&self) -> &[Grant] {
        &self.0
    }

    pub fn grant_for(&self, provider: ProviderKind, target: &str) -> Option<&Grant> {
        self.0
            .iter()
            .find(|g| g.provider == provider && g.target == target)
    }

    /// Every grant of `other` is covered by a grant of ours.
    pub fn covers(&self, other: &Scope) -> bool {
        other.0.iter().all(|g| {
            self.grant_for(g.provider, &g.target)
                .is_some_and(|m| m.covers(g))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Active,
    Completed,
    Revoked,
    Expired,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Active => "active",
            TaskState::Completed => "completed",
            TaskState::Revoked => "revoked",
            TaskState::Expired => "expired",
        }
    }
}

impl FromStr for TaskState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "active" => Ok(Self::Active),
            "completed" => Ok(Self::Completed),
            "revoked" => Ok(Self::Revoked),
            "expired" => Ok(Self::Expired),
            _ => Err(()),
        }
    }
}

/// `POST /v1/tasks` body as sent.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTaskRequest {
    pub purpose: String,
    pub scope: Vec<RawGrant>,
    /// A duration string ("15m") or seconds; validated in `TryFrom` so a bad value
    /// gets its own error code.
    #[schema(value_type = String, example = "15m")]
    pub ttl: serde_json::Value,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A validated task declaration.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub purpose: String,
    pub scope: Scope,
    pub ttl: Duration,
    pub labels: BTreeMap<String, String>,
}

pub fn validate_purpose(p: &str) -> Result<(), ScopeError> {
    if p.trim().is_empty() || p.chars().count() > MAX_PURPOSE_LEN || !printable(p) {
        return Err(ScopeError::Purpose);
    }
    Ok(())
}

pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ScopeError> {
    let bad = |s: &str| s.is_empty() || s.len() > 64 || !printable(s);
    if labels.len() > MAX_LABELS || labels.iter().any(|(k, v)| bad(k) || bad(v)) {
        return Err(ScopeError::Labels);
    }
    Ok(())
}

impl TaskRequest {
    /// A declaration built in the broker (a CI job's implicit task), validated like one
    /// sent over the network; only the ttl is already typed.
    pub fn new(
        purpose: String,
        scope: Vec<RawGrant>,
        ttl: Duration,
        labels: BTreeMap<String, String>,
    ) -> Result<Self, ScopeError> {
        validate_purpose(&purpose)?;
        validate_labels(&labels)?;
        let grants = scope
            .into_iter()
            .map(Grant::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            purpose,
            scope: Scope::new(grants)?,
            ttl,
            labels,
        })
    }
}

impl TryFrom<RawTaskRequest> for TaskRequest {
    type Error = ScopeError;
    fn try_from(raw: RawTaskRequest) -> Result<Self, ScopeError> {
        // A bad purpose, label or scope is reported before a bad ttl.
        let ttl = crate::duration::from_json(&raw.ttl);
        let checked = Self::new(raw.purpose, raw.scope, Duration::ZERO, raw.labels)?;
        Ok(Self {
            ttl: ttl?,
            ..checked
        })
    }
}

/// `POST /v1/tasks/{id}/delegate` body as sent.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDelegateRequest {
    /// The delegatee (a SPIFFE ID).
    pub principal: String,
    pub purpose: String,
    pub scope: Vec<RawGrant>,
    #[schema(value_type = String, example = "10m")]
    pub ttl: serde_json::Value,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A validated delegation: a sub-task for `principal`.
#[derive(Debug, Clone)]
pub struct DelegateRequest {
    pub principal: Principal,
    pub task: TaskRequest,
}

impl TryFrom<RawDelegateRequest> for DelegateRequest {
    type Error = ScopeError;
    fn try_from(raw: RawDelegateRequest) -> Result<Self, ScopeError> {
        let principal =
            Principal::parse(&raw.principal).map_err(|e| ScopeError::Delegatee(e.to_string()))?;
        let task = TaskRequest::try_from(RawTaskRequest {
            purpose: raw.purpose,
            scope: raw.scope,
            ttl: raw.ttl,
            labels: raw.labels,
        })?;
        Ok(Self { principal, task })
    }
}

/// `POST /v1/tasks/{id}/credentials` body as sent. Omitted actions/resources mean
/// "everything the task's grant for this target holds".
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCredentialRequest {
    pub provider: String,
    pub target: String,
    #[serde(default)]
    pub actions: Option<Vec<String>>,
    #[serde(default)]
    pub resources: Option<Vec<String>>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "5m")]
    pub ttl: Option<serde_json::Value>,
    /// RFC 8707 resource indicator(s), `jwt` only: a string or an array of absolute
    /// URIs, each a target the task holds a grant for; the token's `aud` is all of them.
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>, example = json!(["https://mcp.example/"]))]
    pub resource: Option<serde_json::Value>,
}

/// A validated credential request, not yet checked against any task.
#[derive(Debug, Clone)]
pub struct CredentialRequest {
    pub provider: ProviderKind,
    pub target: String,
    pub actions: Option<BTreeSet<String>>,
    pub resources: Option<BTreeSet<String>>,
    pub ttl: Option<Duration>,
    /// RFC 8707 resources (validated URIs); empty when none were given.
    pub resource: Vec<String>,
    /// RFC 7638 thumbprint of the DPoP key the request proved possession of.
    pub dpop_jkt: Option<String>,
    /// That proof's `jti`, consumed in the same write as the lease (a replay writes
    /// nothing and mints nothing).
    pub dpop_once: Option<crate::identity::OnceKey>,
}

impl TryFrom<RawCredentialRequest> for CredentialRequest {
    type Error = ScopeError;
    fn try_from(raw: RawCredentialRequest) -> Result<Self, ScopeError> {
        let provider = raw.provider.parse()?;
        check_target(&raw.target)?;
        let actions = raw
            .actions
            .map(|a| token_set("actions", a, false))
            .transpose()?;
        let resources = raw
            .resources
            .map(|r| token_set("resources", r, true))
            .transpose()?;
        if let Some(r) = &resources {
            check_patterns(r)?;
            check_provider_resources(provider, r)?;
        }
        let resource = match raw.resource {
            None => Vec::new(),
            Some(serde_json::Value::String(r)) => check_resources(vec![r])?,
            Some(serde_json::Value::Array(list)) if !list.is_empty() => check_resources(
                list.into_iter()
                    .map(|v| match v {
                        serde_json::Value::String(r) => Ok(r),
                        other => Err(ScopeError::Resource(other.to_string())),
                    })
                    .collect::<Result<_, _>>()?,
            )?,
            Some(other) => return Err(ScopeError::Resource(other.to_string())),
        };
        Ok(Self {
            provider,
            target: raw.target,
            actions,
            resources,
            ttl: raw
                .ttl
                .as_ref()
                .map(crate::duration::from_json)
                .transpose()?,
            resource,
            dpop_jkt: None,
            dpop_once: None,
        })
    }
}

impl CredentialRequest {
    /// The concrete grant this request asks for, filling omitted parts from `held`.
    pub fn resolve(&self, held: &Grant) -> Grant {
        Grant {
            provider: self.provider,
            target: self.target.clone(),
            actions: self.actions.clone().unwrap_or_else(|| held.actions.clone()),
            resources: self
                .resources
                .clone()
                .unwrap_or_else(|| held.resources.clone()),
        }
    }
}

/// The two fields of a stored task that say whether it is live: read alone where only
/// that matters (the store checks it inside a lease's commit), without the rest.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct TaskLife {
    pub state: TaskState,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl TaskLife {
    /// The state at `now`: a stored `active` task past its end is `expired`.
    pub fn state_at(&self, now: OffsetDateTime) -> TaskState {
        if self.state == TaskState::Active && now >= self.expires_at {
            TaskState::Expired
        } else {
            self.state
        }
    }
}

/// A declared task as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub owner: Principal,
    pub purpose: String,
    pub scope: Scope,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub parent: Option<TaskId>,
    pub labels: BTreeMap<String, String>,
    pub state: TaskState,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub end_reason: Option<String>,
    /// Where the task was declared from: a credential request from elsewhere is a
    /// posture change (anomaly signal). `None` for delegated tasks.
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// The declaring caller's posture, as far as anomaly detection compares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub source: Option<std::net::IpAddr>,
    pub credential_fingerprint: String,
    /// Implicit CI tasks only (RFC 8693 exchange): the fingerprint of the declaring
    /// caller's identity and every claim Cedar could read (`broker::claims_binding`).
    /// Only a caller with the same fingerprint may act on the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims_binding: Option<String>,
}

/// Why a task could not be ended: it already ended another way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {id} is {current:?}, cannot end it as {to:?}")]
pub struct TaskEndError {
    pub id: TaskId,
    pub current: TaskState,
    pub to: TaskState,
}

impl Task {
    /// A task declared by `owner` from `now` until `expires_at` (`POST /v1/tasks`, or a CI
    /// job's implicit task).
    pub fn declared(
        id: TaskId,
        owner: Principal,
        req: TaskRequest,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
        origin: Origin,
    ) -> Self {
        Self {
            id,
            owner,
            purpose: req.purpose,
            scope: req.scope,
            created_at: now,
            expires_at,
            parent: None,
            labels: req.labels,
            state: TaskState::Active,
            ended_at: None,
            end_reason: None,
            origin: Some(origin),
        }
    }

    /// A sub-task of `parent` for `owner`, ending no later than its parent.
    pub fn delegated(
        parent: &Task,
        owner: Principal,
        req: TaskRequest,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Self {
        Self {
            id: TaskId::generate(),
            owner,
            purpose: req.purpose,
            scope: req.scope,
            created_at: now,
            expires_at: expires_at.min(parent.expires_at),
            parent: Some(parent.id.clone()),
            labels: req.labels,
            state: TaskState::Active,
            ended_at: None,
            end_reason: None,
            origin: None,
        }
    }

    /// The one rule for ending a task, shared by both stores: an active task ends as
    /// `to` at `at`; ending it again as `to` changes nothing (`Ok(false)`); a task that
    /// already ended another way cannot end again.
    pub fn end(
        &mut self,
        to: TaskState,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<bool, TaskEndError> {
        if self.state == to {
            return Ok(false);
        }
        if self.state != TaskState::Active {
            return Err(TaskEndError {
                id: self.id.clone(),
                current: self.state,
                to,
            });
        }
        self.state = to;
        self.ended_at = Some(at);
        self.end_reason = Some(reason.to_string());
        Ok(true)
    }

    /// The state at `now`: a stored `active` task past its end is `expired`.
    pub fn state_at(&self, now: OffsetDateTime) -> TaskState {
        TaskLife {
            state: self.state,
            expires_at: self.expires_at,
        }
        .state_at(now)
    }

    pub fn remaining(&self, now: OffsetDateTime) -> Duration {
        let secs = (self.expires_at - now).whole_seconds();
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn grant(actions: &[&str], resources: &[&str]) -> Grant {
        Grant {
            provider: ProviderKind::Jwt,
            target: "https://api.example".into(),
            actions: actions.iter().map(|s| s.to_string()).collect(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn ids_round_trip_and_reject_foreign_shapes() {
        let id = TaskId::generate();
        assert_eq!(id.as_str().parse::<TaskId>(), Ok(id.clone()));
        assert_eq!("lse_0123".parse::<LeaseId>(), Err(IdError));
        assert_eq!(id.as_str().parse::<LeaseId>(), Err(IdError));
        assert_eq!("tsk_../../etc".parse::<TaskId>(), Err(IdError));
    }

    /// Ids are UUIDv7: in generation order, so a store's B-tree appends them to the same
    /// pages instead of one random page per lease; and still unique.
    #[test]
    fn ids_sort_in_generation_order_and_do_not_repeat() {
        let ids: Vec<LeaseId> = (0..10_000).map(|_| LeaseId::generate()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ordered and distinct");
        let v = Uuid::parse_str(ids[0].as_str().trim_start_matches("lse_")).expect("uuid");
        assert_eq!(v.get_version_num(), 7);
    }

    #[test]
    fn a_grant_covers_only_subsets_of_its_actions_and_resources() {
        let held = grant(&["read", "write"], &["repo/a/*", "repo/b"]);
        assert!(held.covers(&grant(&["read"], &["repo/a/x", "repo/a/*", "repo/b"])));
        assert!(!held.covers(&grant(&["delete"], &[])));
        assert!(!held.covers(&grant(&["read"], &["repo/b/x"])));
        assert!(!held.covers(&grant(&["read"], &["repo/*"])));
        let mut other_target = grant(&["read"], &[]);
        other_target.target = "https://api.example.evil".into();
        assert!(!held.covers(&other_target));
    }

    #[test]
    fn wildcards_only_at_the_end_of_a_resource_pattern() {
        let raw = RawGrant {
            provider: "jwt".into(),
            target: "https://x".into(),
            actions: vec!["read".into()],
            resources: vec!["a/*/b".into()],
        };
        assert_eq!(
            Grant::try_from(raw),
            Err(ScopeError::Wildcard("a/*/b".into()))
        );
    }

    #[test]
    fn iam_wildcards_and_policy_variables_are_refused_in_aws_resources() {
        for bad in [
            "arn:aws:s3:::bucket/?",
            "arn:aws:s3:::home/${aws:username}/*",
            "arn:aws:s3:::a$b",
            "arn:aws:s3:::a{b}",
        ] {
            let raw = RawGrant {
                provider: "aws".into(),
                target: "deploy".into(),
                actions: vec!["s3:GetObject".into()],
                resources: vec![bad.into()],
            };
            assert_eq!(
                Grant::try_from(raw),
                Err(ScopeError::IamWildcard(bad.into())),
                "{bad}"
            );
            let req = RawCredentialRequest {
                provider: "aws".into(),
                target: "deploy".into(),
                actions: None,
                resources: Some(vec![bad.into()]),
                ttl: None,
                resource: None,
            };
            assert!(matches!(
                CredentialRequest::try_from(req),
                Err(ScopeError::IamWildcard(r)) if r == bad
            ));
        }
        // The same characters mean nothing special to other providers.
        let raw = RawGrant {
            provider: "jwt".into(),
            target: "https://x".into(),
            actions: vec!["read".into()],
            resources: vec!["reports/?".into()],
        };
        assert!(Grant::try_from(raw).is_ok());
    }

    #[test]
    fn duplicate_grants_and_empty_scopes_are_rejected() {
        let g = grant(&["read"], &[]);
        assert_eq!(Scope::new(vec![]), Err(ScopeError::GrantCount));
        assert!(matches!(
            Scope::new(vec![g.clone(), g]),
            Err(ScopeError::DuplicateGrant { .. })
        ));
    }

    fn arb_grant() -> impl Strategy<Value = Grant> {
        (
            proptest::sample::select(vec!["https://a", "https://b"]),
            proptest::collection::btree_set("[rwx]", 1..3),
            proptest::collection::btree_set("[ab/]{0,3}\\*?", 0..3),
        )
            .prop_map(|(target, actions, resources)| Grant {
                provider: ProviderKind::Jwt,
                target: target.to_string(),
                actions,
                resources,
            })
    }

    /// Every concrete request a grant admits: an action and a resource it names.
    fn admits(g: &Grant, target: &str, action: &str, resource: &str) -> bool {
        g.target == target
            && g.actions.contains(action)
            && g.resources.iter().any(|p| pattern_covers(p, resource))
    }

    fn arb_scope() -> impl Strategy<Value = Scope> {
        proptest::collection::vec(arb_grant(), 1..3).prop_map(|gs| {
            let mut seen = BTreeSet::new();
            let gs = gs
                .into_iter()
                .filter(|g| seen.insert(g.target.clone()))
                .collect();
            Scope::new(gs).expect("scope")
        })
    }

    /// A resource pattern that `outer` covers: itself, a longer name under its prefix,
    /// or (for a prefix pattern) a narrower prefix pattern.
    fn arb_covered_pattern(outer: String) -> impl Strategy<Value = String> {
        ("[ab/]{0,3}", any::<bool>()).prop_map(move |(more, star)| match outer.strip_suffix('*') {
            Some(prefix) if star => format!("{prefix}{more}*"),
            Some(prefix) => format!("{prefix}{more}"),
            None => outer.clone(),
        })
    }

    /// A grant inside `parent`: a non-empty subset of its actions, each resource
    /// pattern narrowed from one of its patterns.
    fn arb_narrowed_grant(parent: Grant) -> impl Strategy<Value = Grant> {
        let actions: Vec<String> = parent.actions.iter().cloned().collect();
        let patterns: Vec<String> = parent.resources.iter().cloned().collect();
        let resources = if patterns.is_empty() {
            Just(BTreeSet::new()).boxed()
        } else {
            proptest::collection::btree_set(
                proptest::sample::select(patterns).prop_flat_map(arb_covered_pattern),
                0..3,
            )
            .boxed()
        };
        (
            proptest::sample::subsequence(actions.clone(), 1..=actions.len()),
            resources,
        )
            .prop_map(move |(actions, resources)| Grant {
                actions: actions.into_iter().collect(),
                resources,
                ..parent.clone()
            })
    }

    /// A parent and a child generated from it: a non-empty subset of the parent's grants,
    /// each narrowed. Containment holds by construction, so every case exercises it.
    fn arb_parent_and_child() -> impl Strategy<Value = (Scope, Scope)> {
        arb_scope().prop_flat_map(|parent| {
            let grants = parent.grants().to_vec();
            let n = grants.len();
            proptest::sample::subsequence(grants, 1..=n)
                .prop_flat_map(|picked| {
                    picked
                        .into_iter()
                        .map(arb_narrowed_grant)
                        .collect::<Vec<_>>()
                })
                .prop_map(move |child| (parent.clone(), Scope::new(child).expect("child")))
        })
    }

    /// A parent and a child that is strictly not inside it: one grant of a child made
    /// from the parent is widened by an action, a resource or a target the parent lacks.
    fn arb_parent_and_wider_child() -> impl Strategy<Value = (Scope, Scope, usize)> {
        (
            arb_parent_and_child(),
            0..3usize,
            any::<prop::sample::Index>(),
        )
            .prop_map(|((parent, child), how, which)| {
                let mut grants = child.grants().to_vec();
                let g = &mut grants[which.index(child.grants().len())];
                let outside = "zz/outside";
                // A parent pattern `*` covers every resource: widen the actions instead.
                let resource_uncovered = parent
                    .grant_for(g.provider, &g.target)
                    .is_some_and(|p| !p.resources.iter().any(|r| pattern_covers(r, outside)));
                match how {
                    1 if resource_uncovered => {
                        g.resources.insert(outside.into());
                    }
                    2 => g.target = "https://elsewhere".into(),
                    _ => {
                        g.actions.insert("escalate".into());
                    }
                }
                (parent, Scope::new(grants).expect("child"), how)
            })
    }

    proptest! {
        #[test]
        fn a_child_made_from_its_parent_is_covered_and_admits_nothing_more(
            (parent, child) in arb_parent_and_child(),
            probe in ("https://[ab]", "[rwx]", "[ab/]{0,4}"),
        ) {
            prop_assert!(parent.covers(&child), "{parent:?} must cover {child:?}");
            let (target, action, resource) = probe;
            let child_admits = child.grants().iter().any(|g| admits(g, &target, &action, &resource));
            let parent_admits = parent.grants().iter().any(|g| admits(g, &target, &action, &resource));
            prop_assert!(!child_admits || parent_admits, "child admits {target} {action} {resource}; parent does not");
        }

        #[test]
        fn a_child_wider_than_its_parent_is_never_covered(
            (parent, child, how) in arb_parent_and_wider_child(),
        ) {
            prop_assert!(!parent.covers(&child), "widening {how} was covered: {parent:?} / {child:?}");
        }

        #[test]
        fn pattern_cover_is_sound(outer in "[ab/]{0,4}\\*?", inner in "[ab/]{0,5}\\*?", probe in "[ab/]{0,6}") {
            // If outer covers inner, any concrete name matched by inner is matched by outer.
            let matches = |pat: &str, s: &str| match pat.strip_suffix('*') {
                Some(p) => s.starts_with(p),
                None => pat == s,
            };
            if pattern_covers(&outer, &inner) && matches(&inner, &probe) {
                prop_assert!(matches(&outer, &probe));
            }
        }
    }
}
