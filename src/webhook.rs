//! Webhooks: revocations and anomalies, posted to an HTTPS endpoint as the exact audit
//! record (so a receiver can match it to the chain), signed and retried with backoff.
//!
//! Signature: `x-mayfly-signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` with
//! `x-mayfly-timestamp: <unix seconds>`; receivers should reject stale timestamps.
//! Delivery is at-least-once; a receiver de-duplicates by the record's `hash`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub secret_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub max_attempts: u32,
    /// Audit record kinds to send.
    pub events: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook url must be https://")]
    NotHttps,
    #[error("cannot read {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("webhook client: {0}")]
    Client(String),
}

/// Handle to the delivery task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Webhook {
    tx: mpsc::Sender<String>,
    events: Vec<String>,
}

/// Queue bound: past it deliveries are dropped (counted), never blocking the broker.
const QUEUE: usize = 10_000;

pub fn sign(secret: &[u8], timestamp: u64, body: &str) -> String {
    // HMAC accepts keys of any length; the error arm cannot occur.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhook {
    /// Validates the config and starts the delivery task (needs a Tokio runtime).
    pub fn start(cfg: &WebhookConfig) -> Result<Self, WebhookError> {
        if !cfg.url.starts_with("https://") {
            return Err(WebhookError::NotHttps);
        }
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| WebhookError::File {
                path: p.clone(),
                reason: e.to_string(),
            })
        };
        let secret = Secret::new(read(&cfg.secret_file)?.trim_ascii().to_vec());
        let mut builder = reqwest::Client::builder().timeout(cfg.timeout);
        if let Some(ca) = &cfg.ca_file {
            let cert = reqwest::Certificate::from_pem(&read(ca)?)
                .map_err(|e| WebhookError::Client(e.to_string()))?;
            builder = builder.tls_certs_only([cert]);
        }
        let client = builder
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        let (url, attempts) = (cfg.url.clone(), cfg.max_attempts.max(1));
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                deliver(&client, &url, secret.expose(), &body, attempts).await;
            }
        });
        Ok(Self {
            tx,
            events: cfg.events.clone(),
        })
    }

    /// Queues an audit record line if its kind is one we send. Never blocks.
    pub fn offer(&self, kind: &str, line: &str) {
        if !self.events.iter().any(|e| e == kind) {
            return;
        }
        if self.tx.try_send(line.to_string()).is_err() {
            metrics::counter!("mayfly_webhook_dropped_total").increment(1);
            tracing::error!(kind, "webhook queue full; event dropped");
        }
    }
}

async fn deliver(client: &reqwest::Client, url: &str, secret: &[u8], body: &str, attempts: u32) {
    for attempt in 1..=attempts {
        let ts = time::OffsetDateTime::now_utc()
            .unix_timestamp()
            .unsigned_abs();
        let sent = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-mayfly-timestamp", ts.to_string())
            .header("x-mayfly-signature", sign(secret, ts, body))
            .body(body.to_string())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("mayfly_webhook_deliveries_total", "outcome" => "delivered")
                    .increment(1);
                return;
            }
            Ok(r) => tracing::warn!(status = r.status().as_u16(), attempt, "webhook refused"),
            Err(e) => tracing::warn!(error = %e, attempt, "webhook unreachable"),
        }
        if attempt < attempts {
            let backoff = Duration::from_millis(250u64.saturating_mul(1 << attempt.min(10)));
            tokio::time::sleep(backoff.min(Duration::from_secs(60))).await;
        }
    }
    metrics::counter!("mayfly_webhook_deliveries_total", "outcome" => "failed").increment(1);
    tracing::error!(
        attempts,
        "webhook delivery failed; event dropped after retries"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let a = sign(b"k", 1, "{}");
        assert!(a.starts_with("v1="));
        assert_ne!(a, sign(b"k", 2, "{}"));
        assert_ne!(a, sign(b"k", 1, "{ }"));
        assert_ne!(a, sign(b"j", 1, "{}"));
    }
}
