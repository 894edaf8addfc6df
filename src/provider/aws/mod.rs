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

mod config;
mod deny_policy;
mod errors;
mod revocation;
mod session;
#[cfg(test)]
mod tests;

pub use config::{AwsConfig, AwsRevocation, AwsTarget, OnPolicyFull, RawAws, RawAwsTarget};
pub use deny_policy::{DenyPolicy, Rendered, render_from_store};
pub use session::{session_policy, session_secs, source_identity};

use async_trait::async_trait;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use super::{CredentialProvider, MintRequest, Minted, ProviderError, RateLimit, Revocation};
use crate::audit::AuditLog;
use crate::lease::{Lease, LeaseStore};
use crate::secret::{Secret, fingerprint};
use crate::task::ProviderKind;
use errors::sdk_error;
use revocation::RoleState;

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
