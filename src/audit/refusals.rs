//! Repeated unauthenticated refusals, counted per source and code and written as one
//! summary record per interval instead of one record each.

use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{AuditError, AuditEvent, AuditLog};

/// Kind of a record that stands for repeated unauthenticated refusals.
pub const SUMMARY_KIND: &str = "refusals.summary";

/// `(source, code)` pairs counted at once; the rest are counted under source `other`.
const MAX_SUMMARY_KEYS: usize = 4096;

/// Unauthenticated refusals of the current interval, by source and code. The first of
/// each pair is written as a full (capped) record; the rest only add to a count, written
/// as one `refusals.summary` record when the interval closes. A flood of junk costs one
/// record per source and code per interval, and the trail still shows it.
#[derive(Debug)]
pub struct Refusals {
    open: Mutex<RefusalWindow>,
}

#[derive(Debug)]
struct RefusalWindow {
    since: OffsetDateTime,
    counts: std::collections::HashMap<(String, &'static str), Counted>,
}

#[derive(Debug)]
struct Counted {
    route: Option<String>,
    /// Refusals not written individually.
    suppressed: u64,
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new()
    }
}

impl Refusals {
    pub fn new() -> Self {
        Self {
            open: Mutex::new(RefusalWindow {
                since: OffsetDateTime::now_utc(),
                counts: Default::default(),
            }),
        }
    }

    /// Counts one refusal; `true` when it is the first of its source and code in this
    /// interval and must be written in full.
    pub fn observe(&self, source: &str, code: &'static str, route: Option<&str>) -> bool {
        let mut w = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (source.to_string(), code);
        if !w.counts.contains_key(&key) && w.counts.len() >= MAX_SUMMARY_KEYS {
            key = ("other".to_string(), "other");
        }
        match w.counts.get_mut(&key) {
            Some(c) => {
                c.suppressed += 1;
                false
            }
            None => {
                let first = key.0 != "other";
                w.counts.insert(
                    key,
                    Counted {
                        route: route.map(str::to_string),
                        suppressed: u64::from(!first),
                    },
                );
                first
            }
        }
    }

    /// Closes the interval: one summary event per pair with refusals not written
    /// individually.
    pub fn drain(&self) -> Vec<AuditEvent> {
        let now = OffsetDateTime::now_utc();
        let mut w = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let since = std::mem::replace(&mut w.since, now);
        let counts = std::mem::take(&mut w.counts);
        drop(w);
        let since = since.format(&Rfc3339).ok();
        let mut out: Vec<AuditEvent> = counts
            .into_iter()
            .filter(|(_, c)| c.suppressed > 0)
            .map(|((source, code), c)| {
                let mut ev = AuditEvent::new(SUMMARY_KIND);
                ev.source = Some(source);
                ev.code = Some(code);
                ev.route = c.route;
                ev.decision = Some("deny");
                ev.count = Some(c.suppressed);
                ev.since = since.clone();
                ev
            })
            .collect();
        out.sort_by(|a, b| (&a.source, a.code).cmp(&(&b.source, b.code)));
        out
    }

    /// Writes the closing interval's summaries.
    pub async fn flush(&self, log: &AuditLog) -> Result<usize, AuditError> {
        let events = self.drain();
        let n = events.len();
        for ev in events {
            log.write(ev).await?;
        }
        Ok(n)
    }
}

/// Writes refusal summaries every `every` until aborted.
pub fn spawn_summary_flusher(
    refusals: Arc<Refusals>,
    log: AuditLog,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = refusals.flush(&log).await {
                tracing::error!(error = %e, "cannot write refusal summaries");
            }
        }
    })
}
