//! `[anomaly]`: the risk window, the deny period, the per-principal quotas and the rules
//! that turn signals into verdicts.

use serde::Deserialize;

use super::{ConfigError, defaults, dur, invalid};
use crate::anomaly::{Action, AnomalyConfig, Mode, Rule};

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

/// The signals a rule may count.
const SIGNALS: [&str; 7] = [
    "request",
    "out_of_scope",
    "policy_denied",
    "posture_change",
    "ended_task_use",
    "delegation_wider",
    "external",
];

pub(super) fn anomaly_config(raw: RawAnomaly) -> Result<AnomalyConfig, ConfigError> {
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
        cfg.rules = rules.into_iter().map(rule).collect::<Result<_, _>>()?;
    }
    Ok(cfg)
}

/// One `[[anomaly.rules]]` entry.
fn rule(r: RawRule) -> Result<Rule, ConfigError> {
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
}
