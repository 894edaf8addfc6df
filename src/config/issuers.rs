//! The issuers of bearer tokens: `[[jwt_svid]]` (trust domains whose JWT-SVIDs are
//! accepted), `[[oidc_issuers]]` (OIDC workload tokens, also exchanged at `/v1/token`) and
//! `[bearer]` (limits on every token).

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

use super::trust::{RawBundleSource, RawEndpointProfile, SourceFields, endpoint_auth_config};
use super::{ConfigError, check_url, defaults, dur, invalid};
use crate::identity::TrustDomain;
use crate::identity::bearer::{IssuerRules, parse_algorithm};
use crate::identity::bundle_endpoint::EndpointAuth;
use crate::identity::jwks::{CacheSettings, KeySourceSpec};

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

/// `[bearer]`, validated.
pub(super) struct BearerSettings {
    pub max_token_bytes: usize,
    pub fetch_timeout: Duration,
}

pub(super) fn bearer(b: RawBearer) -> Result<BearerSettings, ConfigError> {
    if !(1024..=64 * 1024).contains(&b.max_token_bytes) {
        return Err(invalid("bearer.max_token_bytes", "must be 1 KiB..=64 KiB"));
    }
    Ok(BearerSettings {
        max_token_bytes: b.max_token_bytes,
        fetch_timeout: dur("bearer.fetch_timeout", &b.fetch_timeout)?,
    })
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

/// Every `[[jwt_svid]]` entry; a trust domain may appear once.
pub(super) fn jwt_svids(
    raw: Vec<RawJwtSvid>,
) -> Result<Vec<(TrustDomain, IssuerConfig)>, ConfigError> {
    each_once(raw, jwt_svid_config, "jwt_svid.trust_domain")
}

/// Every `[[oidc_issuers]]` entry; an issuer may appear once.
pub(super) fn oidc_issuers(
    raw: Vec<RawOidcIssuer>,
) -> Result<Vec<(String, IssuerConfig)>, ConfigError> {
    each_once(raw, oidc_config, "oidc_issuers.issuer")
}

/// Converts each entry of a table, refusing a second entry for the same name (`key`).
fn each_once<R, K: PartialEq + std::fmt::Display>(
    raw: Vec<R>,
    convert: fn(R) -> Result<(K, IssuerConfig), ConfigError>,
    key: &'static str,
) -> Result<Vec<(K, IssuerConfig)>, ConfigError> {
    let mut entries: Vec<(K, IssuerConfig)> = Vec::new();
    for r in raw {
        let (name, c) = convert(r)?;
        if entries.iter().any(|(n, _)| n == &name) {
            return Err(invalid(key, format!("{name} is configured twice")));
        }
        entries.push((name, c));
    }
    Ok(entries)
}
