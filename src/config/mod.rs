//! Configuration: `RawConfig` (serde, from TOML) → `Config` (validated). An invalid
//! config cannot exist as a `Config`; the `app` module builds the running components from
//! one. Each table has its own parser here (its raw serde struct and one conversion per
//! sub-structure). Relative paths are relative to the working directory. Every key, its
//! default and why is in `config/mayfly.full.toml`.

mod anomaly;
mod audit;
mod defaults;
mod dpop;
mod issuers;
mod limits;
mod policy;
mod providers;
mod store;
#[cfg(test)]
mod tests;
mod trust;

use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::anomaly::AnomalyConfig;
use crate::identity::TrustDomain;
use crate::identity::workload_api::WorkloadApiSettings;
use crate::provider::jwt::{BindingRules, SigningAlg};
use crate::revocation::ReaperConfig;

pub use anomaly::{RawAnomaly, RawRule};
pub use audit::{RawAudit, RawWebhook};
pub use dpop::{DpopSettings, RawDpop};
pub use issuers::{IssuerConfig, RawBearer, RawJwtSvid, RawOidcIssuer};
pub use limits::{BrokerLimits, EdgeLimits, RawLimits};
pub use policy::{RawOperators, RawPolicy};
pub use providers::{JwtKeys, RawJwt, RawJwtTarget, RawProviders};
pub use store::{RawReaper, RawStore, StoreConfig};
pub use trust::{
    RawBundleSource, RawEndpointProfile, RawTrustDomain, RawWorkloadApi, TrustDomainConfig,
    X509Source,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The error for a key whose value is refused.
pub(crate) fn invalid(key: &'static str, message: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.to_string(),
    }
}

fn dur(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    crate::duration::parse(s).map_err(|e| invalid(key, e))
}

/// An http(s) URL Mayfly may fetch keys from: https, or http to a loopback host only
/// when explicitly allowed (tests, `mayfly dev`).
fn check_url(key: &'static str, url: &str, allow_http: bool) -> Result<(), ConfigError> {
    crate::net::url_allowed(url, allow_http).map_err(|m| invalid(key, m))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "defaults::listen")]
    pub listen: String,
    #[serde(default = "defaults::node_id")]
    pub node_id: String,
    pub tls: RawTls,
    #[serde(default)]
    pub trust_domains: Vec<RawTrustDomain>,
    /// The SPIFFE Workload API, for trust domains with `source = "workload_api"`.
    #[serde(default)]
    pub workload_api: Option<RawWorkloadApi>,
    /// Trust domains whose JWT-SVIDs are accepted as bearer tokens.
    #[serde(default)]
    pub jwt_svid: Vec<RawJwtSvid>,
    /// OIDC issuers whose workload tokens are accepted (and exchanged at /v1/token).
    #[serde(default)]
    pub oidc_issuers: Vec<RawOidcIssuer>,
    #[serde(default)]
    pub bearer: RawBearer,
    #[serde(default)]
    pub operators: RawOperators,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub reaper: RawReaper,
    pub providers: RawProviders,
    #[serde(default)]
    pub anomaly: RawAnomaly,
    #[serde(default)]
    pub webhook: Option<RawWebhook>,
    #[serde(default)]
    pub dpop: RawDpop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub node_id: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub trust_domains: Vec<TrustDomainConfig>,
    pub workload_api: Option<WorkloadApiSettings>,
    pub operators: HashSet<String>,
    pub policy_dir: PathBuf,
    pub policy_reload: Duration,
    pub store: StoreConfig,
    pub audit_path: PathBuf,
    pub limits: BrokerLimits,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    /// `/v1` requests served at once; past it a request is shed (503 `overloaded`).
    pub max_in_flight: usize,
    pub handshake_timeout: Duration,
    /// Timeouts and limits of the HTTP edge against slow, idle and flooding clients.
    pub edge: EdgeLimits,
    /// Rotation and retention of the audit log.
    pub audit_rotation: crate::audit::Rotation,
    /// How often the audit chain head is published to the store (off-host anchor).
    pub anchor_interval: Duration,
    /// How often repeated unauthenticated refusals are written as summary records.
    pub summary_interval: Duration,
    pub reaper: ReaperConfig,
    pub jwt_issuer: String,
    pub jwt_key: JwtKeys,
    pub jwt_generate: Option<SigningAlg>,
    pub jwt_bindings: BindingRules,
    pub dpop: DpopSettings,
    pub jwt_rate: Option<crate::provider::RateLimit>,
    pub vault: Option<crate::provider::vault::VaultConfig>,
    pub aws: Option<crate::provider::aws::AwsConfig>,
    pub anomaly: AnomalyConfig,
    pub webhook: Option<crate::webhook::WebhookConfig>,
    pub jwt_svid: Vec<(TrustDomain, IssuerConfig)>,
    pub oidc_issuers: Vec<(String, IssuerConfig)>,
    pub max_token_bytes: usize,
    pub key_fetch_timeout: Duration,
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;
    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let listen = listen_address(&raw.listen)?;
        check_node_id(&raw.node_id)?;
        let trust = trust::trust(trust::TrustTables {
            trust_domains: raw.trust_domains,
            jwt_svid: raw.jwt_svid,
            workload_api: raw.workload_api,
            oidc_issuers: raw.oidc_issuers,
        })?;
        let bearer = issuers::bearer(raw.bearer)?;
        let operators = policy::operators(raw.operators)?;
        let server = limits::server_limits(raw.limits)?;
        let audit = audit::audit_settings(raw.audit)?;
        let reaper = store::reaper(raw.reaper)?;
        let jwt = providers::jwt(raw.providers.jwt)?;
        let pending_timeout = server.limits.pending_timeout;
        Ok(Self {
            listen,
            node_id: raw.node_id,
            tls_cert: raw.tls.cert_file,
            tls_key: raw.tls.key_file,
            trust_domains: trust.trust_domains,
            workload_api: trust.workload_api,
            operators,
            policy_dir: raw.policy.dir,
            policy_reload: dur("policy.reload_interval", &raw.policy.reload_interval)?,
            store: store::store_config(raw.store)?,
            audit_path: audit.path,
            limits: server.limits,
            max_body_bytes: server.max_body_bytes,
            max_connections: server.max_connections,
            max_in_flight: server.max_in_flight,
            handshake_timeout: server.handshake_timeout,
            edge: server.edge,
            audit_rotation: audit.rotation,
            anchor_interval: audit.anchor_interval,
            summary_interval: audit.summary_interval,
            reaper,
            jwt_issuer: jwt.issuer,
            jwt_key: jwt.key,
            jwt_generate: jwt.generate,
            jwt_bindings: jwt.bindings,
            dpop: dpop::dpop_settings(raw.dpop)?,
            jwt_rate: jwt.rate,
            vault: providers::vault(raw.providers.vault, pending_timeout)?,
            aws: providers::aws(raw.providers.aws)?,
            anomaly: anomaly::anomaly_config(raw.anomaly)?,
            webhook: raw.webhook.map(audit::webhook).transpose()?,
            jwt_svid: trust.jwt_svid,
            oidc_issuers: trust.oidc_issuers,
            max_token_bytes: bearer.max_token_bytes,
            key_fetch_timeout: bearer.fetch_timeout,
        })
    }
}

fn listen_address(listen: &str) -> Result<SocketAddr, ConfigError> {
    listen
        .parse()
        .map_err(|e| invalid("listen", format!("{listen:?}: {e}")))
}

fn check_node_id(node_id: &str) -> Result<(), ConfigError> {
    if node_id.is_empty()
        || node_id.len() > 64
        || !node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        // It names audit records and the node's anchor key in the store.
        return Err(invalid(
            "node_id",
            "must be 1..=64 characters of A-Z a-z 0-9 - . _",
        ));
    }
    Ok(())
}

impl Config {
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        Self::from_toml_with_node_id(text, origin, None)
    }

    /// `from_toml`, with `node_id` replaced when `node_id` is given (the
    /// `MAYFLY_NODE_ID` environment variable: a StatefulSet sets it from the pod name, so
    /// every replica's audit records and anchors carry their own node id).
    pub fn from_toml_with_node_id(
        text: &str,
        origin: &Path,
        node_id: Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(id) = node_id {
            raw.node_id = id;
        }
        raw.try_into()
    }

    /// Reads and validates `path`; `MAYFLY_NODE_ID`, when set, overrides `node_id`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let node_id = std::env::var("MAYFLY_NODE_ID")
            .ok()
            .filter(|v| !v.is_empty());
        Self::from_toml_with_node_id(&text, path, node_id)
    }
}
