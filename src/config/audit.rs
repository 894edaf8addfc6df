//! `[audit]` (where the log goes, how it rotates, how often its head is anchored) and
//! `[webhook]` (the signed tap that forwards selected audit events).

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, defaults, dur, invalid};

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

/// `[audit]`, validated.
pub(super) struct AuditSettings {
    pub path: PathBuf,
    pub rotation: crate::audit::Rotation,
    pub anchor_interval: Duration,
    pub summary_interval: Duration,
}

pub(super) fn audit_settings(raw: RawAudit) -> Result<AuditSettings, ConfigError> {
    if raw.rotate_bytes < 64 * 1024 {
        return Err(invalid("audit.rotate_bytes", "must be at least 65536"));
    }
    let anchor_interval = dur("audit.anchor_interval", &raw.anchor_interval)?;
    let summary_interval = dur("audit.summary_interval", &raw.summary_interval)?;
    if anchor_interval.is_zero() {
        return Err(invalid("audit.anchor_interval", "must be positive"));
    }
    if summary_interval.is_zero() || summary_interval > Duration::from_secs(3600) {
        return Err(invalid("audit.summary_interval", "must be 1ms..=1h"));
    }
    Ok(AuditSettings {
        path: raw.path,
        rotation: crate::audit::Rotation {
            rotate_bytes: raw.rotate_bytes,
            retain_files: raw.retain_files,
        },
        anchor_interval,
        summary_interval,
    })
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

pub(super) fn webhook(w: RawWebhook) -> Result<crate::webhook::WebhookConfig, ConfigError> {
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
}
