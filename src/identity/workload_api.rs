//! The SPIFFE Workload API as a bundle source (the `spiffe` crate's client, over the
//! agent's unix socket): `FetchX509Bundles` streams the X.509 bundles of the trust
//! domains configured with `source = "workload_api"`, `FetchJWTBundles` the JWT bundles
//! of such `[[jwt_svid]]` trust domains. Each message is the agent's complete set and is
//! put in force at once, without a restart.
//!
//! - Start-up fails closed: [`start`] returns only once every such trust domain has a
//!   bundle, or fails after `initial_timeout`.
//! - A broken stream (agent restart, socket gone, bad message) keeps the last good
//!   bundles, is logged and counted, and is reconnected with exponential backoff.
//! - A trust domain the agent stops listing (a federation relationship removed) is no
//!   longer trusted: fail closed rather than keep trusting what the authority dropped.

use futures_util::{Stream, StreamExt};
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use super::jwks::{KeyCache, parse_jwks};
use super::{BundleError, LiveBundles, TrustDomain};

/// `[workload_api]`, validated.
#[derive(Debug, Clone)]
pub struct WorkloadApiSettings {
    /// `unix:///path/to/agent.sock`.
    pub socket: String,
    /// How long start-up waits for the first bundle of every trust domain.
    pub initial_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// A JWT-SVID trust domain whose keys come from the Workload API.
pub struct JwtTarget {
    pub trust_domain: TrustDomain,
    pub keys: Arc<KeyCache>,
    pub max_keys: usize,
}

/// What the stream feeds.
pub struct Targets {
    pub x509: Vec<TrustDomain>,
    pub jwt: Vec<JwtTarget>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, spiffe::WorkloadApiError>> + Send>>;

/// The Workload API stream task, stopped when dropped.
pub struct WorkloadApiSource {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WorkloadApiSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Default)]
struct Status {
    missing: BTreeSet<String>,
    last_error: String,
}

struct Watcher {
    settings: WorkloadApiSettings,
    targets: Targets,
    live: Arc<LiveBundles>,
    status: tokio::sync::watch::Sender<Status>,
}

fn x509_label(td: &TrustDomain) -> String {
    format!("X.509 {td}")
}

fn jwt_label(td: &TrustDomain) -> String {
    format!("JWT {td}")
}

fn record(td: &TrustDomain, outcome: &'static str) {
    metrics::counter!("mayfly_trust_bundle_updates_total",
        "source" => "workload_api", "trust_domain" => td.to_string(), "outcome" => outcome)
    .increment(1);
}

/// Connects to the Workload API, waits (at most `initial_timeout`) until every target
/// trust domain has its first bundle in force, then keeps streaming in the background.
pub async fn start(
    settings: WorkloadApiSettings,
    targets: Targets,
    live: Arc<LiveBundles>,
) -> Result<WorkloadApiSource, BundleError> {
    let missing = targets
        .x509
        .iter()
        .map(x509_label)
        .chain(targets.jwt.iter().map(|t| jwt_label(&t.trust_domain)))
        .collect();
    let (status, mut rx) = tokio::sync::watch::channel(Status {
        missing,
        last_error: "no answer yet".into(),
    });
    let (socket, waited) = (settings.socket.clone(), settings.initial_timeout);
    let watcher = Watcher {
        settings,
        targets,
        live,
        status,
    };
    let task = tokio::spawn(watcher.run());
    let source = WorkloadApiSource { task };
    // The `Ref` wait_for returns is dropped at the end of this statement: holding it
    // would block the task's next status update.
    let ready = matches!(
        tokio::time::timeout(waited, rx.wait_for(|s| s.missing.is_empty())).await,
        Ok(Ok(_))
    );
    if ready {
        tracing::info!(%socket, "trust bundles received from the SPIFFE Workload API");
        return Ok(source);
    }
    let st = rx.borrow().clone();
    // Dropping `source` stops the task: nothing keeps running for a broker that won't.
    drop(source);
    Err(BundleError::WorkloadApiStartup {
        socket,
        missing: st.missing.into_iter().collect(),
        waited,
        last_error: st.last_error,
    })
}

impl Watcher {
    async fn run(self) {
        let mut backoff = self.settings.backoff_min;
        let mut ever_received = false;
        loop {
            let (err, received) = self.session().await;
            metrics::gauge!("mayfly_workload_api_connected").set(0.0);
            metrics::counter!("mayfly_workload_api_stream_failures_total").increment(1);
            if received {
                backoff = self.settings.backoff_min;
                ever_received = true;
            }
            if ever_received {
                tracing::warn!(socket = %self.settings.socket, error = %err, retry_in = ?backoff,
                    "SPIFFE Workload API stream broken; keeping the last good bundles");
            } else {
                tracing::warn!(socket = %self.settings.socket, error = %err, retry_in = ?backoff,
                    "no bundles from the SPIFFE Workload API yet; retrying");
            }
            self.status.send_modify(|s| s.last_error = err);
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(self.settings.backoff_max);
        }
    }

    /// One connection: returns why it ended, and whether any message was applied.
    async fn session(&self) -> (String, bool) {
        let client = match spiffe::WorkloadApiClient::connect_to(&self.settings.socket).await {
            Ok(c) => c,
            Err(e) => return (format!("connect: {}", crate::net::error_chain(&e)), false),
        };
        let mut x509: Option<BoxStream<spiffe::X509BundleSet>> = None;
        if !self.targets.x509.is_empty() {
            match client.stream_x509_bundles().await {
                Ok(s) => x509 = Some(Box::pin(s)),
                Err(e) => {
                    return (
                        format!("FetchX509Bundles: {}", crate::net::error_chain(&e)),
                        false,
                    );
                }
            }
        }
        let mut jwt: Option<BoxStream<spiffe::JwtBundleSet>> = None;
        if !self.targets.jwt.is_empty() {
            match client.stream_jwt_bundles().await {
                Ok(s) => jwt = Some(Box::pin(s)),
                Err(e) => {
                    return (
                        format!("FetchJWTBundles: {}", crate::net::error_chain(&e)),
                        false,
                    );
                }
            }
        }
        metrics::gauge!("mayfly_workload_api_connected").set(1.0);
        let mut received = false;
        loop {
            tokio::select! {
                m = next(&mut x509) => match m {
                    Some(Ok(set)) => { self.apply_x509(&set); received = true; }
                    Some(Err(e)) => return (format!("X.509 bundles: {}", crate::net::error_chain(&e)), received),
                    None => return ("X.509 bundle stream ended".into(), received),
                },
                m = next(&mut jwt) => match m {
                    Some(Ok(set)) => { self.apply_jwt(&set).await; received = true; }
                    Some(Err(e)) => return (format!("JWT bundles: {}", crate::net::error_chain(&e)), received),
                    None => return ("JWT bundle stream ended".into(), received),
                },
            }
        }
    }

    fn apply_x509(&self, set: &spiffe::X509BundleSet) {
        for td in &self.targets.x509 {
            let bundle = spiffe::TrustDomain::new(td.as_str())
                .ok()
                .and_then(|t| set.get(&t));
            let Some(bundle) = bundle else {
                if self.live.remove(td) {
                    record(td, "removed");
                    tracing::warn!(trust_domain = %td,
                        "the Workload API no longer lists this trust domain; its X.509 bundle is no longer trusted");
                }
                continue;
            };
            let certs: Vec<CertificateDer<'static>> = bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect();
            let count = certs.len();
            match self.live.replace(td, certs, &self.settings.socket) {
                Ok(()) => {
                    record(td, "applied");
                    self.status.send_modify(|s| {
                        s.missing.remove(&x509_label(td));
                    });
                    tracing::info!(trust_domain = %td, authorities = count,
                        "X.509 bundle updated from the SPIFFE Workload API");
                }
                Err(e) => {
                    record(td, "refused");
                    tracing::error!(trust_domain = %td, error = %e,
                        "X.509 bundle from the Workload API refused; keeping the last good one");
                }
            }
        }
    }

    async fn apply_jwt(&self, set: &spiffe::JwtBundleSet) {
        for t in &self.targets.jwt {
            let td = &t.trust_domain;
            let bundle = spiffe::TrustDomain::new(td.as_str())
                .ok()
                .and_then(|d| set.get(&d));
            let Some(bundle) = bundle else {
                if t.keys.clear_keys().await {
                    record(td, "removed");
                    tracing::warn!(trust_domain = %td,
                        "the Workload API no longer lists this trust domain; its JWT-SVIDs are refused");
                }
                continue;
            };
            // Each authority is one JWK (kept verbatim by the spiffe crate); Mayfly's
            // own JWKS rules decide which keys are usable.
            let jwks: Vec<&[u8]> = bundle.jwt_authorities().map(|a| a.jwk_json()).collect();
            let mut doc = b"{\"keys\":[".to_vec();
            doc.extend(jwks.join(&b","[..]));
            doc.extend(b"]}");
            match parse_jwks(&doc, true, t.max_keys) {
                Ok(keys) => {
                    let count = keys.len();
                    t.keys.replace_keys(keys).await;
                    record(td, "applied");
                    self.status.send_modify(|s| {
                        s.missing.remove(&jwt_label(td));
                    });
                    tracing::info!(trust_domain = %td, keys = count,
                        "JWT bundle updated from the SPIFFE Workload API");
                }
                Err(e) => {
                    record(td, "refused");
                    tracing::error!(trust_domain = %td, error = %e,
                        "JWT bundle from the Workload API refused; keeping the last good one");
                }
            }
        }
    }
}

/// The next item of an optional stream; never resolves when there is no stream.
async fn next<T>(s: &mut Option<BoxStream<T>>) -> Option<Result<T, spiffe::WorkloadApiError>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}
