//! SPIFFE bundle documents and a real HTTPS bundle endpoint serving them.

use super::Pair;
use mayfly::pki::Ca;
use serde_json::Value;
use std::net::SocketAddr;

/// A SPIFFE bundle document: `cas` as `x509-svid` authorities, `jwt` keys as given.
pub fn spiffe_bundle_doc(cas: &[&Ca], jwt: &[&Value], sequence: u64, refresh_hint: u64) -> String {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let mut keys: Vec<Value> = cas
        .iter()
        .map(|ca| {
            let der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
                .expect("der");
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(der.as_ref())],
            })
        })
        .collect();
    keys.extend(jwt.iter().map(|j| (*j).clone()));
    serde_json::json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    })
    .to_string()
}

/// A real HTTPS server (tokio-rustls + hyper, on its own thread and runtime) serving a
/// SPIFFE bundle document at any path. Its certificate and document can be swapped
/// while it runs; it counts the requests it answered. Stopped on drop.
pub struct BundleServer {
    pub addr: SocketAddr,
    doc: std::sync::Arc<std::sync::Mutex<String>>,
    tls: std::sync::Arc<std::sync::Mutex<std::sync::Arc<rustls::ServerConfig>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn tls_config(pair: &Pair) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&pair.cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("der");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pair.key).expect("key");
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config"),
    )
}

impl BundleServer {
    pub fn start(cert: &Pair, doc: String) -> Self {
        use std::sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering};
        mayfly::install_crypto_provider();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let doc = Arc::new(Mutex::new(doc));
        let tls = Arc::new(Mutex::new(tls_config(cert)));
        let requests = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (d, t, r) = (doc.clone(), tls.clone(), requests.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let config = t.lock().expect("lock").clone();
                        let (d, r) = (d.clone(), r.clone());
                        tokio::spawn(async move {
                            let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                            else {
                                return;
                            };
                            let svc = hyper::service::service_fn(move |_req| {
                                r.fetch_add(1, Ordering::SeqCst);
                                let body = d.lock().expect("lock").clone();
                                async move {
                                    hyper::Response::builder()
                                        .header("content-type", "application/json")
                                        .body(http_body_util::Full::new(hyper::body::Bytes::from(
                                            body,
                                        )))
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            doc,
            tls,
            requests,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}/bundle", self.addr)
    }

    pub fn set_doc(&self, doc: String) {
        *self.doc.lock().expect("lock") = doc;
    }

    /// New connections get this certificate.
    pub fn set_cert(&self, cert: &Pair) {
        *self.tls.lock().expect("lock") = tls_config(cert);
    }

    /// Requests answered (a refused TLS handshake never becomes one).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
