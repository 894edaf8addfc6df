//! SPIFFE bundle endpoints (SPIFFE Trust Domain and Bundle spec, federation profiles):
//! a trust domain's bundle fetched over HTTPS as a SPIFFE bundle document — a JWKS whose
//! `use: "x509-svid"` keys carry the CA certificate in `x5c`, with `spiffe_refresh_hint`
//! and `spiffe_sequence`.
//!
//! Two ways to authenticate the endpoint server:
//! - `https_web`: web PKI — the server's certificate chains to a configured CA file (or
//!   the system roots) and names the URL's host;
//! - `https_spiffe`: the server presents an X.509-SVID whose SPIFFE ID is the configured
//!   one, chained to the bundle *currently in force* for that ID's trust domain. For a
//!   trust domain serving its own bundle, that bundle is bootstrapped from a file and then
//!   replaced by each fetch, so a CA rotation announced through the endpoint carries the
//!   trust forward.
//!
//! Every answer is hostile until parsed: at most [`MAX_BUNDLE_BYTES`], strict JSON (no
//! duplicate members), exactly one certificate per `x509-svid` key, a `spiffe_sequence`
//! that never goes back. A refused or failed fetch keeps the last good bundle.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::jwks::{FetchError, get_limited};
use super::{BundleError, LiveBundles, SpiffeId, TrustDomain, strict_json};

/// Largest SPIFFE bundle document accepted.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024;

/// Refresh interval when the document carries no `spiffe_refresh_hint` (then clamped to
/// the configured bounds).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// How the bundle endpoint server is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAuth {
    /// Web PKI. `ca_file`: trust only these CAs; `None`: the system's roots.
    HttpsWeb { ca_file: Option<PathBuf> },
    /// The server's X.509-SVID must name `id` and chain to the bundle in force for
    /// `id`'s trust domain.
    HttpsSpiffe { id: SpiffeId },
}

/// A validated `[[trust_domains]]` bundle endpoint.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub url: String,
    pub auth: EndpointAuth,
    /// PEM bundle in force until the first successful fetch (required when the endpoint
    /// authenticates with an SVID of the trust domain it serves).
    pub bootstrap: Option<PathBuf>,
    pub refresh_min: Duration,
    pub refresh_max: Duration,
}

/// A parsed SPIFFE bundle document (its X.509 part).
#[derive(Debug, Clone)]
pub struct SpiffeBundleDoc {
    pub x509: Vec<CertificateDer<'static>>,
    pub refresh_hint: Option<Duration>,
    pub sequence: Option<u64>,
}

/// Parses the X.509 authorities of a SPIFFE bundle document.
pub fn parse_spiffe_bundle(bytes: &[u8]) -> Result<SpiffeBundleDoc, String> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(format!("document exceeds {MAX_BUNDLE_BYTES} bytes"));
    }
    let doc = strict_json::parse(bytes).map_err(|e| format!("not a bundle document: {e:?}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" array")?;
    let mut x509 = Vec::new();
    for key in keys {
        let key = key.as_object().ok_or("a key is not a JSON object")?;
        if key.get("use").and_then(Value::as_str) != Some("x509-svid") {
            continue; // jwt-svid keys (and any other use) are not X.509 authorities
        }
        // The spec: exactly one certificate, base64 (not base64url) DER.
        let Some(Value::Array(chain)) = key.get("x5c") else {
            return Err("an x509-svid key has no x5c array".into());
        };
        let [Value::String(cert)] = chain.as_slice() else {
            return Err(format!(
                "an x509-svid key must carry exactly one x5c certificate, found {}",
                chain.len()
            ));
        };
        let der = STANDARD
            .decode(cert)
            .map_err(|e| format!("x5c is not base64: {e}"))?;
        x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("x5c is not an X.509 certificate: {e}"))?;
        x509.push(CertificateDer::from(der));
    }
    if x509.is_empty() {
        return Err("no x509-svid authority".into());
    }
    let seconds = |name: &str| -> Result<Option<u64>, String> {
        match doc.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{name} is not a non-negative integer")),
        }
    };
    Ok(SpiffeBundleDoc {
        x509,
        refresh_hint: seconds("spiffe_refresh_hint")?.map(Duration::from_secs),
        sequence: seconds("spiffe_sequence")?,
    })
}

/// The HTTP client for one bundle endpoint: bounded in time, no redirects (the location
/// is configuration), HTTPS only, authenticated as `auth` says.
pub fn http_client(
    url: &str,
    auth: &EndpointAuth,
    live: &Arc<LiveBundles>,
    timeout: Duration,
) -> Result<reqwest::Client, BundleError> {
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(true);
    let builder = match auth {
        EndpointAuth::HttpsWeb { ca_file: None } => builder,
        EndpointAuth::HttpsWeb {
            ca_file: Some(path),
        } => {
            let pem = std::fs::read(path).map_err(|source| BundleError::Io {
                path: path.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                BundleError::BadCertificate {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
            if certs.is_empty() {
                return Err(BundleError::Empty { path: path.clone() });
            }
            builder.tls_certs_only(certs)
        }
        EndpointAuth::HttpsSpiffe { id } => {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let verifier = Arc::new(SpiffeServerVerifier {
                id: id.clone(),
                live: live.clone(),
                provider: provider.clone(),
            });
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| BundleError::Endpoint {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            builder.tls_backend_preconfigured(tls)
        }
    };
    builder.build().map_err(|e| BundleError::Endpoint {
        url: url.to_string(),
        reason: format!("HTTP client: {e}"),
    })
}

/// `https_spiffe`: the server is who its SVID says, and its SVID names the configured
/// SPIFFE ID. The DNS name in the URL plays no part (SPIFFE authentication replaces it).
struct SpiffeServerVerifier {
    id: SpiffeId,
    live: Arc<LiveBundles>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("id", &self.id)
            .finish()
    }
}

fn refused(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        std::io::Error::other(reason),
    ))))
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundles = self.live.current();
        let domain = bundles.domain(self.id.trust_domain()).ok_or_else(|| {
            refused(format!(
                "no bundle in force for trust domain {}",
                self.id.trust_domain()
            ))
        })?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &domain.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let (_, leaf) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|e| refused(format!("server certificate: {e}")))?;
        let presented =
            super::x509::svid_spiffe_id(&leaf).map_err(|e| refused(format!("server SVID: {e}")))?;
        if presented != self.id {
            return Err(refused(format!(
                "server SVID is {presented}, expected {}",
                self.id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The refresher of one trust domain's bundle from its endpoint.
pub struct EndpointSource {
    td: TrustDomain,
    spec: EndpointSpec,
    http: reqwest::Client,
    live: Arc<LiveBundles>,
    last_sequence: Option<u64>,
    failures: u32,
}

impl EndpointSource {
    pub fn new(
        td: TrustDomain,
        spec: EndpointSpec,
        live: Arc<LiveBundles>,
        timeout: Duration,
    ) -> Result<Self, BundleError> {
        let http = http_client(&spec.url, &spec.auth, &live, timeout)?;
        Ok(Self {
            td,
            spec,
            http,
            live,
            last_sequence: None,
            failures: 0,
        })
    }

    /// Loads the first bundle before the broker serves: the bootstrap file (if any),
    /// then one fetch. Without a bootstrap file a failed first fetch is fatal (fail
    /// closed); with one, the bootstrap bundle stays in force and the fetch is retried.
    /// Returns when to fetch next.
    pub async fn initial(&mut self) -> Result<Duration, BundleError> {
        if let Some(path) = &self.spec.bootstrap {
            let certs = super::bundle::read_pem_file(path)?;
            self.live
                .replace(&self.td, certs, &path.display().to_string())?;
        }
        match self.fetch_and_apply().await {
            Ok(next) => Ok(next),
            Err(e) if self.spec.bootstrap.is_some() => {
                tracing::warn!(trust_domain = %self.td, error = %e,
                    "first bundle endpoint fetch failed; serving the bootstrap bundle");
                Ok(self.retry_delay())
            }
            Err(e) => Err(e),
        }
    }

    fn retry_delay(&mut self) -> Duration {
        // Exponential from refresh_min, capped at refresh_max: an endpoint outage is not
        // hammered, and recovery is noticed within refresh_max.
        let shift = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        self.spec
            .refresh_min
            .saturating_mul(1u32 << shift)
            .min(self.spec.refresh_max)
    }

    /// One fetch: on success the new bundle is in force; returns when to fetch next.
    pub async fn fetch_and_apply(&mut self) -> Result<Duration, BundleError> {
        let url = &self.spec.url;
        let bad = |reason: String| BundleError::Endpoint {
            url: url.clone(),
            reason,
        };
        let bytes = get_limited(&self.http, url, MAX_BUNDLE_BYTES)
            .await
            .map_err(|e| match e {
                FetchError::TooLarge => bad(format!("document exceeds {MAX_BUNDLE_BYTES} bytes")),
                FetchError::Http(e) => bad(e),
            })?;
        let doc = parse_spiffe_bundle(&bytes).map_err(bad)?;
        if let (Some(last), Some(seq)) = (self.last_sequence, doc.sequence)
            && seq < last
        {
            // An older bundle again (a replay, or a rolled-back server) could re-trust a
            // CA that was removed.
            return Err(bad(format!(
                "spiffe_sequence went back from {last} to {seq}"
            )));
        }
        let authorities = doc.x509.len();
        self.live.replace(&self.td, doc.x509, url)?;
        if doc.sequence.is_some() {
            self.last_sequence = doc.sequence;
        }
        self.failures = 0;
        tracing::info!(trust_domain = %self.td, %url, authorities, sequence = doc.sequence,
            "trust bundle updated from bundle endpoint");
        Ok(doc
            .refresh_hint
            .unwrap_or(DEFAULT_REFRESH)
            .clamp(self.spec.refresh_min, self.spec.refresh_max))
    }

    /// Refreshes for ever, first after `first`; a failed refresh keeps the last good
    /// bundle in force.
    pub fn spawn(mut self, first: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut next = first;
            loop {
                tokio::time::sleep(next).await;
                next = match self.fetch_and_apply().await {
                    Ok(n) => {
                        record(&self.td, "applied");
                        n
                    }
                    Err(e) => {
                        record(&self.td, "failed");
                        let retry = self.retry_delay();
                        tracing::warn!(trust_domain = %self.td, error = %e, retry_in = ?retry,
                            "bundle endpoint refresh failed; keeping the last good bundle");
                        retry
                    }
                };
            }
        })
    }
}

fn record(td: &TrustDomain, outcome: &'static str) {
    metrics::counter!("mayfly_trust_bundle_updates_total",
        "source" => "endpoint", "trust_domain" => td.to_string(), "outcome" => outcome)
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc_with(keys: serde_json::Value) -> Vec<u8> {
        serde_json::json!({"keys": keys, "spiffe_refresh_hint": 60, "spiffe_sequence": 3})
            .to_string()
            .into_bytes()
    }

    fn ca_b64() -> String {
        crate::install_crypto_provider();
        let ca = crate::pki::Ca::generate("CA", "a.test").expect("ca");
        let der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("der");
        STANDARD.encode(der.as_ref())
    }

    use rustls_pki_types::pem::PemObject;

    #[test]
    fn a_bundle_document_yields_its_x509_authorities_and_hints() {
        let doc = doc_with(serde_json::json!([
            {"use": "x509-svid", "kty": "EC", "x5c": [ca_b64()]},
            {"use": "jwt-svid", "kty": "EC", "kid": "k"}
        ]));
        let parsed = parse_spiffe_bundle(&doc).expect("bundle");
        assert_eq!(parsed.x509.len(), 1);
        assert_eq!(parsed.refresh_hint, Some(Duration::from_secs(60)));
        assert_eq!(parsed.sequence, Some(3));
    }

    #[test]
    fn an_authority_with_two_certificates_is_refused() {
        let b = ca_b64();
        let doc = doc_with(serde_json::json!([{"use": "x509-svid", "x5c": [b, b]}]));
        let err = parse_spiffe_bundle(&doc).expect_err("two certs");
        assert!(err.contains("exactly one x5c"), "{err}");
    }

    #[test]
    fn a_document_without_x509_authorities_is_refused() {
        let doc = doc_with(serde_json::json!([{"use": "jwt-svid", "kid": "k"}]));
        let err = parse_spiffe_bundle(&doc).expect_err("empty");
        assert!(err.contains("no x509-svid authority"), "{err}");
    }

    #[test]
    fn base64url_or_garbage_in_x5c_is_refused() {
        let doc = doc_with(serde_json::json!([{"use": "x509-svid", "x5c": ["-_-_"]}]));
        assert!(
            parse_spiffe_bundle(&doc)
                .expect_err("bad")
                .contains("not base64")
        );
        let junk = STANDARD.encode(b"not a certificate");
        let doc = doc_with(serde_json::json!([{"use": "x509-svid", "x5c": [junk]}]));
        assert!(
            parse_spiffe_bundle(&doc)
                .expect_err("bad")
                .contains("not an X.509")
        );
    }

    #[test]
    fn duplicate_members_and_oversized_documents_are_refused() {
        let dup = br#"{"keys":[],"keys":[]}"#;
        assert!(
            parse_spiffe_bundle(dup)
                .expect_err("dup")
                .contains("not a bundle")
        );
        let big = vec![b' '; MAX_BUNDLE_BYTES + 1];
        assert!(
            parse_spiffe_bundle(&big)
                .expect_err("big")
                .contains("exceeds")
        );
    }

    #[test]
    fn a_refresh_hint_of_the_wrong_type_is_refused() {
        let doc = serde_json::json!({
            "keys": [{"use": "x509-svid", "x5c": [ca_b64()]}],
            "spiffe_refresh_hint": "soon"
        });
        let err = parse_spiffe_bundle(doc.to_string().as_bytes()).expect_err("type");
        assert!(err.contains("spiffe_refresh_hint"), "{err}");
    }
}
