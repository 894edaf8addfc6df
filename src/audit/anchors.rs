//! Publishing the chain head to the lease store, where a truncated or rewritten tail no
//! longer matches it.

use std::sync::Arc;
use time::OffsetDateTime;

use super::AuditLog;

/// Publishes this log's chain head to `store` now, if it moved since `last`; returns the
/// seq published (or `last`).
pub async fn publish_anchor(
    log: &AuditLog,
    store: &dyn crate::lease::LeaseStore,
    last: u64,
) -> u64 {
    let head = log.head();
    if head.seq == 0 || head.seq == last {
        return last;
    }
    let anchor = crate::lease::AuditAnchor {
        node: log.node().to_string(),
        seq: head.seq,
        hash: head.hash,
        at: OffsetDateTime::now_utc(),
    };
    match store.put_anchor(&anchor).await {
        Ok(true) => {
            metrics::gauge!("mayfly_audit_anchor_seq").set(anchor.seq as f64);
            anchor.seq
        }
        Ok(false) => {
            metrics::counter!("mayfly_audit_anchor_behind_total").increment(1);
            tracing::error!(
                node = %anchor.node,
                seq = anchor.seq,
                "audit chain head is behind its published anchor: this node's log was truncated or replaced"
            );
            last
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish the audit anchor; retrying");
            last
        }
    }
}

/// Publishes the chain head every `every` until aborted.
pub fn spawn_anchor_publisher(
    log: AuditLog,
    store: Arc<dyn crate::lease::LeaseStore>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut last = 0;
        loop {
            tick.tick().await;
            last = publish_anchor(&log, store.as_ref(), last).await;
        }
    })
}
