//! The TLS edge: a rustls accept loop that verifies each client's X.509-SVID once per
//! connection and attaches the result to every request on it. (axum-server does not hand
//! peer certificates to handlers; this loop does.)

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
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
            tracing::warn!(%peer, "connection limit reached; dropping connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, bundles, app) = (acceptor.clone(), bundles.clone(), app.clone());
        let timeout = opts.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let identity = match stream.get_ref().1.peer_certificates() {
                Some(chain) if !chain.is_empty() => {
                    verify_svid(chain, &bundles.current(), Some(peer.ip()), UnixTime::now())
                }
                _ => Err(VerifyError::ClientCertRequired),
            };
            if let Err(e) = &identity {
                tracing::debug!(%peer, error = %e, "client identity refused");
            }
            let conn = Arc::new(ConnInfo { peer, identity });
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(conn.clone());
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }
}
