//! `[store]` (where leases live: an embedded redb file or Redis) and `[reaper]` (how
//! expired and pending leases are revoked).

use serde::Deserialize;
use std::path::PathBuf;

use super::{ConfigError, defaults, dur, invalid};
use crate::lease::redis::{Durability, RedisConfig};
use crate::revocation::{ReaperConfig, RetryPolicy};

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawStore {
    Embedded {
        #[serde(default = "defaults::store_path")]
        path: PathBuf,
        /// redb's page cache, in bytes: most of the broker's memory under a grown store.
        #[serde(default = "defaults::store_cache_bytes")]
        cache_bytes: u64,
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
            cache_bytes: defaults::store_cache_bytes(),
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

pub(super) fn reaper(r: RawReaper) -> Result<ReaperConfig, ConfigError> {
    if r.batch == 0 || r.max_attempts == 0 {
        return Err(invalid("reaper", "batch and max_attempts must be positive"));
    }
    Ok(ReaperConfig {
        interval: dur("reaper.interval", &r.interval)?,
        batch: r.batch,
        claim_hold: dur("reaper.claim_hold", &r.claim_hold)?,
        retry: RetryPolicy {
            max_attempts: r.max_attempts,
            base: dur("reaper.backoff_base", &r.backoff_base)?,
            max: dur("reaper.backoff_max", &r.backoff_max)?,
        },
    })
}

/// Where leases live.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Embedded { path: PathBuf, cache_bytes: usize },
    Redis(RedisConfig),
}

impl StoreConfig {
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
        Ok(StoreConfig::Embedded {
            path,
            cache_bytes: crate::lease::embedded::DEFAULT_CACHE_BYTES,
        })
    }
}

pub(super) fn store_config(raw: RawStore) -> Result<StoreConfig, ConfigError> {
    Ok(match raw {
        RawStore::Embedded { path, cache_bytes } => StoreConfig::Embedded {
            path,
            cache_bytes: cache_bytes_in_range(cache_bytes)?,
        },
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
            let durability =
                redis_durability(&durability, verify_durability, wait_replicas, &wait_timeout)?;
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

/// `store.cache_bytes`: 4 MiB ..= 64 GiB. The cache is most of the broker's memory once
/// the store has grown past it, so it must fit the process's memory limit.
fn cache_bytes_in_range(bytes: u64) -> Result<usize, ConfigError> {
    const RANGE: std::ops::RangeInclusive<u64> = (4 << 20)..=(64 << 30);
    if !RANGE.contains(&bytes) {
        return Err(invalid(
            "store.cache_bytes",
            "must be 4 MiB..=64 GiB (in bytes)",
        ));
    }
    usize::try_from(bytes).map_err(|_| invalid("store.cache_bytes", "too large for this platform"))
}

/// `store.durability`: what a Redis write waits for before it counts.
fn redis_durability(
    durability: &str,
    verify: bool,
    wait_replicas: u32,
    wait_timeout: &str,
) -> Result<Durability, ConfigError> {
    Ok(match durability {
        "server" => Durability::Server,
        "aof" => Durability::Aof { verify },
        "wait" => {
            if wait_replicas == 0 {
                return Err(invalid("store.wait_replicas", "must be at least 1"));
            }
            Durability::Wait {
                replicas: wait_replicas,
                timeout: dur("store.wait_timeout", wait_timeout)?,
            }
        }
        other => {
            return Err(invalid(
                "store.durability",
                format!("{other:?}: expected \"server\", \"aof\" or \"wait\""),
            ));
        }
    })
}
