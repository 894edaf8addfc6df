//! `[providers.vault]`: the raw TOML shape and its validated form, one conversion per
//! sub-structure.

use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use crate::provider::RateLimit;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    /// `https://vault.example.org:8200` (http:// only to loopback with
    /// `allow_insecure_http`).
    pub address: String,
    /// Mayfly's own Vault token, read from this file and re-read when it changes.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Or: log in with AppRole.
    #[serde(default)]
    pub approle: Option<RawAppRole>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// PEM CA bundle to trust for the Vault server instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Sustained mints per second through this provider (token bucket); 0 turns it off.
    #[serde(default = "default_rate")]
    pub rate_limit_per_second: f64,
    #[serde(default = "default_burst")]
    pub rate_limit_burst: f64,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub targets: BTreeMap<String, RawVaultTarget>,
}

fn default_timeout() -> String {
    "5s".into()
}
fn default_rate() -> f64 {
    200.0
}
fn default_burst() -> f64 {
    50.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    #[serde(default = "default_approle_mount")]
    pub mount: String,
    pub role_id: String,
    pub secret_id_file: PathBuf,
}

fn default_approle_mount() -> String {
    "approle".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum RawVaultTarget {
    Token {
        token_role: String,
        allowed_policies: Vec<String>,
    },
    Dynamic {
        path: String,
        #[serde(default = "default_method")]
        method: String,
        /// Fixed request parameters (POST only).
        #[serde(default)]
        params: serde_json::Map<String, Value>,
        /// Parameter that receives the lease TTL (`ttl` for `pki/issue`), so Vault's own
        /// lease ends with Mayfly's.
        #[serde(default)]
        ttl_param: Option<String>,
        /// Parameter that receives the grant's single resource (`common_name`,
        /// `uri_sans`…), so the secret is cut to what the task named.
        #[serde(default)]
        resource_param: Option<String>,
        /// The longest lease Vault gives at this path: how long a secret minted just
        /// before a crash can live (reported for leases that never became active).
        max_ttl: String,
    },
}

fn default_method() -> String {
    "GET".into()
}

#[derive(Debug, Clone)]
pub enum VaultAuth {
    TokenFile(PathBuf),
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub enum VaultTarget {
    Token {
        role: String,
        allowed_policies: BTreeSet<String>,
    },
    Dynamic {
        path: String,
        post: bool,
        params: serde_json::Map<String, Value>,
        ttl_param: Option<String>,
        resource_param: Option<String>,
        max_ttl: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub address: String,
    pub auth: VaultAuth,
    pub namespace: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub rate: Option<RateLimit>,
    pub targets: BTreeMap<String, VaultTarget>,
    /// `limits.pending_timeout`: the first TTL of every token.
    pub pending_ttl: Duration,
}

type CfgErr = (&'static str, String);

fn vault_path_ok(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains("..")
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
}

impl VaultAuth {
    fn from_raw(token_file: Option<PathBuf>, approle: Option<RawAppRole>) -> Result<Self, CfgErr> {
        match (token_file, approle) {
            (Some(f), None) => Ok(Self::TokenFile(f)),
            (None, Some(a)) => {
                if !vault_path_ok(&a.mount) || a.role_id.is_empty() {
                    return Err((
                        "providers.vault.approle",
                        "mount must be a path and role_id non-empty".into(),
                    ));
                }
                Ok(Self::AppRole {
                    mount: a.mount,
                    role_id: a.role_id,
                    secret_id_file: a.secret_id_file,
                })
            }
            _ => Err((
                "providers.vault",
                "give exactly one of token_file, approle".into(),
            )),
        }
    }
}

impl VaultTarget {
    fn from_raw(name: &str, raw: RawVaultTarget) -> Result<Self, CfgErr> {
        match raw {
            RawVaultTarget::Token {
                token_role,
                allowed_policies,
            } => Self::token(name, token_role, allowed_policies),
            RawVaultTarget::Dynamic {
                path,
                method,
                params,
                ttl_param,
                resource_param,
                max_ttl,
            } => {
                if !vault_path_ok(&path) || path.starts_with("sys/") || path.starts_with("auth/") {
                    return Err((
                        "providers.vault.targets.path",
                        format!("{name}: {path:?} is not a secrets-engine path"),
                    ));
                }
                let post = dynamic_method(name, &method)?;
                if !post && (!params.is_empty() || ttl_param.is_some() || resource_param.is_some())
                {
                    return Err((
                        "providers.vault.targets.method",
                        format!("{name}: params, ttl_param and resource_param need POST"),
                    ));
                }
                Ok(Self::Dynamic {
                    path,
                    post,
                    params,
                    ttl_param,
                    resource_param,
                    max_ttl: crate::duration::parse(&max_ttl)
                        .map_err(|m| ("providers.vault.targets.max_ttl", format!("{name}: {m}")))?,
                })
            }
        }
    }

    fn token(name: &str, role: String, allowed_policies: Vec<String>) -> Result<Self, CfgErr> {
        if !vault_path_ok(&role) || role.contains('/') {
            return Err((
                "providers.vault.targets.token_role",
                format!("{name}: {role:?} is not a role name"),
            ));
        }
        let allowed: BTreeSet<String> = allowed_policies.into_iter().collect();
        if allowed.is_empty() || allowed.iter().any(|p| p == "root" || p.is_empty()) {
            return Err((
                "providers.vault.targets.allowed_policies",
                format!("{name}: non-empty, and never \"root\""),
            ));
        }
        Ok(Self::Token {
            role,
            allowed_policies: allowed,
        })
    }
}

/// `GET` or `POST` → whether the dynamic target is read with a POST.
fn dynamic_method(name: &str, method: &str) -> Result<bool, CfgErr> {
    match method {
        "GET" => Ok(false),
        "POST" => Ok(true),
        other => Err((
            "providers.vault.targets.method",
            format!("{name}: {other:?}: expected GET or POST"),
        )),
    }
}

impl VaultConfig {
    pub fn from_raw(raw: RawVault, pending_ttl: Duration) -> Result<Self, CfgErr> {
        let address = raw.address.trim_end_matches('/').to_string();
        crate::net::url_allowed(&address, raw.allow_insecure_http)
            .map_err(|m| ("providers.vault.address", m))?;
        let auth = VaultAuth::from_raw(raw.token_file, raw.approle)?;
        let timeout = crate::duration::parse(&raw.timeout)
            .map_err(|m| ("providers.vault.timeout", m.to_string()))?;
        let rate = crate::provider::rate_limit(raw.rate_limit_per_second, raw.rate_limit_burst)
            .map_err(|m| ("providers.vault.rate_limit_per_second", m))?;
        if raw.targets.is_empty() {
            return Err((
                "providers.vault.targets",
                "at least one target is required".into(),
            ));
        }
        let targets = raw
            .targets
            .into_iter()
            .map(|(name, t)| Ok((name.clone(), VaultTarget::from_raw(&name, t)?)))
            .collect::<Result<_, CfgErr>>()?;
        Ok(Self {
            address,
            auth,
            namespace: raw.namespace.filter(|n| !n.is_empty()),
            ca_file: raw.ca_file,
            timeout,
            rate,
            targets,
            pending_ttl,
        })
    }
}
