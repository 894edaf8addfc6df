//! Prometheus metrics. One process-wide recorder, installed on first use; `/metrics`
//! renders it. Every series is documented in `docs/operations.md`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, OnceLock};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets for decisions and store operations, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Buckets for the histograms that count things (writes per group commit, `*_ops` and
/// `*_records`): up to the writers' group limits (256 store writes, 1024 audit records).
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Runs `f` and records how long it took, in seconds, in the histogram `name`.
pub fn timed<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    timed_for(name, f).0
}

/// As [`timed`], also returning how long `f` took.
pub fn timed_for<T>(name: &'static str, f: impl FnOnce() -> T) -> (T, std::time::Duration) {
    let started = std::time::Instant::now();
    let out = f();
    let took = started.elapsed();
    metrics::histogram!(name).record(took.as_secs_f64());
    (out, took)
}

/// Label sets kept per [`Handles`] cache. The per-request series have a few dozen (routes
/// × methods × statuses × error codes); past the bound a lookup goes to the recorder
/// every time, as without a cache.
const CACHED_LABEL_SETS: usize = 1024;

/// Handles of one series, by label set. `counter!` and `histogram!` hash the name and
/// labels and look them up in the recorder on every call; for the series every request
/// touches that was about 2 % of an exchange's CPU. A handle is only kept once this
/// process's recorder is installed: one made before would stay a no-op.
pub struct Handles<K, H>(Mutex<Option<HashMap<K, H>>>);

impl<K: Hash + Eq, H: Clone> Handles<K, H> {
    pub const fn new() -> Self {
        Self(Mutex::new(None))
    }

    /// The handle for `key`, made by `make` the first time.
    pub fn get(&self, key: K, make: impl FnOnce(&K) -> H) -> H {
        if !matches!(HANDLE.get(), Some(Some(_))) {
            return make(&key);
        }
        let Ok(mut map) = self.0.lock() else {
            return make(&key);
        };
        let map = map.get_or_insert_with(HashMap::new);
        if let Some(h) = map.get(&key) {
            return h.clone();
        }
        let h = make(&key);
        if map.len() < CACHED_LABEL_SETS {
            map.insert(key, h.clone());
        }
        h
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0
            .lock()
            .map_or(0, |m| m.as_ref().map_or(0, HashMap::len))
    }
}

impl<K: Hash + Eq, H: Clone> Default for Handles<K, H> {
    fn default() -> Self {
        Self::new()
    }
}

/// Installs the recorder (idempotent) and returns the handle to render it.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_ops".into()), COUNT_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_records".into()), COUNT_BUCKETS)
                })
                .map_err(|e| tracing::error!(error = %e, "metrics buckets"))
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    // Another recorder is installed (an embedding application's): leave it.
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    describe_api();
    describe_leases();
    describe_signals();
    describe_store();
    describe_reloads();
}

/// Requests and decisions.
fn describe_api() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        "mayfly_requests_total",
        "API requests by route, method, status and code"
    );
    describe_histogram!(
        "mayfly_request_duration_seconds",
        "API request latency by route (decision latency)"
    );
    describe_counter!(
        "mayfly_policy_decisions_total",
        "Cedar decisions by action and decision"
    );
}

/// Credentials and their revocation.
fn describe_leases() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "mayfly_leases_issued_total",
        "Credentials minted, by provider"
    );
    describe_counter!(
        "mayfly_lease_transitions_total",
        "Lease state changes by provider and new state"
    );
    describe_counter!(
        "mayfly_revocation_failures_total",
        "Failed provider revocation attempts, by provider"
    );
    describe_counter!(
        "mayfly_leases_irrevocable_total",
        "Leases given up as irrevocable (alert on any increase)"
    );
    describe_gauge!("mayfly_reaper_backlog", "Leases due for the reaper now");
    describe_gauge!(
        "mayfly_leases",
        "Leases by provider and state (whole store)"
    );
}

/// Anomaly rules, webhooks and the audit log.
fn describe_signals() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        "mayfly_anomaly_triggers_total",
        "Anomaly rules fired, by rule and mode"
    );
    describe_counter!(
        "mayfly_webhook_deliveries_total",
        "Webhook deliveries by outcome"
    );
    describe_counter!(
        "mayfly_webhook_dropped_total",
        "Webhook events dropped because the queue was full"
    );
    describe_counter!(
        "mayfly_audit_write_failures_total",
        "Audit batches that could not be written (requests failed closed)"
    );
    describe_histogram!(
        "mayfly_audit_batch_records",
        "Records per audit group commit"
    );
    describe_histogram!(
        "mayfly_audit_sync_seconds",
        "Time to append and fsync one audit group commit (every request waits for one)"
    );
}

/// The embedded store's group commits.
fn describe_store() {
    use metrics::describe_histogram;
    describe_histogram!(
        "mayfly_store_group_commit_ops",
        "Writes per embedded-store group commit"
    );
    describe_histogram!(
        "mayfly_store_commit_seconds",
        "Time to commit (and fsync) one embedded-store write group"
    );
}

/// The series of what the broker re-reads while it runs: policies, trust bundles and
/// the serving certificate.
fn describe_reloads() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!("mayfly_policy_reloads_total", "Policy reloads by outcome");
    describe_counter!(
        "mayfly_trust_bundle_file_reloads_total",
        "Trust bundle PEM files re-read after a change, by outcome (loaded, refused: the last good set stays in force)"
    );
    describe_counter!(
        "mayfly_serving_cert_reloads_total",
        "Serving certificate files re-read after a change, by outcome (loaded, refused: the current one stays in force)"
    );
    describe_counter!(
        "mayfly_trust_bundle_updates_total",
        "Trust bundle updates from bundle endpoints and the Workload API, by source, trust domain and outcome (applied, failed, refused, removed)"
    );
    describe_counter!(
        "mayfly_workload_api_stream_failures_total",
        "SPIFFE Workload API connections or streams that failed or ended (each is retried with backoff)"
    );
    describe_gauge!(
        "mayfly_workload_api_connected",
        "1 while the SPIFFE Workload API bundle streams are open"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(rendered: &str, series: &str) -> Option<f64> {
        rendered
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn cached_handles_count_into_the_recorder_and_stay_bounded() {
        let Some(h) = handle() else {
            panic!("the recorder must install in this test binary");
        };
        let cache: Handles<u32, metrics::Counter> = Handles::new();
        let make = |k: &u32| metrics::counter!("mayfly_test_cached_total", "k" => k.to_string());
        for _ in 0..3 {
            cache.get(7, make).increment(1);
        }
        cache.get(8, make).increment(2);
        let text = h.render();
        assert_eq!(value(&text, "mayfly_test_cached_total{k=\"7\"}"), Some(3.0));
        assert_eq!(value(&text, "mayfly_test_cached_total{k=\"8\"}"), Some(2.0));
        for k in 0..(CACHED_LABEL_SETS as u32 + 50) {
            cache.get(k, make).increment(1);
        }
        assert_eq!(cache.len(), CACHED_LABEL_SETS);
        // Past the bound a series still counts, through the recorder.
        let last = CACHED_LABEL_SETS as u32 + 49;
        cache.get(last, make).increment(1);
        let text = h.render();
        assert_eq!(
            value(&text, &format!("mayfly_test_cached_total{{k=\"{last}\"}}")),
            Some(2.0)
        );
        assert_eq!(value(&text, "mayfly_test_cached_total{k=\"7\"}"), Some(4.0));
    }
}
