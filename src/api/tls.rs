//! The TLS edge: a rustls accept loop that verifies each client's X.509-SVID once per
//! connection and attaches the result to every request on it. (axum-server does not hand
//! peer certificates to handlers; this loop does.)

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::extract::ConnInfo;
use crate::identity::VerifyError;
use crate::identity::x509::{HandshakeVerifier, verify_svid};

fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, crate::Error> {
    let tls_err = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
        crate::Error::Tls(format!("{what} {}: {e}", p.display()))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err("cannot read certificate", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err("bad certificate", cert, &e))?;
    if chain.is_empty() {
        return Err(tls_err("no certificate in", cert, &"empty file"));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err("cannot read key", key, &e))?;
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| tls_err("unusable key", key, &e))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| tls_err("key does not match certificate", cert, &e))?;
    Ok(Arc::new(ck))
}

/// The broker's own serving certificate, re-read when its files change (SVIDs from the
/// SPIFFE CSI driver or cert-manager rotate): a new pair that fails to load is refused and
/// the current one keeps serving.
pub struct ServingCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: std::sync::RwLock<Arc<CertifiedKey>>,
    stamp: std::sync::Mutex<(Option<std::time::SystemTime>, Option<std::time::SystemTime>)>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl ServingCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, crate::Error> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ck = load_certified_key(cert, key, &provider)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: std::sync::RwLock::new(ck),
            stamp: std::sync::Mutex::new((modified(cert), modified(key))),
        }))
    }

    /// Reloads if either file changed; `Ok(true)` when a new pair is in use.
    pub fn refresh(&self) -> Result<bool, crate::Error> {
        let now = (modified(&self.cert), modified(&self.key));
        if *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        let ck = load_certified_key(&self.cert, &self.key, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = ck;
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(true)
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

pub fn server_config(serving: Arc<ServingCert>) -> Result<Arc<ServerConfig>, crate::Error> {
    let provider = serving.provider.clone();
    let verifier = Arc::new(HandshakeVerifier::new(&provider));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub struct ServeOptions {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Timeouts and limits against slow, idle and flooding clients.
    pub edge: crate::config::EdgeLimits,
}

/// Connections open per source address. A slot is held for the life of a connection
/// (handshake included) and given back when its guard drops.
#[derive(Debug)]
pub struct SourceSlots {
    max: usize,
    open: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

/// One connection's slot in [`SourceSlots`].
#[derive(Debug)]
pub struct SourceSlot {
    slots: Arc<SourceSlots>,
    ip: IpAddr,
}

impl SourceSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Default::default(),
        })
    }

    /// A slot for `ip`, or `None` when it already holds `max` connections.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            slots: self.clone(),
            ip,
        })
    }

    /// Connections open from `ip` now.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What a connection is doing, for the idle timeout: requests in flight and when the
/// last one ended. Bytes do not count as activity (HTTP/2 PING acks would keep an idle
/// connection open forever); requests do.
struct Activity {
    in_flight: AtomicUsize,
    last: std::sync::Mutex<Instant>,
}

/// Held while a request is being served.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            last: std::sync::Mutex::new(Instant::now()),
        })
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let wake = self.last() + idle;
            if self.in_flight.load(Ordering::SeqCst) == 0 && Instant::now() >= wake {
                return;
            }
            let wake = wake.max(Instant::now() + Duration::from_millis(50));
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// After a graceful shutdown (idle timeout), how long a connection may take to close
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The HTTP/1.1 and HTTP/2 settings of every connection. Without `timer` hyper has no
/// header-read timeout at all, so a client could hold a connection by never finishing
/// its headers.
fn http_builder(edge: &crate::config::EdgeLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(edge.header_read_timeout)
        // The request head must fit the read buffer: this bounds header bytes.
        .max_buf_size(edge.max_header_bytes)
        .max_headers(100);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(edge.h2_keepalive_interval)
        .keep_alive_timeout(edge.h2_keepalive_timeout)
        .max_concurrent_streams(edge.h2_max_concurrent_streams)
        .max_header_list_size(edge.h2_max_header_list_bytes)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256));
    b
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    bundles: Arc<crate::identity::LiveBundles>,
    app: axum::Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let per_source = SourceSlots::new(opts.edge.max_connections_per_source);
    let edge = Arc::new(opts.edge);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the connection limit: shed the connection now rather than queue it.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("mayfly_connections_refused_total", "reason" => "max_connections")
                .increment(1);
            tracing::warn!(%peer, "connection limit reached; dropping connection");
            drop(tcp);
            continue;
        };
        // One source cannot take every slot.
        let Some(source_slot) = per_source.try_acquire(peer.ip()) else {
            metrics::counter!("mayfly_connections_refused_total", "reason" => "per_source")
                .increment(1);
            tracing::debug!(%peer, "per-source connection limit reached; dropping connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            tcp,
            peer,
            acceptor: acceptor.clone(),
            bundles: bundles.clone(),
            app: app.clone(),
            edge: edge.clone(),
            handshake_timeout: opts.handshake_timeout,
        };
        tokio::spawn(async move {
            let _permit = permit;
            let _source_slot = source_slot;
            conn.serve().await;
        });
    }
}

/// One accepted TCP connection and what serving it needs.
struct Connection {
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    bundles: Arc<crate::identity::LiveBundles>,
    app: axum::Router,
    edge: Arc<crate::config::EdgeLimits>,
    handshake_timeout: Duration,
}

impl Connection {
    /// The TLS handshake, the caller's SVID (kept, refused or not, for the app to read),
    /// then HTTP until the client leaves or stays idle too long.
    async fn serve(self) {
        let stream = match tokio::time::timeout(
            self.handshake_timeout,
            self.acceptor.accept(self.tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%self.peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%self.peer, "TLS handshake timed out");
                return;
            }
        };
        let identity = match stream.get_ref().1.peer_certificates() {
            Some(chain) if !chain.is_empty() => verify_svid(
                chain,
                &self.bundles.current(),
                Some(self.peer.ip()),
                UnixTime::now(),
            ),
            _ => Err(VerifyError::ClientCertRequired),
        };
        if let Err(e) = &identity {
            tracing::debug!(%self.peer, error = %e, "client identity refused");
        }
        let conn = Arc::new(ConnInfo {
            peer: self.peer,
            identity,
        });
        let activity = Activity::new();
        let svc = {
            let activity = activity.clone();
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let busy = activity.begin();
                req.extensions_mut().insert(conn.clone());
                let served = self.app.clone().oneshot(req.map(axum::body::Body::new));
                async move {
                    let resp = served.await;
                    drop(busy);
                    resp
                }
            })
        };
        // The protocol ALPN settled goes straight to its parser: the auto-detecting
        // reader would otherwise wait, with no timeout but the idle one, for a first
        // byte that an idle client never sends.
        let builder = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => http_builder(&self.edge).http2_only(),
            Some(b"http/1.1") => http_builder(&self.edge).http1_only(),
            _ => http_builder(&self.edge),
        };
        let connection = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(connection);
        let ended = tokio::select! {
            r = connection.as_mut() => r,
            () = activity.idle_for(self.edge.idle_timeout) => {
                metrics::counter!("mayfly_connections_closed_total", "reason" => "idle").increment(1);
                tracing::debug!(%self.peer, "idle connection closed");
                connection.as_mut().graceful_shutdown();
                match tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await {
                    Ok(r) => r,
                    Err(_) => Ok(()),
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%self.peer, error = %e, "connection ended with error");
        }
    }
}
