//! Configuration: `RawConfig` (serde, from TOML) → `Config` (validated) → `build()`
//! (the running components). An invalid config cannot exist as a `Config`.
//! Relative paths are relative to the working directory. Every key, its default and why
//! is in `config/mayfly.full.toml`.

use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::anomaly::AnomalyConfig;
use crate::audit::AuditLog;
use crate::broker::{Broker, BrokerParts, Limits};
use crate::identity::bearer::{BearerVerifier, IssuerRules, TrustedIssuer, parse_algorithm};
use crate::identity::bundle_endpoint::{EndpointAuth, EndpointSource, EndpointSpec};
use crate::identity::jwks::{CacheSettings, KeyCache, KeySourceSpec};
use crate::identity::workload_api::{JwtTarget, Targets, WorkloadApiSettings, WorkloadApiSource};
use crate::identity::{LiveBundles, Principal, SpiffeId, TrustDomain};
use crate::lease::LeaseStore;
use crate::lease::embedded::EmbeddedStore;
use crate::lease::redis::{Durability, RedisConfig, RedisStore};
use crate::policy::PolicyEngine;
use crate::provider::Providers;
use crate::provider::jwt::{Binding, BindingRules, JwtIssuer, JwtProvider, SigningAlg, SigningKey};
use crate::revocation::{ReaperConfig, RetryPolicy, Revoker};

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

fn invalid(key: &'static str, message: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.to_string(),
    }
}

fn dur(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    crate::duration::parse(s).map_err(|e| invalid(key, e))
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

/// `[dpop]`: how DPoP proofs (RFC 9449) are checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDpop {
    /// How old (by `iat`) a proof may be.
    #[serde(default = "defaults::dpop_max_age")]
    pub max_age: String,
    /// Clock skew allowed for a proof from the future.
    #[serde(default = "defaults::dpop_leeway")]
    pub leeway: String,
    /// A file of at least 32 random bytes shared by every replica: when set, proofs must
    /// carry a server nonce (`DPoP-Nonce`).
    #[serde(default)]
    pub nonce_secret_file: Option<PathBuf>,
    /// How long an issued nonce stays fresh (it is accepted for up to twice this).
    #[serde(default = "defaults::dpop_nonce_lifetime")]
    pub nonce_lifetime: String,
}

impl Default for RawDpop {
    fn default() -> Self {
        Self {
            max_age: defaults::dpop_max_age(),
            leeway: defaults::dpop_leeway(),
            nonce_secret_file: None,
            nonce_lifetime: defaults::dpop_nonce_lifetime(),
        }
    }
}

/// `[dpop]`, validated (the nonce key is read at build time).
#[derive(Debug, Clone)]
pub struct DpopSettings {
    pub max_age: Duration,
    pub leeway: Duration,
    pub nonce_secret_file: Option<PathBuf>,
    pub nonce_lifetime: Duration,
}

fn dpop_settings(raw: RawDpop) -> Result<DpopSettings, ConfigError> {
    let s = DpopSettings {
        max_age: dur("dpop.max_age", &raw.max_age)?,
        leeway: dur("dpop.leeway", &raw.leeway)?,
        nonce_secret_file: raw.nonce_secret_file,
        nonce_lifetime: dur("dpop.nonce_lifetime", &raw.nonce_lifetime)?,
    };
    if s.max_age.as_secs() == 0 || s.max_age > Duration::from_secs(600) {
        return Err(invalid("dpop.max_age", "must be 1s..=10m"));
    }
    if s.leeway > Duration::from_secs(60) {
        return Err(invalid("dpop.leeway", "must be at most 60s"));
    }
    if s.nonce_lifetime.as_secs() == 0 {
        return Err(invalid("dpop.nonce_lifetime", "must be at least 1s"));
    }
    Ok(s)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    pub secret_file: PathBuf,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "defaults::webhook_timeout")]
    pub timeout: String,
    #[serde(default = "defaults::webhook_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::webhook_events")]
    pub events: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnomaly {
    /// How long a signal raises the risk score (default "10m").
    pub risk_window: Option<String>,
    /// How long a `deny` verdict blocks the task (default "60s").
    pub deny_for: Option<String>,
    /// When present, replaces the default rules entirely.
    pub rules: Option<Vec<RawRule>>,
    /// Tasks one principal may declare per `quota_window` (default 120; 0: no quota).
    pub max_tasks_per_principal: Option<u32>,
    /// Credential requests one principal may make per `quota_window` (default 3000; 0: no quota).
    pub max_requests_per_principal: Option<u32>,
    /// The window of both quotas (default "60s").
    pub quota_window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub signal: String,
    pub threshold: u32,
    pub window: String,
    pub action: String,
    #[serde(default = "defaults::rule_mode")]
    pub mode: String,
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub min_severity: Option<String>,
}

fn anomaly_config(raw: RawAnomaly) -> Result<AnomalyConfig, ConfigError> {
    use crate::anomaly::{Action, Mode, Rule};
    let mut cfg = AnomalyConfig::default();
    if let Some(w) = raw.risk_window {
        cfg.risk_window = dur("anomaly.risk_window", &w)?;
    }
    if let Some(d) = raw.deny_for {
        cfg.deny_for = dur("anomaly.deny_for", &d)?;
    }
    if let Some(n) = raw.max_tasks_per_principal {
        cfg.quotas.tasks = n;
    }
    if let Some(n) = raw.max_requests_per_principal {
        cfg.quotas.requests = n;
    }
    if let Some(w) = raw.quota_window {
        cfg.quotas.window = dur("anomaly.quota_window", &w)?;
        if cfg.quotas.window.is_zero() {
            return Err(invalid("anomaly.quota_window", "must be positive"));
        }
    }
    if let Some(rules) = raw.rules {
        const SIGNALS: [&str; 7] = [
            "request",
            "out_of_scope",
            "policy_denied",
            "posture_change",
            "ended_task_use",
            "delegation_wider",
            "external",
        ];
        cfg.rules = rules
            .into_iter()
            .map(|r| {
                if !SIGNALS.contains(&r.signal.as_str()) {
                    return Err(invalid(
                        "anomaly.rules.signal",
                        format!("{:?}: expected one of {SIGNALS:?}", r.signal),
                    ));
                }
                if r.threshold == 0 {
                    return Err(invalid("anomaly.rules.threshold", "must be at least 1"));
                }
                let action = match r.action.as_str() {
                    "audit" => Action::Audit,
                    "deny" => Action::Deny,
                    "revoke_task" => Action::RevokeTask,
                    "revoke_principal" => Action::RevokePrincipal,
                    o => {
                        return Err(invalid(
                            "anomaly.rules.action",
                            format!("{o:?}: audit, deny, revoke_task or revoke_principal"),
                        ));
                    }
                };
                let mode = match r.mode.as_str() {
                    "audit" => Mode::Audit,
                    "enforce" => Mode::Enforce,
                    o => {
                        return Err(invalid(
                            "anomaly.rules.mode",
                            format!("{o:?}: audit or enforce"),
                        ));
                    }
                };
                let min_severity = r
                    .min_severity
                    .map(|s| {
                        s.parse()
                            .map_err(|e: String| invalid("anomaly.rules.min_severity", e))
                    })
                    .transpose()?;
                Ok(Rule {
                    window: dur("anomaly.rules.window", &r.window)?,
                    name: r.name,
                    signal: r.signal,
                    min_severity,
                    threshold: r.threshold,
                    action,
                    mode,
                    class: r.class,
                })
            })
            .collect::<Result<_, _>>()?;
    }
    Ok(cfg)
}

mod defaults {
    pub fn dpop_max_age() -> String {
        "60s".into()
    }
    pub fn dpop_leeway() -> String {
        "5s".into()
    }
    pub fn dpop_nonce_lifetime() -> String {
        "60s".into()
    }
    pub fn jwt_binding() -> crate::provider::jwt::Binding {
        crate::provider::jwt::Binding::Optional
    }
    pub fn jwt_burst() -> f64 {
        50.0
    }
    pub fn webhook_timeout() -> String {
        "5s".into()
    }
    pub fn webhook_attempts() -> u32 {
        5
    }
    pub fn webhook_events() -> Vec<String> {
        ["lease.revoked", "lease.irrevocable", "anomaly.triggered"]
            .map(String::from)
            .to_vec()
    }
    pub fn rule_mode() -> String {
        "enforce".into()
    }
    pub fn store_path() -> std::path::PathBuf {
        "mayfly-leases.redb".into()
    }
    pub fn key_prefix() -> String {
        "mayfly".into()
    }
    pub fn durability() -> String {
        "server".into()
    }
    pub fn wait_replicas() -> u32 {
        1
    }
    pub fn wait_timeout() -> String {
        "1s".into()
    }
    pub fn verify_durability() -> bool {
        true
    }
    pub fn op_timeout() -> String {
        "2s".into()
    }
    pub fn listen() -> String {
        "127.0.0.1:8443".into()
    }
    pub fn node_id() -> String {
        "mayfly-0".into()
    }
    pub fn leeway() -> String {
        "30s".into()
    }
    pub fn jwks_ttl() -> String {
        "10m".into()
    }
    pub fn refetch_cooldown() -> String {
        "30s".into()
    }
    pub fn max_keys() -> usize {
        32
    }
    pub fn max_exchange_ttl() -> String {
        "1h".into()
    }
    pub fn svid_algorithms() -> Vec<String> {
        [
            "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn wapi_initial_timeout() -> String {
        "10s".into()
    }
    pub fn wapi_backoff_min() -> String {
        "500ms".into()
    }
    pub fn wapi_backoff_max() -> String {
        "30s".into()
    }
    pub fn oidc_algorithms() -> Vec<String> {
        ["RS256", "ES256"].map(String::from).to_vec()
    }
}

/// `[[jwt_svid]]`: one per trust domain whose JWT-SVIDs are accepted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwtSvid {
    pub trust_domain: String,
    /// A SPIFFE bundle (JWKS; only `use: "jwt-svid"` keys are taken) or a plain JWKS.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
    /// A SPIFFE bundle endpoint: the same document over HTTPS.
    #[serde(default)]
    pub bundle_endpoint: Option<String>,
    /// `"file"`, `"endpoint"` or `"workload_api"`; inferred from the keys when absent.
    #[serde(default)]
    pub source: Option<RawBundleSource>,
    #[serde(default)]
    pub endpoint_profile: Option<RawEndpointProfile>,
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    pub endpoint_ca_file: Option<PathBuf>,
    pub audiences: Vec<String>,
    #[serde(default)]
    pub allow_multiple_audiences: bool,
    #[serde(default = "defaults::svid_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "defaults::leeway")]
    pub leeway: String,
    #[serde(default = "defaults::jwks_ttl")]
    pub refresh_interval: String,
    #[serde(default = "defaults::refetch_cooldown")]
    pub refetch_cooldown: String,
    #[serde(default = "defaults::max_keys")]
    pub max_keys: usize,
    #[serde(default)]
    pub single_use: bool,
    #[serde(default)]
    pub allow_insecure_http: bool,
}

/// `[[oidc_issuers]]`: one per trusted OIDC issuer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidcIssuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Static keys instead of discovery.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL instead of discovery.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default = "defaults::oidc_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default)]
    pub typ: Option<Vec<String>>,
    #[serde(default = "defaults::leeway")]
    pub leeway: String,
    #[serde(default = "defaults::jwks_ttl")]
    pub jwks_ttl: String,
    #[serde(default = "defaults::refetch_cooldown")]
    pub refetch_cooldown: String,
    #[serde(default = "defaults::max_keys")]
    pub max_keys: usize,
    #[serde(default = "default_true")]
    pub allow_multiple_audiences: bool,
    #[serde(default)]
    pub single_use: bool,
    #[serde(default)]
    pub job_claims: Vec<String>,
    #[serde(default = "defaults::max_exchange_ttl")]
    pub max_exchange_ttl: String,
    #[serde(default)]
    pub allow_insecure_http: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBearer {
    pub max_token_bytes: usize,
    /// No longer used: single-use `jti`s live in the shared store. Accepted (and
    /// ignored) so existing configuration files keep loading.
    pub replay_cache_size: Option<usize>,
    pub fetch_timeout: String,
}

impl Default for RawBearer {
    fn default() -> Self {
        Self {
            max_token_bytes: 8 * 1024,
            replay_cache_size: None,
            fetch_timeout: "5s".into(),
        }
    }
}

/// A validated token source: where its keys come from and the rules its tokens obey.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub source: KeySourceSpec,
    pub cache: CacheSettings,
    pub rules: IssuerRules,
    /// How a bundle endpoint (`KeySourceSpec::Url`) is authenticated.
    pub endpoint_auth: EndpointAuth,
}

/// An http(s) URL Mayfly may fetch keys from: https, or http to a loopback host only
/// when explicitly allowed (tests, `mayfly dev`).
fn check_url(key: &'static str, url: &str, allow_http: bool) -> Result<(), ConfigError> {
    crate::net::url_allowed(url, allow_http).map_err(|m| invalid(key, m))
}

struct IssuerCommon<'a> {
    audiences: Vec<String>,
    algorithms: &'a [String],
    leeway: &'a str,
    ttl: &'a str,
    cooldown: &'a str,
    max_keys: usize,
}

fn issuer_rules(c: IssuerCommon<'_>) -> Result<(IssuerRules, CacheSettings), ConfigError> {
    if c.audiences.is_empty() || c.audiences.iter().any(String::is_empty) {
        return Err(invalid(
            "audiences",
            "at least one non-empty audience is required",
        ));
    }
    if c.algorithms.is_empty() {
        return Err(invalid("algorithms", "at least one algorithm is required"));
    }
    let algorithms = c
        .algorithms
        .iter()
        .map(|a| parse_algorithm(a).map_err(|e| invalid("algorithms", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let leeway = dur("leeway", c.leeway)?;
    if leeway > Duration::from_secs(300) {
        return Err(invalid(
            "leeway",
            "at most 5m: leeway absorbs clock skew only",
        ));
    }
    if !(1..=1000).contains(&c.max_keys) {
        return Err(invalid("max_keys", "must be 1..=1000"));
    }
    let rules = IssuerRules {
        audiences: c.audiences,
        allow_multiple_audiences: false,
        algorithms,
        typ: None,
        leeway,
        single_use: false,
        job_claims: Vec::new(),
        max_exchange_ttl: Duration::from_secs(3600),
    };
    let cache = CacheSettings {
        ttl: dur("refresh_interval/jwks_ttl", c.ttl)?,
        cooldown: dur("refetch_cooldown", c.cooldown)?,
        max_keys: c.max_keys,
    };
    Ok((rules, cache))
}

fn jwt_svid_config(r: RawJwtSvid) -> Result<(TrustDomain, IssuerConfig), ConfigError> {
    let td =
        TrustDomain::parse(&r.trust_domain).map_err(|e| invalid("jwt_svid.trust_domain", e))?;
    let source = RawBundleSource::resolve(r.source, r.bundle_endpoint.is_some());
    let fields = SourceFields {
        bundle_file: r.bundle_file.is_some(),
        bundle_endpoint: r.bundle_endpoint.is_some(),
        endpoint_profile: r.endpoint_profile.is_some(),
        endpoint_spiffe_id: r.endpoint_spiffe_id.is_some(),
        endpoint_ca_file: r.endpoint_ca_file.is_some(),
        refresh_bounds: false,
        allow_insecure_http: r.allow_insecure_http,
    };
    fields.check("jwt_svid", &td, source)?;
    let mut endpoint_auth = EndpointAuth::HttpsWeb { ca_file: None };
    let source = match (source, r.bundle_file, r.bundle_endpoint) {
        (RawBundleSource::File, Some(f), _) => KeySourceSpec::File(f),
        (RawBundleSource::Endpoint, None, Some(u)) => {
            check_url("jwt_svid.bundle_endpoint", &u, r.allow_insecure_http)?;
            endpoint_auth = endpoint_auth_config(
                "jwt_svid",
                &td,
                r.endpoint_profile,
                r.endpoint_spiffe_id,
                r.endpoint_ca_file,
            )?;
            if r.allow_insecure_http && matches!(endpoint_auth, EndpointAuth::HttpsSpiffe { .. }) {
                return Err(invalid(
                    "jwt_svid.allow_insecure_http",
                    format!("{td}: not with endpoint_profile = \"https_spiffe\""),
                ));
            }
            KeySourceSpec::Url(u)
        }
        (RawBundleSource::WorkloadApi, None, None) => KeySourceSpec::Pushed,
        _ => {
            return Err(invalid(
                "jwt_svid",
                format!(
                    "{td}: give bundle_file (source \"file\") or bundle_endpoint (source \"endpoint\"), or neither with source = \"workload_api\""
                ),
            ));
        }
    };
    let (mut rules, cache) = issuer_rules(IssuerCommon {
        audiences: r.audiences,
        algorithms: &r.algorithms,
        leeway: &r.leeway,
        ttl: &r.refresh_interval,
        cooldown: &r.refetch_cooldown,
        max_keys: r.max_keys,
    })?;
    // JWT-SVID §3: RS, ES and PS only.
    if rules
        .algorithms
        .iter()
        .any(|a| matches!(a, jsonwebtoken::Algorithm::EdDSA))
    {
        return Err(invalid(
            "jwt_svid.algorithms",
            "JWT-SVIDs use RS*, ES* or PS* only",
        ));
    }
    rules.allow_multiple_audiences = r.allow_multiple_audiences;
    rules.single_use = r.single_use;
    Ok((
        td,
        IssuerConfig {
            source,
            cache,
            rules,
            endpoint_auth,
        },
    ))
}

fn oidc_config(r: RawOidcIssuer) -> Result<(String, IssuerConfig), ConfigError> {
    check_url("oidc_issuers.issuer", &r.issuer, r.allow_insecure_http)?;
    if r.issuer.contains('#') || r.issuer.contains('?') {
        return Err(invalid("oidc_issuers.issuer", "no query or fragment"));
    }
    let source = match (r.jwks_file, r.jwks_uri) {
        (Some(f), None) => KeySourceSpec::File(f),
        (None, Some(u)) => {
            check_url("oidc_issuers.jwks_uri", &u, r.allow_insecure_http)?;
            KeySourceSpec::Url(u)
        }
        (None, None) => KeySourceSpec::Discovery {
            issuer: r.issuer.clone(),
        },
        (Some(_), Some(_)) => {
            return Err(invalid(
                "oidc_issuers",
                format!("{}: give at most one of jwks_file, jwks_uri", r.issuer),
            ));
        }
    };
    let (mut rules, cache) = issuer_rules(IssuerCommon {
        audiences: r.audiences,
        algorithms: &r.algorithms,
        leeway: &r.leeway,
        ttl: &r.jwks_ttl,
        cooldown: &r.refetch_cooldown,
        max_keys: r.max_keys,
    })?;
    if let Some(t) = &r.typ
        && (t.is_empty() || t.iter().any(String::is_empty))
    {
        return Err(invalid(
            "oidc_issuers.typ",
            "omit it, or list non-empty types",
        ));
    }
    if r.job_claims.iter().any(String::is_empty) {
        return Err(invalid(
            "oidc_issuers.job_claims",
            "claim names must be non-empty",
        ));
    }
    rules.allow_multiple_audiences = r.allow_multiple_audiences;
    rules.typ = r.typ;
    rules.single_use = r.single_use;
    rules.job_claims = r.job_claims;
    rules.max_exchange_ttl = dur("oidc_issuers.max_exchange_ttl", &r.max_exchange_ttl)?;
    Ok((
        r.issuer,
        IssuerConfig {
            source,
            cache,
            rules,
            endpoint_auth: EndpointAuth::HttpsWeb { ca_file: None },
        },
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrustDomain {
    pub name: String,
    /// Where the X.509 bundle comes from; inferred from the keys when absent.
    #[serde(default)]
    pub source: Option<RawBundleSource>,
    /// PEM bundle (`source = "file"`), or the bootstrap bundle of an endpoint.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
    #[serde(default)]
    pub bundle_endpoint: Option<String>,
    #[serde(default)]
    pub endpoint_profile: Option<RawEndpointProfile>,
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    pub endpoint_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub refresh_min: Option<String>,
    #[serde(default)]
    pub refresh_max: Option<String>,
}

/// Where a trust domain's bundle comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawBundleSource {
    File,
    Endpoint,
    WorkloadApi,
}

impl RawBundleSource {
    /// The configured source, or the one the keys imply: an endpoint if one is named,
    /// else a file.
    fn resolve(explicit: Option<Self>, has_endpoint: bool) -> Self {
        explicit.unwrap_or(if has_endpoint {
            Self::Endpoint
        } else {
            Self::File
        })
    }
}

/// How a SPIFFE bundle endpoint server is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEndpointProfile {
    HttpsWeb,
    HttpsSpiffe,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkloadApi {
    /// `unix:///path/to/agent.sock` (the SPIRE agent's public socket).
    pub socket: String,
    #[serde(default = "defaults::wapi_initial_timeout")]
    pub initial_timeout: String,
    #[serde(default = "defaults::wapi_backoff_min")]
    pub backoff_min: String,
    #[serde(default = "defaults::wapi_backoff_max")]
    pub backoff_max: String,
}

/// Where a trust domain's X.509 bundle comes from, validated.
#[derive(Debug, Clone)]
pub enum X509Source {
    /// A PEM file, re-read when it changes.
    File(PathBuf),
    /// A SPIFFE bundle endpoint, refreshed on its `spiffe_refresh_hint`.
    Endpoint(EndpointSpec),
    /// Streamed from the SPIFFE Workload API (`[workload_api]`).
    WorkloadApi,
}

/// A validated `[[trust_domains]]` entry.
#[derive(Debug, Clone)]
pub struct TrustDomainConfig {
    pub name: TrustDomain,
    pub source: X509Source,
}

/// Which source-specific keys a bundle entry set: each source accepts only its own.
struct SourceFields {
    bundle_file: bool,
    bundle_endpoint: bool,
    endpoint_profile: bool,
    endpoint_spiffe_id: bool,
    endpoint_ca_file: bool,
    refresh_bounds: bool,
    allow_insecure_http: bool,
}

impl SourceFields {
    fn check(
        &self,
        table: &'static str,
        td: &TrustDomain,
        source: RawBundleSource,
    ) -> Result<(), ConfigError> {
        let endpoint_only = [
            ("bundle_endpoint", self.bundle_endpoint),
            ("endpoint_profile", self.endpoint_profile),
            ("endpoint_spiffe_id", self.endpoint_spiffe_id),
            ("endpoint_ca_file", self.endpoint_ca_file),
            ("refresh_min/refresh_max", self.refresh_bounds),
            ("allow_insecure_http", self.allow_insecure_http),
        ];
        let (name, forbidden): (&str, Vec<(&str, bool)>) = match source {
            RawBundleSource::File => ("file", endpoint_only.to_vec()),
            RawBundleSource::Endpoint => ("endpoint", Vec::new()),
            RawBundleSource::WorkloadApi => {
                let mut all = endpoint_only.to_vec();
                all.push(("bundle_file", self.bundle_file));
                ("workload_api", all)
            }
        };
        if let Some((key, _)) = forbidden.iter().find(|(_, set)| *set) {
            return Err(invalid(
                table,
                format!("{td}: {key} does not apply to source = \"{name}\""),
            ));
        }
        Ok(())
    }
}

fn endpoint_auth_config(
    table: &'static str,
    td: &TrustDomain,
    profile: Option<RawEndpointProfile>,
    spiffe_id: Option<String>,
    ca_file: Option<PathBuf>,
) -> Result<EndpointAuth, ConfigError> {
    match (profile.unwrap_or(RawEndpointProfile::HttpsWeb), spiffe_id) {
        (RawEndpointProfile::HttpsWeb, None) => Ok(EndpointAuth::HttpsWeb { ca_file }),
        (RawEndpointProfile::HttpsWeb, Some(_)) => Err(invalid(
            table,
            format!("{td}: endpoint_spiffe_id needs endpoint_profile = \"https_spiffe\""),
        )),
        (RawEndpointProfile::HttpsSpiffe, None) => Err(invalid(
            table,
            format!("{td}: endpoint_profile = \"https_spiffe\" needs endpoint_spiffe_id"),
        )),
        (RawEndpointProfile::HttpsSpiffe, Some(id)) => {
            if ca_file.is_some() {
                return Err(invalid(
                    table,
                    format!(
                        "{td}: endpoint_ca_file is for https_web; https_spiffe trusts the bundle of the endpoint's trust domain"
                    ),
                ));
            }
            let id = SpiffeId::parse(&id)
                .map_err(|e| invalid(table, format!("{td}: endpoint_spiffe_id {id:?}: {e}")))?;
            Ok(EndpointAuth::HttpsSpiffe { id })
        }
    }
}

fn trust_domain_config(r: RawTrustDomain) -> Result<TrustDomainConfig, ConfigError> {
    let name = TrustDomain::parse(&r.name).map_err(|e| invalid("trust_domains.name", e))?;
    let source = RawBundleSource::resolve(r.source, r.bundle_endpoint.is_some());
    let fields = SourceFields {
        bundle_file: r.bundle_file.is_some(),
        bundle_endpoint: r.bundle_endpoint.is_some(),
        endpoint_profile: r.endpoint_profile.is_some(),
        endpoint_spiffe_id: r.endpoint_spiffe_id.is_some(),
        endpoint_ca_file: r.endpoint_ca_file.is_some(),
        refresh_bounds: r.refresh_min.is_some() || r.refresh_max.is_some(),
        allow_insecure_http: false,
    };
    fields.check("trust_domains", &name, source)?;
    let source = match source {
        RawBundleSource::File => X509Source::File(r.bundle_file.ok_or_else(|| {
            invalid(
                "trust_domains",
                format!("{name}: source = \"file\" needs bundle_file"),
            )
        })?),
        RawBundleSource::WorkloadApi => X509Source::WorkloadApi,
        RawBundleSource::Endpoint => {
            let url = r.bundle_endpoint.ok_or_else(|| {
                invalid(
                    "trust_domains",
                    format!("{name}: source = \"endpoint\" needs bundle_endpoint"),
                )
            })?;
            check_url("trust_domains.bundle_endpoint", &url, false)?;
            let auth = endpoint_auth_config(
                "trust_domains",
                &name,
                r.endpoint_profile,
                r.endpoint_spiffe_id,
                r.endpoint_ca_file,
            )?;
            if let EndpointAuth::HttpsSpiffe { id } = &auth
                && id.trust_domain() == name.as_str()
                && r.bundle_file.is_none()
            {
                return Err(invalid(
                    "trust_domains",
                    format!(
                        "{name}: an https_spiffe endpoint of the trust domain itself needs bundle_file, the bootstrap bundle its first SVID is verified with"
                    ),
                ));
            }
            let refresh_min = dur(
                "trust_domains.refresh_min",
                r.refresh_min.as_deref().unwrap_or("30s"),
            )?;
            let refresh_max = dur(
                "trust_domains.refresh_max",
                r.refresh_max.as_deref().unwrap_or("1h"),
            )?;
            if refresh_min < Duration::from_secs(1)
                || refresh_min > refresh_max
                || refresh_max > Duration::from_secs(24 * 3600)
            {
                return Err(invalid(
                    "trust_domains.refresh_min",
                    format!("{name}: need 1s <= refresh_min <= refresh_max <= 24h"),
                ));
            }
            X509Source::Endpoint(EndpointSpec {
                url,
                auth,
                bootstrap: r.bundle_file,
                refresh_min,
                refresh_max,
            })
        }
    };
    Ok(TrustDomainConfig { name, source })
}

fn workload_api_config(r: RawWorkloadApi) -> Result<WorkloadApiSettings, ConfigError> {
    // Unix sockets only: the Workload API over TCP has no authentication of either side.
    let path = r
        .socket
        .strip_prefix("unix://")
        .or_else(|| r.socket.strip_prefix("unix:"))
        .filter(|p| p.starts_with('/') && p.len() > 1)
        .ok_or_else(|| {
            invalid(
                "workload_api.socket",
                format!(
                    "{:?}: must be unix:///absolute/path (unix sockets only)",
                    r.socket
                ),
            )
        })?;
    let settings = WorkloadApiSettings {
        socket: format!("unix://{path}"),
        initial_timeout: dur("workload_api.initial_timeout", &r.initial_timeout)?,
        backoff_min: dur("workload_api.backoff_min", &r.backoff_min)?,
        backoff_max: dur("workload_api.backoff_max", &r.backoff_max)?,
    };
    if settings.initial_timeout.is_zero() || settings.initial_timeout > Duration::from_secs(600) {
        return Err(invalid("workload_api.initial_timeout", "must be 1ms..=10m"));
    }
    if settings.backoff_min.is_zero()
        || settings.backoff_min > settings.backoff_max
        || settings.backoff_max > Duration::from_secs(600)
    {
        return Err(invalid(
            "workload_api.backoff_min",
            "need 0 < backoff_min <= backoff_max <= 10m",
        ));
    }
    Ok(settings)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperators {
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
}

// `default` on the struct: a `[policy]` table may give any subset of its keys; each
// missing one takes the default documented in config/mayfly.full.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    pub dir: PathBuf,
    pub reload_interval: String,
}

impl Default for RawPolicy {
    fn default() -> Self {
        Self {
            dir: "config/policies".into(),
            reload_interval: "2s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawStore {
    Embedded {
        #[serde(default = "defaults::store_path")]
        path: PathBuf,
    },
    Redis {
        url: String,
        #[serde(default = "defaults::key_prefix")]
        key_prefix: String,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password_file: Option<PathBuf>,
        #[serde(default)]
        tls_ca_file: Option<PathBuf>,
        /// "server" (trust the server's settings), "aof" (require appendfsync always) or
        /// "wait" (WAIT for replica acknowledgement after each write).
        #[serde(default = "defaults::durability")]
        durability: String,
        #[serde(default = "defaults::wait_replicas")]
        wait_replicas: u32,
        #[serde(default = "defaults::wait_timeout")]
        wait_timeout: String,
        #[serde(default = "defaults::verify_durability")]
        verify_durability: bool,
        #[serde(default = "defaults::op_timeout")]
        op_timeout: String,
    },
}

impl Default for RawStore {
    fn default() -> Self {
        Self::Embedded {
            path: defaults::store_path(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    pub path: PathBuf,
    pub rotate_bytes: u64,
    pub retain_files: usize,
    pub anchor_interval: String,
    pub summary_interval: String,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            path: "mayfly-audit.jsonl".into(),
            rotate_bytes: 64 * 1024 * 1024,
            retain_files: 0,
            anchor_interval: "10s".into(),
            summary_interval: "10s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_task_ttl: String,
    pub max_lease_ttl: String,
    pub default_lease_ttl: String,
    pub pending_timeout: String,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub handshake_timeout: String,
    pub max_page: usize,
    pub max_delegation_depth: usize,
    pub header_read_timeout: String,
    pub body_read_timeout: String,
    pub idle_timeout: String,
    pub h2_keepalive_interval: String,
    pub h2_keepalive_timeout: String,
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_bytes: u32,
    pub max_connections_per_source: usize,
    pub unauth_rate_per_source: u32,
    pub unauth_burst_per_source: u32,
    /// Fraction of a provider's rate budget one principal may use (0 < share ≤ 1).
    pub principal_rate_share: f64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_task_ttl: "24h".into(),
            max_lease_ttl: "1h".into(),
            default_lease_ttl: "15m".into(),
            pending_timeout: "60s".into(),
            max_body_bytes: 64 * 1024,
            max_connections: 4096,
            max_in_flight: 256,
            handshake_timeout: "10s".into(),
            max_page: 500,
            max_delegation_depth: 3,
            header_read_timeout: "10s".into(),
            body_read_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            h2_keepalive_interval: "20s".into(),
            h2_keepalive_timeout: "10s".into(),
            max_header_bytes: 16 * 1024,
            h2_max_concurrent_streams: 64,
            h2_max_header_list_bytes: 16 * 1024,
            max_connections_per_source: 64,
            unauth_rate_per_source: 20,
            unauth_burst_per_source: 40,
            principal_rate_share: 0.5,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReaper {
    pub interval: String,
    pub batch: usize,
    pub claim_hold: String,
    pub max_attempts: u32,
    pub backoff_base: String,
    pub backoff_max: String,
}

impl Default for RawReaper {
    fn default() -> Self {
        Self {
            interval: "1s".into(),
            batch: 500,
            claim_hold: "30s".into(),
            max_attempts: 10,
            backoff_base: "1s".into(),
            backoff_max: "5m".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProviders {
    pub jwt: RawJwt,
    #[serde(default)]
    pub vault: Option<crate::provider::vault::RawVault>,
    #[serde(default)]
    pub aws: Option<crate::provider::aws::RawAws>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub issuer: String,
    /// One fixed key (restart to change it). Exactly one of this and `keys_dir`.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// A key set: `current.pem`, `next.pem`, `previous.pem`, re-read on change.
    #[serde(default)]
    pub keys_dir: Option<PathBuf>,
    /// How often `keys_dir` is checked for changes (default "10s").
    #[serde(default)]
    pub keys_reload_interval: Option<String>,
    /// Sustained mints per second (global across replicas); 0 (default) turns it off.
    #[serde(default)]
    pub rate_limit_per_second: f64,
    #[serde(default = "defaults::jwt_burst")]
    pub rate_limit_burst: f64,
    /// Create the key file with a new key of this algorithm if it does not exist.
    #[serde(default)]
    pub generate_key: Option<SigningAlg>,
    /// Sender-constrained tokens (RFC 8705 / RFC 9449) for targets without an entry
    /// in `targets`.
    #[serde(default = "defaults::jwt_binding")]
    pub binding: Binding,
    /// Per-target settings, keyed by target (the token's `aud`).
    #[serde(default)]
    pub targets: std::collections::BTreeMap<String, RawJwtTarget>,
}

/// `[providers.jwt.targets."<target>"]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwtTarget {
    pub binding: Binding,
}

/// Where the JWT provider's signing keys come from.
#[derive(Debug, Clone)]
pub enum JwtKeys {
    File(PathBuf),
    Dir(crate::provider::jwt::KeyDir),
}

fn jwt_keys(r: &RawJwt) -> Result<JwtKeys, ConfigError> {
    match (&r.signing_key_file, &r.keys_dir) {
        (Some(f), None) => Ok(JwtKeys::File(f.clone())),
        (None, Some(d)) => {
            if r.generate_key.is_some() {
                return Err(invalid(
                    "providers.jwt.generate_key",
                    "only with signing_key_file; a keys_dir is provisioned",
                ));
            }
            let interval = match &r.keys_reload_interval {
                Some(i) => dur("providers.jwt.keys_reload_interval", i)?,
                None => Duration::from_secs(10),
            };
            Ok(JwtKeys::Dir(crate::provider::jwt::KeyDir {
                dir: d.clone(),
                interval,
            }))
        }
        _ => Err(invalid(
            "providers.jwt",
            "give exactly one of signing_key_file and keys_dir",
        )),
    }
}

/// Where leases live.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Embedded { path: PathBuf },
    Redis(RedisConfig),
}

impl StoreConfig {
    /// Opens (connects to) the store.
    pub async fn open(&self) -> Result<Arc<dyn LeaseStore>, crate::lease::StoreError> {
        Ok(match self {
            StoreConfig::Embedded { path } => Arc::new(EmbeddedStore::open(path)?),
            StoreConfig::Redis(cfg) => Arc::new(RedisStore::connect(cfg).await?),
        })
    }

    /// A store named on the command line: a Redis URL (`redis://`, `rediss://`,
    /// `redis+sentinel://`, `redis+cluster://`) with `key_prefix`, or an existing redb file.
    pub fn from_location(location: &str, key_prefix: &str) -> Result<Self, ConfigError> {
        if location.starts_with("redis") {
            let raw: RawStore = toml::from_str(&format!(
                "kind = \"redis\"\nurl = {location:?}\nkey_prefix = {key_prefix:?}"
            ))
            .map_err(|e| invalid("store.url", e))?;
            return store_config(raw);
        }
        let path = PathBuf::from(location);
        if !path.is_file() {
            return Err(invalid("store", format!("{location}: no such store file")));
        }
        Ok(StoreConfig::Embedded { path })
    }
}

fn store_config(raw: RawStore) -> Result<StoreConfig, ConfigError> {
    Ok(match raw {
        RawStore::Embedded { path } => StoreConfig::Embedded { path },
        RawStore::Redis {
            url,
            key_prefix,
            username,
            password_file,
            tls_ca_file,
            durability,
            wait_replicas,
            wait_timeout,
            verify_durability,
            op_timeout,
        } => {
            let known = [
                "redis://",
                "rediss://",
                "redis+sentinel://",
                "redis+cluster://",
            ];
            if !known.iter().any(|k| url.starts_with(k)) {
                return Err(invalid(
                    "store.url",
                    format!("scheme must be one of {known:?}"),
                ));
            }
            if key_prefix.is_empty() || key_prefix.contains(['{', '}', ' ']) {
                return Err(invalid(
                    "store.key_prefix",
                    "non-empty, without braces or spaces",
                ));
            }
            let durability = match durability.as_str() {
                "server" => Durability::Server,
                "aof" => Durability::Aof {
                    verify: verify_durability,
                },
                "wait" => {
                    if wait_replicas == 0 {
                        return Err(invalid("store.wait_replicas", "must be at least 1"));
                    }
                    Durability::Wait {
                        replicas: wait_replicas,
                        timeout: dur("store.wait_timeout", &wait_timeout)?,
                    }
                }
                other => {
                    return Err(invalid(
                        "store.durability",
                        format!("{other:?}: expected \"server\", \"aof\" or \"wait\""),
                    ));
                }
            };
            StoreConfig::Redis(RedisConfig {
                url,
                key_prefix,
                username,
                password_file,
                tls_ca_file,
                durability,
                op_timeout: dur("store.op_timeout", &op_timeout)?,
            })
        }
    })
}

/// Timeouts and limits of the HTTP edge (`[limits]`): what a slow, idle or flooding
/// client may hold. Every one has a safe default (config/mayfly.full.toml).
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// A request's headers must arrive within this (HTTP/1.1; also closes idle
    /// keep-alive connections that start a request and stall).
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this, before any work is admitted.
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    /// Largest request head (HTTP/1.1 read buffer).
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_bytes: u32,
    /// Connections open at once from one source address; past it new ones are dropped.
    pub max_connections_per_source: usize,
    /// Unauthenticated refusals per second a source may cause before its requests without
    /// a verified client certificate are refused unverified (`unauthenticated_rate_limited`).
    pub unauth_rate_per_source: u32,
    pub unauth_burst_per_source: u32,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        // The documented defaults are valid by construction.
        edge_limits(&RawLimits::default()).unwrap_or_else(|_| unreachable!())
    }
}

fn edge_limits(l: &RawLimits) -> Result<EdgeLimits, ConfigError> {
    let positive = |key: &'static str, s: &str| -> Result<Duration, ConfigError> {
        let d = dur(key, s)?;
        if d.is_zero() {
            return Err(invalid(key, "must be positive"));
        }
        Ok(d)
    };
    // hyper refuses a read buffer under 8 KiB.
    if !(8 * 1024..=1024 * 1024).contains(&l.max_header_bytes) {
        return Err(invalid("limits.max_header_bytes", "must be 8 KiB..=1 MiB"));
    }
    if !(1..=1024).contains(&l.h2_max_concurrent_streams) {
        return Err(invalid(
            "limits.h2_max_concurrent_streams",
            "must be 1..=1024",
        ));
    }
    if !(1024..=1024 * 1024).contains(&l.h2_max_header_list_bytes) {
        return Err(invalid(
            "limits.h2_max_header_list_bytes",
            "must be 1 KiB..=1 MiB",
        ));
    }
    if l.max_connections_per_source == 0 {
        return Err(invalid(
            "limits.max_connections_per_source",
            "must be positive",
        ));
    }
    if l.unauth_rate_per_source == 0 || l.unauth_burst_per_source == 0 {
        return Err(invalid(
            "limits.unauth_rate_per_source",
            "rate and burst must be positive",
        ));
    }
    Ok(EdgeLimits {
        header_read_timeout: positive("limits.header_read_timeout", &l.header_read_timeout)?,
        body_read_timeout: positive("limits.body_read_timeout", &l.body_read_timeout)?,
        idle_timeout: positive("limits.idle_timeout", &l.idle_timeout)?,
        h2_keepalive_interval: positive("limits.h2_keepalive_interval", &l.h2_keepalive_interval)?,
        h2_keepalive_timeout: positive("limits.h2_keepalive_timeout", &l.h2_keepalive_timeout)?,
        max_header_bytes: l.max_header_bytes,
        h2_max_concurrent_streams: l.h2_max_concurrent_streams,
        h2_max_header_list_bytes: l.h2_max_header_list_bytes,
        max_connections_per_source: l.max_connections_per_source,
        unauth_rate_per_source: l.unauth_rate_per_source,
        unauth_burst_per_source: l.unauth_burst_per_source,
    })
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
    pub limits: Limits,
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
        let listen = raw
            .listen
            .parse()
            .map_err(|e| invalid("listen", format!("{:?}: {e}", raw.listen)))?;
        if raw.node_id.is_empty()
            || raw.node_id.len() > 64
            || !raw
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            // It names audit records and the node's anchor key in the store.
            return Err(invalid(
                "node_id",
                "must be 1..=64 characters of A-Z a-z 0-9 - . _",
            ));
        }
        if raw.trust_domains.is_empty() {
            return Err(invalid(
                "trust_domains",
                "at least one trust domain is required",
            ));
        }
        let mut trust_domains: Vec<TrustDomainConfig> = Vec::new();
        for td in raw.trust_domains {
            let td = trust_domain_config(td)?;
            if trust_domains.iter().any(|t| t.name == td.name) {
                return Err(invalid(
                    "trust_domains.name",
                    format!("{} is configured twice", td.name),
                ));
            }
            trust_domains.push(td);
        }
        let mut jwt_svid = Vec::new();
        for r in raw.jwt_svid {
            let (td, c) = jwt_svid_config(r)?;
            if jwt_svid.iter().any(|(t, _): &(TrustDomain, _)| t == &td) {
                return Err(invalid(
                    "jwt_svid.trust_domain",
                    format!("{td} is configured twice"),
                ));
            }
            jwt_svid.push((td, c));
        }
        // An https_spiffe endpoint is authenticated with the X.509 bundle of its SPIFFE
        // ID's trust domain: that trust domain must be one Mayfly trusts.
        let endpoint_ids = trust_domains
            .iter()
            .filter_map(|t| match &t.source {
                X509Source::Endpoint(EndpointSpec {
                    auth: EndpointAuth::HttpsSpiffe { id },
                    ..
                }) => Some(("trust_domains", &t.name, id)),
                _ => None,
            })
            .chain(
                jwt_svid
                    .iter()
                    .filter_map(|(td, c)| match &c.endpoint_auth {
                        EndpointAuth::HttpsSpiffe { id } => Some(("jwt_svid", td, id)),
                        EndpointAuth::HttpsWeb { .. } => None,
                    }),
            );
        for (table, td, id) in endpoint_ids {
            if !trust_domains
                .iter()
                .any(|t| t.name.as_str() == id.trust_domain())
            {
                return Err(invalid(
                    table,
                    format!(
                        "{td}: endpoint_spiffe_id {id} names trust domain {}, which is not in [[trust_domains]]",
                        id.trust_domain()
                    ),
                ));
            }
        }
        let uses_workload_api = trust_domains
            .iter()
            .any(|t| matches!(t.source, X509Source::WorkloadApi))
            || jwt_svid
                .iter()
                .any(|(_, c)| c.source == KeySourceSpec::Pushed);
        let workload_api = raw.workload_api.map(workload_api_config).transpose()?;
        match (&workload_api, uses_workload_api) {
            (None, true) => {
                return Err(invalid(
                    "workload_api",
                    "source = \"workload_api\" is used but there is no [workload_api] table (socket)",
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "workload_api",
                    "[workload_api] is set but no trust domain or jwt_svid has source = \"workload_api\"",
                ));
            }
            _ => {}
        }
        let mut oidc_issuers = Vec::new();
        for r in raw.oidc_issuers {
            let (iss, c) = oidc_config(r)?;
            if oidc_issuers.iter().any(|(i, _): &(String, _)| i == &iss) {
                return Err(invalid(
                    "oidc_issuers.issuer",
                    format!("{iss} is configured twice"),
                ));
            }
            oidc_issuers.push((iss, c));
        }
        let b = raw.bearer;
        if !(1024..=64 * 1024).contains(&b.max_token_bytes) {
            return Err(invalid("bearer.max_token_bytes", "must be 1 KiB..=64 KiB"));
        }
        let mut operators = HashSet::new();
        for id in raw.operators.spiffe_ids {
            let p = Principal::parse(&id)
                .map_err(|e| invalid("operators.spiffe_ids", format!("{id:?}: {e}")))?;
            operators.insert(p.to_string());
        }
        let l = raw.limits;
        let limits = Limits {
            max_task_ttl: dur("limits.max_task_ttl", &l.max_task_ttl)?,
            max_lease_ttl: dur("limits.max_lease_ttl", &l.max_lease_ttl)?,
            default_lease_ttl: dur("limits.default_lease_ttl", &l.default_lease_ttl)?,
            pending_timeout: dur("limits.pending_timeout", &l.pending_timeout)?,
            max_page: l.max_page.clamp(1, 10_000),
            max_delegation_depth: l.max_delegation_depth.min(16),
            principal_rate_share: l.principal_rate_share,
        };
        if !(limits.principal_rate_share > 0.0 && limits.principal_rate_share <= 1.0) {
            return Err(invalid(
                "limits.principal_rate_share",
                "must be > 0 and <= 1",
            ));
        }
        let pending_timeout = limits.pending_timeout;
        if limits.default_lease_ttl > limits.max_lease_ttl {
            return Err(invalid(
                "limits.default_lease_ttl",
                "exceeds limits.max_lease_ttl",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&l.max_body_bytes) {
            return Err(invalid("limits.max_body_bytes", "must be 1 KiB..=16 MiB"));
        }
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be positive"));
        }
        if l.max_in_flight == 0 {
            return Err(invalid("limits.max_in_flight", "must be positive"));
        }
        let edge = edge_limits(&l)?;
        let audit_rotation = crate::audit::Rotation {
            rotate_bytes: raw.audit.rotate_bytes,
            retain_files: raw.audit.retain_files,
        };
        if raw.audit.rotate_bytes < 64 * 1024 {
            return Err(invalid("audit.rotate_bytes", "must be at least 65536"));
        }
        let anchor_interval = dur("audit.anchor_interval", &raw.audit.anchor_interval)?;
        let summary_interval = dur("audit.summary_interval", &raw.audit.summary_interval)?;
        if anchor_interval.is_zero() {
            return Err(invalid("audit.anchor_interval", "must be positive"));
        }
        if summary_interval.is_zero() || summary_interval > Duration::from_secs(3600) {
            return Err(invalid("audit.summary_interval", "must be 1ms..=1h"));
        }
        let r = raw.reaper;
        if r.batch == 0 || r.max_attempts == 0 {
            return Err(invalid("reaper", "batch and max_attempts must be positive"));
        }
        let reaper = ReaperConfig {
            interval: dur("reaper.interval", &r.interval)?,
            batch: r.batch,
            claim_hold: dur("reaper.claim_hold", &r.claim_hold)?,
            retry: RetryPolicy {
                max_attempts: r.max_attempts,
                base: dur("reaper.backoff_base", &r.backoff_base)?,
                max: dur("reaper.backoff_max", &r.backoff_max)?,
            },
        };
        let jwt_key = jwt_keys(&raw.providers.jwt)?;
        let jwt_rate = crate::provider::rate_limit(
            raw.providers.jwt.rate_limit_per_second,
            raw.providers.jwt.rate_limit_burst,
        )
        .map_err(|m| invalid("providers.jwt.rate_limit_per_second", m))?;
        let issuer = raw.providers.jwt.issuer;
        if !issuer.starts_with("https://") {
            return Err(invalid("providers.jwt.issuer", "must be an https:// URL"));
        }
        Ok(Self {
            listen,
            node_id: raw.node_id,
            tls_cert: raw.tls.cert_file,
            tls_key: raw.tls.key_file,
            trust_domains,
            workload_api,
            operators,
            policy_dir: raw.policy.dir,
            policy_reload: dur("policy.reload_interval", &raw.policy.reload_interval)?,
            store: store_config(raw.store)?,
            audit_path: raw.audit.path,
            limits,
            max_body_bytes: l.max_body_bytes,
            max_connections: l.max_connections,
            max_in_flight: l.max_in_flight,
            handshake_timeout: dur("limits.handshake_timeout", &l.handshake_timeout)?,
            edge,
            audit_rotation,
            anchor_interval,
            summary_interval,
            reaper,
            jwt_issuer: issuer.trim_end_matches('/').to_string(),
            jwt_key,
            jwt_generate: raw.providers.jwt.generate_key,
            jwt_bindings: BindingRules {
                default: raw.providers.jwt.binding,
                targets: raw
                    .providers
                    .jwt
                    .targets
                    .into_iter()
                    .map(|(t, c)| (t, c.binding))
                    .collect(),
            },
            dpop: dpop_settings(raw.dpop)?,
            jwt_rate,
            vault: raw
                .providers
                .vault
                .map(|v| crate::provider::vault::VaultConfig::from_raw(v, pending_timeout))
                .transpose()
                .map_err(|(k, m)| invalid(k, m))?,
            aws: raw
                .providers
                .aws
                .map(crate::provider::aws::AwsConfig::from_raw)
                .transpose()
                .map_err(|(k, m)| invalid(k, m))?,
            anomaly: anomaly_config(raw.anomaly)?,
            webhook: raw
                .webhook
                .map(|w| -> Result<_, ConfigError> {
                    if !w.url.starts_with("https://") {
                        return Err(invalid("webhook.url", "must be an https:// URL"));
                    }
                    Ok(crate::webhook::WebhookConfig {
                        url: w.url,
                        secret_file: w.secret_file,
                        ca_file: w.ca_file,
                        timeout: dur("webhook.timeout", &w.timeout)?,
                        max_attempts: w.max_attempts.clamp(1, 20),
                        events: w.events,
                    })
                })
                .transpose()?,
            jwt_svid,
            oidc_issuers,
            max_token_bytes: b.max_token_bytes,
            key_fetch_timeout: dur("bearer.fetch_timeout", &b.fetch_timeout)?,
        })
    }
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

    /// The DPoP verifier's settings, with the nonce key read from its file.
    fn dpop_config(&self) -> Result<crate::identity::dpop::DpopConfig, ConfigError> {
        let nonce = match &self.dpop.nonce_secret_file {
            None => None,
            Some(path) => {
                let secret = std::fs::read(path).map_err(|e| {
                    invalid("dpop.nonce_secret_file", format!("{}: {e}", path.display()))
                })?;
                Some(
                    crate::identity::dpop::NonceKey::new(&secret, self.dpop.nonce_lifetime)
                        .map_err(|e| invalid("dpop.nonce_secret_file", e))?,
                )
            }
        };
        Ok(crate::identity::dpop::DpopConfig {
            max_age: self.dpop.max_age,
            leeway: self.dpop.leeway,
            nonce,
        })
    }

    /// Builds every component. Fails (and nothing starts) if any piece is invalid.
    pub async fn build(&self) -> Result<App, crate::Error> {
        self.build_with_faults(None).await
    }

    /// The bearer-token verifier: one key cache per trust domain and issuer. Keys are
    /// fetched lazily (an issuer that is down at start-up does not stop the broker),
    /// except those the Workload API pushes. `bundles` authenticates `https_spiffe`
    /// bundle endpoints.
    pub fn bearer_verifier(
        &self,
        bundles: &Arc<LiveBundles>,
    ) -> Result<BearerVerifier, crate::Error> {
        let http = reqwest::Client::builder()
            .timeout(self.key_fetch_timeout)
            // A JWKS location is configuration; a redirect must not move it elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| crate::Error::Tls(format!("key fetch client: {e}")))?;
        let mut v = BearerVerifier::new(self.max_token_bytes);
        let issuer = |c: &IssuerConfig, spiffe: bool| -> Result<TrustedIssuer, crate::Error> {
            let client = match (&c.source, &c.endpoint_auth) {
                (KeySourceSpec::Url(url), auth @ EndpointAuth::HttpsSpiffe { .. })
                | (KeySourceSpec::Url(url), auth @ EndpointAuth::HttpsWeb { ca_file: Some(_) }) => {
                    crate::identity::bundle_endpoint::http_client(
                        url,
                        auth,
                        bundles,
                        self.key_fetch_timeout,
                    )?
                }
                _ => http.clone(),
            };
            Ok(TrustedIssuer {
                rules: c.rules.clone(),
                keys: Arc::new(KeyCache::new(
                    c.source.clone(),
                    c.cache.clone(),
                    spiffe,
                    client,
                )),
            })
        };
        for (td, c) in &self.jwt_svid {
            v.add_trust_domain(td.as_str(), issuer(c, true)?);
        }
        for (iss, c) in &self.oidc_issuers {
            v.add_oidc_issuer(iss, issuer(c, false)?);
        }
        Ok(v)
    }

    /// Loads every trust domain's first X.509 bundle (and the Workload API's JWT
    /// bundles) and starts the tasks that keep them current. Fails — and the broker
    /// does not start — when a source without a fallback yields nothing.
    async fn start_bundle_sources(
        &self,
        bundles: &Arc<LiveBundles>,
        bearer: &BearerVerifier,
    ) -> Result<BundleSources, crate::Error> {
        let mut sources = BundleSources::default();
        // The Workload API first: an https_spiffe endpoint may be authenticated with a
        // bundle it serves.
        if let Some(settings) = &self.workload_api {
            let x509 = self
                .trust_domains
                .iter()
                .filter(|t| matches!(t.source, X509Source::WorkloadApi))
                .map(|t| t.name.clone())
                .collect();
            let jwt = self
                .jwt_svid
                .iter()
                .filter(|(_, c)| c.source == KeySourceSpec::Pushed)
                .filter_map(|(td, c)| {
                    bearer.svid_keys(td.as_str()).map(|keys| JwtTarget {
                        trust_domain: td.clone(),
                        keys: keys.clone(),
                        max_keys: c.cache.max_keys,
                    })
                })
                .collect();
            let source = crate::identity::workload_api::start(
                settings.clone(),
                Targets { x509, jwt },
                bundles.clone(),
            )
            .await?;
            sources.workload_api = Some(source);
        }
        for t in &self.trust_domains {
            let X509Source::Endpoint(spec) = &t.source else {
                continue;
            };
            let mut source = EndpointSource::new(
                t.name.clone(),
                spec.clone(),
                bundles.clone(),
                self.key_fetch_timeout,
            )?;
            let next = source.initial().await?;
            sources.tasks.push(AbortOnDrop(source.spawn(next)));
        }
        Ok(sources)
    }

    /// `build`, with a fault-injection hook in the broker (crash-safety tests).
    pub async fn build_with_faults(
        &self,
        faults: Option<crate::broker::FaultHook>,
    ) -> Result<App, crate::Error> {
        let files: Vec<(TrustDomain, PathBuf)> = self
            .trust_domains
            .iter()
            .filter_map(|t| match &t.source {
                X509Source::File(p) => Some((t.name.clone(), p.clone())),
                _ => None,
            })
            .collect();
        let bundles = Arc::new(LiveBundles::load(&files)?);
        let bearer = self.bearer_verifier(&bundles)?;
        let bundle_sources = self.start_bundle_sources(&bundles, &bearer).await?;
        let bearer = Arc::new(bearer);
        let policy = Arc::new(PolicyEngine::load(&self.policy_dir)?);
        let store = self.store.open().await?;
        let tap = self
            .webhook
            .as_ref()
            .map(crate::webhook::Webhook::start)
            .transpose()
            .map_err(|e| invalid("webhook", e))?;
        let audit =
            AuditLog::open_rotating(&self.audit_path, &self.node_id, tap, self.audit_rotation)?;
        let jwt = Arc::new(match &self.jwt_key {
            JwtKeys::File(path) => JwtIssuer::new(
                self.jwt_issuer.clone(),
                SigningKey::load_or_generate(path, self.jwt_generate)?,
            ),
            JwtKeys::Dir(dir) => JwtIssuer::from_dir(self.jwt_issuer.clone(), dir.clone())?,
        });
        let mut providers = Providers::default();
        providers.insert_limited(
            Arc::new(JwtProvider::with_bindings(
                jwt.clone(),
                self.jwt_bindings.clone(),
            )),
            self.jwt_rate,
        );
        let dpop = Arc::new(crate::identity::dpop::DpopVerifier::new(
            self.dpop_config()?,
            store.clone(),
        ));
        if let Some(v) = &self.vault {
            let p = crate::provider::vault::VaultProvider::new(v.clone())
                .map_err(|e| invalid("providers.vault", e))?;
            let rate = p.rate();
            providers.insert_limited(Arc::new(p), rate);
        }
        if let Some(a) = &self.aws {
            let p =
                crate::provider::aws::AwsProvider::start(a.clone(), store.clone(), audit.clone())
                    .await
                    .map_err(|e| invalid("providers.aws", e))?;
            let rate = p.rate();
            providers.insert_limited(p, rate);
        }
        let revoker = Arc::new(Revoker::new(
            store.clone(),
            providers.clone(),
            audit.clone(),
            self.reaper.clone(),
        ));
        let broker = Arc::new(Broker::new(BrokerParts {
            store: store.clone(),
            policy: policy.clone(),
            providers,
            revoker: revoker.clone(),
            jwt,
            audit: audit.clone(),
            operators: self.operators.clone(),
            limits: self.limits.clone(),
            faults,
            anomaly: Arc::new(crate::anomaly::AnomalyEngine::new(
                self.anomaly.clone(),
                store.clone(),
            )),
            dpop,
        }));
        let serving = crate::api::tls::ServingCert::load(&self.tls_cert, &self.tls_key)?;
        let tls = crate::api::tls::server_config(serving.clone())?;
        Ok(App {
            bearer,
            broker,
            store,
            revoker,
            policy,
            audit,
            bundles,
            bundle_sources,
            serving,
            tls,
            config: self.clone(),
        })
    }
}

/// The built broker, ready to serve.
pub struct App {
    pub broker: Arc<Broker>,
    pub bearer: Arc<BearerVerifier>,
    pub store: Arc<dyn LeaseStore>,
    pub revoker: Arc<Revoker>,
    pub policy: Arc<PolicyEngine>,
    pub audit: AuditLog,
    /// X.509 trust bundles, kept current while running by their sources.
    pub bundles: Arc<crate::identity::LiveBundles>,
    /// The bundle endpoint and Workload API tasks; they stop when the `App` is dropped.
    pub bundle_sources: BundleSources,
    /// The serving certificate, re-read while running when its files change.
    pub serving: Arc<crate::api::tls::ServingCert>,
    pub tls: Arc<rustls::ServerConfig>,
    pub config: Config,
}

/// A task aborted when dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The running bundle sources (file-sourced bundles are re-read by `serve`).
#[derive(Default)]
pub struct BundleSources {
    pub workload_api: Option<WorkloadApiSource>,
    pub tasks: Vec<AbortOnDrop>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal config with trust domain entries `tds` (TOML) and `extra` tables.
    fn config(tds: &str, extra: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{tds}\n{extra}\n\
             [providers.jwt]\nissuer = \"https://mayfly.test\"\nsigning_key_file = \"j.pem\"\n"
        );
        Config::from_toml(&text, Path::new("test.toml"))
    }

    fn refused(result: Result<Config, ConfigError>) -> (&'static str, String) {
        match result {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected an invalid-key error, got {other:?}"),
        }
    }

    const WAPI: &str = "[workload_api]\nsocket = \"unix:///run/spire/api.sock\"\n";

    const TD: &str = "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n";

    #[test]
    fn edge_limits_and_audit_keys_have_their_documented_defaults() {
        let c = config(TD, "").expect("valid");
        let e = &c.edge;
        assert_eq!(e.header_read_timeout, Duration::from_secs(10));
        assert_eq!(e.body_read_timeout, Duration::from_secs(10));
        assert_eq!(e.idle_timeout, Duration::from_secs(60));
        assert_eq!(e.h2_keepalive_interval, Duration::from_secs(20));
        assert_eq!(e.h2_keepalive_timeout, Duration::from_secs(10));
        assert_eq!(e.max_header_bytes, 16384);
        assert_eq!(e.h2_max_concurrent_streams, 64);
        assert_eq!(e.h2_max_header_list_bytes, 16384);
        assert_eq!(e.max_connections_per_source, 64);
        assert_eq!(
            (e.unauth_rate_per_source, e.unauth_burst_per_source),
            (20, 40)
        );
        assert_eq!(c.audit_rotation.rotate_bytes, 67_108_864);
        assert_eq!(c.audit_rotation.retain_files, 0);
        assert_eq!(c.anchor_interval, Duration::from_secs(10));
        assert_eq!(c.summary_interval, Duration::from_secs(10));
    }

    #[test]
    fn unsafe_edge_limits_are_refused_by_key() {
        for (extra, want) in [
            (
                "[limits]\nmax_header_bytes = 100",
                "limits.max_header_bytes",
            ),
            (
                "[limits]\nbody_read_timeout = \"0s\"",
                "limits.body_read_timeout",
            ),
            ("[limits]\nidle_timeout = \"soon\"", "limits.idle_timeout"),
            (
                "[limits]\nmax_connections_per_source = 0",
                "limits.max_connections_per_source",
            ),
            (
                "[limits]\nh2_max_concurrent_streams = 0",
                "limits.h2_max_concurrent_streams",
            ),
            ("[audit]\nrotate_bytes = 10", "audit.rotate_bytes"),
            (
                "[audit]\nsummary_interval = \"2h\"",
                "audit.summary_interval",
            ),
        ] {
            let (key, _) = refused(config(TD, extra));
            assert_eq!(key, want, "{extra}");
        }
    }

    #[test]
    fn mayfly_node_id_overrides_the_configured_node_id_and_is_validated() {
        let text = format!(
            "node_id = \"from-file\"\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{TD}\n\
             [providers.jwt]\nissuer = \"https://mayfly.test\"\nsigning_key_file = \"j.pem\"\n"
        );
        let origin = Path::new("t.toml");
        let c = Config::from_toml_with_node_id(&text, origin, None).expect("valid");
        assert_eq!(c.node_id, "from-file");
        let c =
            Config::from_toml_with_node_id(&text, origin, Some("mayfly-2".into())).expect("valid");
        assert_eq!(c.node_id, "mayfly-2");
        let (key, _) = refused(Config::from_toml_with_node_id(
            &text,
            origin,
            Some("a b".into()),
        ));
        assert_eq!(key, "node_id");
    }

    #[test]
    fn binding_and_dpop_settings_have_their_documented_defaults_and_bounds() {
        let td = "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n";
        let c = config(td, "").expect("valid");
        assert_eq!(c.jwt_bindings, BindingRules::default());
        assert_eq!(c.jwt_bindings.default, Binding::Optional);
        assert_eq!(
            (c.dpop.max_age, c.dpop.leeway, c.dpop.nonce_lifetime),
            (
                Duration::from_secs(60),
                Duration::from_secs(5),
                Duration::from_secs(60)
            )
        );
        assert_eq!(c.dpop.nonce_secret_file, None);
        let c = config(
            td,
            "[providers.jwt.targets.\"https://x.test\"]\nbinding = \"required\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.jwt_bindings.for_target("https://x.test"),
            Binding::Required
        );
        assert_eq!(
            c.jwt_bindings.for_target("https://y.test"),
            Binding::Optional
        );
        for (extra, want) in [
            ("[dpop]\nmax_age = \"11m\"\n", "dpop.max_age"),
            ("[dpop]\nleeway = \"2m\"\n", "dpop.leeway"),
        ] {
            assert_eq!(refused(config(td, extra)).0, want, "{extra}");
        }
    }

    #[test]
    fn each_bundle_source_is_inferred_or_named() {
        let c = config(
            "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n\
             [[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
             [[trust_domains]]\nname = \"c.test\"\nsource = \"workload_api\"\n",
            WAPI,
        )
        .expect("valid");
        assert!(matches!(c.trust_domains[0].source, X509Source::File(_)));
        let X509Source::Endpoint(spec) = &c.trust_domains[1].source else {
            panic!("endpoint expected");
        };
        assert_eq!(spec.auth, EndpointAuth::HttpsWeb { ca_file: None });
        assert_eq!(
            (spec.refresh_min, spec.refresh_max),
            (Duration::from_secs(30), Duration::from_secs(3600))
        );
        assert!(matches!(c.trust_domains[2].source, X509Source::WorkloadApi));
        let w = c.workload_api.expect("workload api");
        assert_eq!(w.socket, "unix:///run/spire/api.sock");
        assert_eq!(w.initial_timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_key_of_another_source_is_refused() {
        let (key, msg) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\nbundle_file = \"a.pem\"\n",
            WAPI,
        ));
        assert_eq!(key, "trust_domains");
        assert!(
            msg.contains("bundle_file does not apply to source = \"workload_api\""),
            "{msg}"
        );
        let (_, msg) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\nrefresh_min = \"1s\"\n",
            "",
        ));
        assert!(
            msg.contains("refresh_min/refresh_max does not apply to source = \"file\""),
            "{msg}"
        );
    }

    #[test]
    fn the_workload_api_table_and_its_users_come_together() {
        let (key, msg) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\n",
            "",
        ));
        assert_eq!(key, "workload_api");
        assert!(msg.contains("no [workload_api] table"), "{msg}");
        let (key, msg) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
            WAPI,
        ));
        assert_eq!(key, "workload_api");
        assert!(msg.contains("no trust domain or jwt_svid"), "{msg}");
    }

    #[test]
    fn the_workload_api_socket_must_be_an_absolute_unix_socket() {
        for socket in [
            "tcp://127.0.0.1:8081",
            "unix://relative.sock",
            "/run/api.sock",
            "unix:",
        ] {
            let (key, _) = refused(config(
                "[[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\n",
                &format!("[workload_api]\nsocket = \"{socket}\"\n"),
            ));
            assert_eq!(key, "workload_api.socket", "{socket}");
        }
    }

    #[test]
    fn an_https_spiffe_endpoint_of_its_own_domain_needs_a_bootstrap_bundle() {
        let td = "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
                  endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.test/spire\"\n";
        let (_, msg) = refused(config(td, ""));
        assert!(msg.contains("needs bundle_file"), "{msg}");
        let c = config(&format!("{td}bundle_file = \"b.pem\"\n"), "").expect("valid");
        let X509Source::Endpoint(spec) = &c.trust_domains[0].source else {
            panic!("endpoint expected");
        };
        assert!(
            matches!(&spec.auth, EndpointAuth::HttpsSpiffe { id } if id.as_str() == "spiffe://b.test/spire")
        );
    }

    #[test]
    fn profile_keys_must_match_the_profile() {
        let base = "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\nbundle_file = \"b.pem\"\n";
        let (_, msg) = refused(config(
            &format!("{base}endpoint_profile = \"https_spiffe\"\n"),
            "",
        ));
        assert!(msg.contains("needs endpoint_spiffe_id"), "{msg}");
        let (_, msg) = refused(config(
            &format!("{base}endpoint_spiffe_id = \"spiffe://b.test/spire\"\n"),
            "",
        ));
        assert!(
            msg.contains("needs endpoint_profile = \"https_spiffe\""),
            "{msg}"
        );
        let (_, msg) = refused(config(
            &format!(
                "{base}endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.test/spire\"\nendpoint_ca_file = \"ca.pem\"\n"
            ),
            "",
        ));
        assert!(msg.contains("endpoint_ca_file is for https_web"), "{msg}");
        let (key, _) = refused(config(
            "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"http://b.test/bundle\"\n",
            "",
        ));
        assert_eq!(key, "trust_domains.bundle_endpoint");
    }

    #[test]
    fn an_https_spiffe_endpoint_id_must_name_a_trusted_domain() {
        let (key, msg) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
            "[[jwt_svid]]\ntrust_domain = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
             endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://c.test/spire\"\n\
             audiences = [\"x\"]\n",
        ));
        assert_eq!(key, "jwt_svid");
        assert!(
            msg.contains("c.test, which is not in [[trust_domains]]"),
            "{msg}"
        );
    }

    #[test]
    fn refresh_bounds_are_checked() {
        let (key, _) = refused(config(
            "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
             refresh_min = \"2h\"\nrefresh_max = \"1h\"\n",
            "",
        ));
        assert_eq!(key, "trust_domains.refresh_min");
    }

    #[test]
    fn a_trust_domain_configured_twice_is_refused() {
        let (key, msg) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n\
             [[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\n",
            WAPI,
        ));
        assert_eq!(key, "trust_domains.name");
        assert!(msg.contains("twice"), "{msg}");
    }

    #[test]
    fn jwt_svid_keys_from_the_workload_api_take_no_bundle_key() {
        let c = config(
            "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
            &format!(
                "{WAPI}[[jwt_svid]]\ntrust_domain = \"a.test\"\nsource = \"workload_api\"\naudiences = [\"x\"]\n"
            ),
        )
        .expect("valid");
        assert_eq!(c.jwt_svid[0].1.source, KeySourceSpec::Pushed);
        let (key, msg) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
            &format!(
                "{WAPI}[[jwt_svid]]\ntrust_domain = \"a.test\"\nsource = \"workload_api\"\nbundle_file = \"j.json\"\naudiences = [\"x\"]\n"
            ),
        ));
        assert_eq!(key, "jwt_svid");
        assert!(msg.contains("bundle_file does not apply"), "{msg}");
    }

    /// The value `config/mayfly.full.toml` documents for `key` in `section`: the
    /// `default "X"` (or `default X`) its comment names, else the value shown (the
    /// file's convention: a value without a "default" note is the default). Commented-out
    /// sections and keys (`# [webhook]`, `# timeout = "5s"`) count.
    fn documented(section: &str, key: &str) -> String {
        let text = include_str!("../../config/mayfly.full.toml");
        let mut current = String::new();
        for line in text.lines() {
            let l = line.trim_start_matches('#').trim();
            if let Some(h) = l.strip_prefix('[')
                && let Some(end) = h.find(']')
            {
                current = h[..end].trim_start_matches('[').to_string();
                continue;
            }
            if current != section {
                continue;
            }
            let Some((k, rest)) = l.split_once(" = ") else {
                continue;
            };
            if k.trim() != key {
                continue;
            }
            let (value, comment) = rest.split_once('#').unwrap_or((rest, ""));
            let pick = match comment.split_once("default ") {
                // `default "a:b" …`: the quoted value; `default 5: …`: up to the punctuation.
                Some((_, d)) => match d.strip_prefix('"') {
                    Some(q) => q.split('"').next().unwrap_or(q),
                    None => d.split([':', ';', ' ', ',']).next().unwrap_or(d),
                },
                None => value,
            };
            return pick.trim().trim_matches('"').to_string();
        }
        panic!("config/mayfly.full.toml documents no {section}.{key}");
    }

    fn doc_dur(section: &str, key: &str) -> Duration {
        crate::duration::parse(&documented(section, key)).expect("documented duration")
    }

    fn doc_num<T: std::str::FromStr>(section: &str, key: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        documented(section, key).parse().expect("documented number")
    }

    /// Every section given with only its required keys: each missing key takes the
    /// default mayfly.full.toml documents (a `[policy]` table without reload_interval
    /// once stopped start-up with `missing field`).
    #[test]
    fn required_keys_only_take_the_documented_defaults() {
        let cfg = config(
            "[[trust_domains]]\nname = \"example.org\"\nbundle_file = \"b.pem\"\n\
             [[trust_domains]]\nname = \"wapi.example.org\"\nsource = \"workload_api\"\n",
            "[policy]\n[store]\nkind = \"embedded\"\n[audit]\n[limits]\n[reaper]\n[bearer]\n\
             [anomaly]\n[operators]\n\
             [workload_api]\nsocket = \"unix:///run/spire/api.sock\"\n\
             [[jwt_svid]]\ntrust_domain = \"example.org\"\nbundle_file = \"j.json\"\naudiences = [\"a\"]\n\
             [[oidc_issuers]]\nissuer = \"https://issuer.example.org\"\naudiences = [\"a\"]\n\
             [webhook]\nurl = \"https://hooks.example.org/m\"\nsecret_file = \"s\"\n",
        )
        .expect("a config with only the required keys parses");
        assert_eq!(cfg.listen.to_string(), documented("", "listen"));
        assert_eq!(cfg.node_id, documented("", "node_id"));
        assert_eq!(cfg.policy_dir, PathBuf::from(documented("policy", "dir")));
        assert_eq!(cfg.policy_reload, doc_dur("policy", "reload_interval"));
        match &cfg.store {
            StoreConfig::Embedded { path } => {
                assert_eq!(path, &PathBuf::from(documented("store", "path")));
            }
            other => panic!("expected the embedded store, got {other:?}"),
        }
        assert_eq!(cfg.audit_path, PathBuf::from(documented("audit", "path")));
        let l = &cfg.limits;
        assert_eq!(l.max_task_ttl, doc_dur("limits", "max_task_ttl"));
        assert_eq!(l.max_lease_ttl, doc_dur("limits", "max_lease_ttl"));
        assert_eq!(l.default_lease_ttl, doc_dur("limits", "default_lease_ttl"));
        assert_eq!(l.pending_timeout, doc_dur("limits", "pending_timeout"));
        assert_eq!(l.max_page, doc_num::<usize>("limits", "max_page"));
        assert_eq!(
            l.max_delegation_depth,
            doc_num::<usize>("limits", "max_delegation_depth")
        );
        assert_eq!(
            cfg.max_body_bytes,
            doc_num::<usize>("limits", "max_body_bytes")
        );
        assert_eq!(
            cfg.max_connections,
            doc_num::<usize>("limits", "max_connections")
        );
        assert_eq!(
            cfg.max_in_flight,
            doc_num::<usize>("limits", "max_in_flight")
        );
        assert_eq!(
            cfg.handshake_timeout,
            doc_dur("limits", "handshake_timeout")
        );
        let r = &cfg.reaper;
        assert_eq!(r.interval, doc_dur("reaper", "interval"));
        assert_eq!(r.batch, doc_num::<usize>("reaper", "batch"));
        assert_eq!(r.claim_hold, doc_dur("reaper", "claim_hold"));
        assert_eq!(
            r.retry.max_attempts,
            doc_num::<u32>("reaper", "max_attempts")
        );
        assert_eq!(r.retry.base, doc_dur("reaper", "backoff_base"));
        assert_eq!(r.retry.max, doc_dur("reaper", "backoff_max"));
        assert_eq!(
            cfg.max_token_bytes,
            doc_num::<usize>("bearer", "max_token_bytes")
        );
        assert_eq!(cfg.key_fetch_timeout, doc_dur("bearer", "fetch_timeout"));
        assert_eq!(cfg.anomaly.risk_window, doc_dur("anomaly", "risk_window"));
        assert_eq!(cfg.anomaly.deny_for, doc_dur("anomaly", "deny_for"));
        let w = cfg.workload_api.as_ref().expect("workload_api");
        assert_eq!(
            w.initial_timeout,
            doc_dur("workload_api", "initial_timeout")
        );
        assert_eq!(w.backoff_min, doc_dur("workload_api", "backoff_min"));
        assert_eq!(w.backoff_max, doc_dur("workload_api", "backoff_max"));
        let (_, svid) = &cfg.jwt_svid[0];
        assert_eq!(svid.rules.leeway, doc_dur("jwt_svid", "leeway"));
        assert_eq!(svid.cache.ttl, doc_dur("jwt_svid", "refresh_interval"));
        assert_eq!(svid.cache.cooldown, doc_dur("jwt_svid", "refetch_cooldown"));
        assert_eq!(
            svid.cache.max_keys,
            doc_num::<usize>("jwt_svid", "max_keys")
        );
        assert_eq!(
            svid.rules.allow_multiple_audiences,
            doc_num::<bool>("jwt_svid", "allow_multiple_audiences")
        );
        assert_eq!(
            svid.rules.single_use,
            doc_num::<bool>("jwt_svid", "single_use")
        );
        let (_, oidc) = &cfg.oidc_issuers[0];
        assert_eq!(oidc.rules.leeway, doc_dur("oidc_issuers", "leeway"));
        assert_eq!(oidc.cache.ttl, doc_dur("oidc_issuers", "jwks_ttl"));
        assert_eq!(
            oidc.cache.cooldown,
            doc_dur("oidc_issuers", "refetch_cooldown")
        );
        assert_eq!(
            oidc.cache.max_keys,
            doc_num::<usize>("oidc_issuers", "max_keys")
        );
        assert_eq!(
            oidc.rules.allow_multiple_audiences,
            doc_num::<bool>("oidc_issuers", "allow_multiple_audiences")
        );
        assert_eq!(
            oidc.rules.single_use,
            doc_num::<bool>("oidc_issuers", "single_use")
        );
        assert_eq!(
            oidc.rules.max_exchange_ttl,
            doc_dur("oidc_issuers", "max_exchange_ttl")
        );
        assert!(oidc.rules.job_claims.is_empty(), "job_claims default: none");
        let hook = cfg.webhook.as_ref().expect("webhook");
        assert_eq!(hook.timeout, doc_dur("webhook", "timeout"));
        assert_eq!(hook.max_attempts, doc_num::<u32>("webhook", "max_attempts"));
    }

    /// The providers with only their required keys parse, and take the documented
    /// defaults.
    #[test]
    fn providers_with_required_keys_only_take_the_documented_defaults() {
        let text = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
             [[trust_domains]]\nname = \"example.org\"\nbundle_file = \"b.pem\"\n\
             [providers.jwt]\nissuer = \"https://mayfly.test\"\nsigning_key_file = \"j.pem\"\n\
             [providers.vault]\naddress = \"https://vault.example.org\"\ntoken_file = \"t\"\n\
             [providers.vault.targets.db]\nkind = \"dynamic\"\npath = \"database/creds/ro\"\nmax_ttl = \"1h\"\n\
             [providers.aws]\nregion = \"us-east-1\"\n\
             [providers.aws.targets.r]\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
        let cfg = Config::from_toml(text, Path::new("test.toml"))
            .expect("providers with only the required keys parse");
        let vault = cfg.vault.as_ref().expect("vault");
        assert_eq!(vault.timeout, doc_dur("providers.vault", "timeout"));
        let aws = cfg.aws.as_ref().expect("aws");
        assert_eq!(aws.timeout, doc_dur("providers.aws", "timeout"));
        assert_eq!(
            aws.prune_interval,
            doc_dur("providers.aws", "prune_interval")
        );
        assert_eq!(
            aws.deny_policy_name,
            documented("providers.aws", "deny_policy_name")
        );
    }
}
