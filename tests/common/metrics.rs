//! `/metrics` scraped and read, so a test can wait for a counter to move instead of
//! sleeping and assuming something happened.

use super::{Server, client};
use std::path::Path;
use std::time::Duration;

/// The Prometheus text of `server`'s `/metrics` (no client certificate needed).
pub async fn metrics_text(server: &Server, ca: &Path) -> String {
    client(ca, None)
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The sum of the samples of `series` whose labels include every `labels` pair (0 when
/// there is none yet).
pub fn metric_value(text: &str, series: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (name, rest) = key.split_once('{').unwrap_or((key, ""));
            (name == series
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// Waits until `series` (filtered by `labels`) reaches at least `at_least`; returns the
/// value seen. Panics with the last scrape after `timeout`.
pub async fn wait_for_metric(
    server: &Server,
    ca: &Path,
    series: &str,
    labels: &[(&str, &str)],
    at_least: f64,
    timeout: Duration,
) -> f64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = metrics_text(server, ca).await;
        let v = metric_value(&text, series, labels);
        if v >= at_least {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series}{labels:?} never reached {at_least}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
