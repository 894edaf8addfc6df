//! `[operators]` (who may use the operator API) and `[policy]` (where the policy files
//! are and how often they are re-read).

use serde::Deserialize;
use std::collections::HashSet;
use std::path::PathBuf;

use super::{ConfigError, invalid};
use crate::identity::Principal;

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

pub(super) fn operators(raw: RawOperators) -> Result<HashSet<String>, ConfigError> {
    let mut operators = HashSet::new();
    for id in raw.spiffe_ids {
        let p = Principal::parse(&id)
            .map_err(|e| invalid("operators.spiffe_ids", format!("{id:?}: {e}")))?;
        operators.insert(p.to_string());
    }
    Ok(operators)
}
