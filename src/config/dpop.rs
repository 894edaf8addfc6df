//! `[dpop]`: how DPoP proofs (RFC 9449) are checked.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, defaults, dur, invalid};

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

pub(super) fn dpop_settings(raw: RawDpop) -> Result<DpopSettings, ConfigError> {
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
