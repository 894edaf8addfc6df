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
use crate::identity::jwks::{CacheSettings, KeyCache, KeySourceSpec};
use crate::identity::{Principal, TrustDomain};
use crate::lease::LeaseStore;
use crate::lease::embedded::EmbeddedStore;
use crate::lease::redis::{Durability, RedisConfig, RedisStore};
use crate::policy::PolicyEngine;
use crate::provider::Providers;
use crate::provider::jwt::{JwtIssuer, JwtProvider, SigningAlg, SigningKey};
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
    /// A SPIFFE bundle endpoint (https_web profile): the same document over HTTPS.
    #[serde(default)]
    pub bundle_endpoint: Option<String>,
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
    pub replay_cache_size: usize,
    pub fetch_timeout: String,
}

impl Default for RawBearer {
    fn default() -> Self {
        Self {
            max_token_bytes: 8 * 1024,
            replay_cache_size: 100_000,
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
}

/// An http(s) URL Mayfly may fetch keys from: https, or http to a loopback host only
/// when explicitly allowed (tests, `mayfly dev`).
fn check_url(key: &'static str, url: &str, allow_http: bool) -> Result<(), ConfigError> {
    if url.starts_with("https://") && url.len() > "https://".len() {
        return Ok(());
    }
    if allow_http && let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        if matches!(host, "127.0.0.1" | "localhost" | "[") || rest.starts_with("[::1]") {
            return Ok(());
        }
        return Err(invalid(
            key,
            format!("{url:?}: http:// only to a loopback host"),
        ));
    }
    Err(invalid(key, format!("{url:?} must be an https:// URL")))
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
    let source = match (r.bundle_file, r.bundle_endpoint) {
        (Some(f), None) => KeySourceSpec::File(f),
        (None, Some(u)) => {
            check_url("jwt_svid.bundle_endpoint", &u, r.allow_insecure_http)?;
            KeySourceSpec::Url(u)
        }
        _ => {
            return Err(invalid(
                "jwt_svid",
                format!("{td}: give exactly one of bundle_file, bundle_endpoint"),
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
    pub bundle_file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperators {
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
            path: "mayfly-leases.redb".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: PathBuf,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            path: "mayfly-audit.jsonl".into(),
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub issuer: String,
    pub signing_key_file: PathBuf,
    /// Create the key file with a new key of this algorithm if it does not exist.
    #[serde(default)]
    pub generate_key: Option<SigningAlg>,
}

/// Where leases live.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Embedded { path: PathBuf },
    Redis(RedisConfig),
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

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub node_id: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub trust_domains: Vec<(TrustDomain, PathBuf)>,
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
    pub reaper: ReaperConfig,
    pub jwt_issuer: String,
    pub jwt_key: PathBuf,
    pub jwt_generate: Option<SigningAlg>,
    pub anomaly: AnomalyConfig,
    pub webhook: Option<crate::webhook::WebhookConfig>,
    pub jwt_svid: Vec<(TrustDomain, IssuerConfig)>,
    pub oidc_issuers: Vec<(String, IssuerConfig)>,
    pub max_token_bytes: usize,
    pub replay_cache_size: usize,
    pub key_fetch_timeout: Duration,
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;
    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let listen = raw
            .listen
            .parse()
            .map_err(|e| invalid("listen", format!("{:?}: {e}", raw.listen)))?;
        if raw.node_id.is_empty() || raw.node_id.len() > 64 {
            return Err(invalid("node_id", "must be 1..=64 characters"));
        }
        if raw.trust_domains.is_empty() {
            return Err(invalid(
                "trust_domains",
                "at least one trust domain is required",
            ));
        }
        let mut trust_domains = Vec::new();
        for td in raw.trust_domains {
            let name =
                TrustDomain::parse(&td.name).map_err(|e| invalid("trust_domains.name", e))?;
            trust_domains.push((name, td.bundle_file));
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
        if b.replay_cache_size == 0 {
            return Err(invalid("bearer.replay_cache_size", "must be positive"));
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
        };
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
            reaper,
            jwt_issuer: issuer.trim_end_matches('/').to_string(),
            jwt_key: raw.providers.jwt.signing_key_file,
            jwt_generate: raw.providers.jwt.generate_key,
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
            replay_cache_size: b.replay_cache_size,
            key_fetch_timeout: dur("bearer.fetch_timeout", &b.fetch_timeout)?,
        })
    }
}

impl Config {
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        raw.try_into()
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Builds every component. Fails (and nothing starts) if any piece is invalid.
    pub async fn build(&self) -> Result<App, crate::Error> {
        self.build_with_faults(None).await
    }

    /// The bearer-token verifier: one key cache per trust domain and issuer. Keys are
    /// fetched lazily (an issuer that is down at start-up does not stop the broker).
    pub fn bearer_verifier(&self) -> Result<BearerVerifier, crate::Error> {
        let http = reqwest::Client::builder()
            .timeout(self.key_fetch_timeout)
            // A JWKS location is configuration; a redirect must not move it elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| crate::Error::Tls(format!("key fetch client: {e}")))?;
        let mut v = BearerVerifier::new(self.max_token_bytes, self.replay_cache_size);
        let issuer = |c: &IssuerConfig, spiffe: bool| TrustedIssuer {
            rules: c.rules.clone(),
            keys: Arc::new(KeyCache::new(
                c.source.clone(),
                c.cache.clone(),
                spiffe,
                http.clone(),
            )),
        };
        for (td, c) in &self.jwt_svid {
            v.add_trust_domain(td.as_str(), issuer(c, true));
        }
        for (iss, c) in &self.oidc_issuers {
            v.add_oidc_issuer(iss, issuer(c, false));
        }
        Ok(v)
    }

    /// `build`, with a fault-injection hook in the broker (crash-safety tests).
    pub async fn build_with_faults(
        &self,
        faults: Option<crate::broker::FaultHook>,
    ) -> Result<App, crate::Error> {
        let bundles = crate::identity::LiveBundles::load(&self.trust_domains)?;
        let policy = Arc::new(PolicyEngine::load(&self.policy_dir)?);
        let store: Arc<dyn LeaseStore> = match &self.store {
            StoreConfig::Embedded { path } => Arc::new(EmbeddedStore::open(path)?),
            StoreConfig::Redis(cfg) => Arc::new(RedisStore::connect(cfg).await?),
        };
        let tap = self
            .webhook
            .as_ref()
            .map(crate::webhook::Webhook::start)
            .transpose()
            .map_err(|e| invalid("webhook", e))?;
        let audit = AuditLog::open_with_tap(&self.audit_path, &self.node_id, tap)?;
        let key = SigningKey::load_or_generate(&self.jwt_key, self.jwt_generate)?;
        let jwt = Arc::new(JwtIssuer::new(self.jwt_issuer.clone(), key));
        let mut providers = Providers::default();
        providers.insert(Arc::new(JwtProvider::new(jwt.clone())));
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
            anomaly: Arc::new(crate::anomaly::AnomalyEngine::new(self.anomaly.clone())),
        }));
        let serving = crate::api::tls::ServingCert::load(&self.tls_cert, &self.tls_key)?;
        let tls = crate::api::tls::server_config(serving.clone())?;
        let bearer = Arc::new(self.bearer_verifier()?);
        Ok(App {
            bearer,
            broker,
            store,
            revoker,
            policy,
            audit,
            bundles: Arc::new(bundles),
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
    /// X.509 trust bundles, re-read while running when their files change.
    pub bundles: Arc<crate::identity::LiveBundles>,
    /// The serving certificate, re-read while running when its files change.
    pub serving: Arc<crate::api::tls::ServingCert>,
    pub tls: Arc<rustls::ServerConfig>,
    pub config: Config,
}
