//! `[providers.*]`: the built-in JWT provider (issuer, signing keys, bindings, rate) and
//! the optional Vault and AWS providers, whose own tables their modules parse.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, defaults, dur, invalid};
use crate::provider::jwt::{Binding, BindingRules, SigningAlg};

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

/// `[providers.jwt]`, validated.
pub(super) struct JwtSettings {
    pub issuer: String,
    pub key: JwtKeys,
    pub generate: Option<SigningAlg>,
    pub bindings: BindingRules,
    pub rate: Option<crate::provider::RateLimit>,
}

pub(super) fn jwt(r: RawJwt) -> Result<JwtSettings, ConfigError> {
    let key = jwt_keys(&r)?;
    let rate = crate::provider::rate_limit(r.rate_limit_per_second, r.rate_limit_burst)
        .map_err(|m| invalid("providers.jwt.rate_limit_per_second", m))?;
    if !r.issuer.starts_with("https://") {
        return Err(invalid("providers.jwt.issuer", "must be an https:// URL"));
    }
    Ok(JwtSettings {
        issuer: r.issuer.trim_end_matches('/').to_string(),
        key,
        generate: r.generate_key,
        bindings: BindingRules {
            default: r.binding,
            targets: r.targets.into_iter().map(|(t, c)| (t, c.binding)).collect(),
        },
        rate,
    })
}

/// `[providers.vault]`; `pending_timeout` (`limits.pending_timeout`) is the first TTL of
/// every token it mints.
pub(super) fn vault(
    raw: Option<crate::provider::vault::RawVault>,
    pending_timeout: Duration,
) -> Result<Option<crate::provider::vault::VaultConfig>, ConfigError> {
    raw.map(|v| crate::provider::vault::VaultConfig::from_raw(v, pending_timeout))
        .transpose()
        .map_err(|(k, m)| invalid(k, m))
}

pub(super) fn aws(
    raw: Option<crate::provider::aws::RawAws>,
) -> Result<Option<crate::provider::aws::AwsConfig>, ConfigError> {
    raw.map(crate::provider::aws::AwsConfig::from_raw)
        .transpose()
        .map_err(|(k, m)| invalid(k, m))
}
