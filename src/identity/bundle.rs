//! Trust bundles: the CA certificates of each trust domain, one verifier per domain, so
//! an SVID is only ever checked against the bundle of the trust domain it names.

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::TrustDomain;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read trust bundle {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trust bundle {path} holds no PEM certificate")]
    Empty { path: PathBuf },
    #[error("trust bundle {path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("trust domain {0} is configured twice")]
    Duplicate(String),
}

pub(crate) struct DomainBundle {
    pub(crate) verifier: Arc<dyn ClientCertVerifier>,
}

/// The X.509 bundles of every trusted trust domain.
#[derive(Clone, Default)]
pub struct TrustBundles {
    domains: HashMap<String, Arc<DomainBundle>>,
}

impl std::fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.domains.keys().collect();
        names.sort();
        f.debug_struct("TrustBundles")
            .field("domains", &names)
            .finish()
    }
}

impl TrustBundles {
    pub fn from_pem_files(entries: &[(TrustDomain, PathBuf)]) -> Result<Self, BundleError> {
        let mut out = Self::default();
        for (td, path) in entries {
            let pem = std::fs::read(path).map_err(|source| BundleError::Io {
                path: path.clone(),
                source,
            })?;
            out.add_pem(td, &pem, path)?;
        }
        Ok(out)
    }

    pub fn add_pem(
        &mut self,
        td: &TrustDomain,
        pem: &[u8],
        origin: &Path,
    ) -> Result<(), BundleError> {
        if self.domains.contains_key(td.as_str()) {
            return Err(BundleError::Duplicate(td.to_string()));
        }
        let bad = |reason: String| BundleError::BadCertificate {
            path: origin.to_path_buf(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
            count += 1;
        }
        if count == 0 {
            return Err(BundleError::Empty {
                path: origin.to_path_buf(),
            });
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        self.domains
            .insert(td.to_string(), Arc::new(DomainBundle { verifier }));
        Ok(())
    }

    pub(crate) fn domain(&self, name: &str) -> Option<&Arc<DomainBundle>> {
        self.domains.get(name)
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }
}

/// The trust bundles in force, replaceable while the broker runs: `refresh` re-reads the
/// PEM files and swaps them in, or keeps the last good set when a file is missing or bad.
pub struct LiveBundles {
    files: Vec<(TrustDomain, PathBuf)>,
    current: std::sync::RwLock<Arc<TrustBundles>>,
    stamp: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
}

impl LiveBundles {
    pub fn load(files: &[(TrustDomain, PathBuf)]) -> Result<Self, BundleError> {
        let bundles = TrustBundles::from_pem_files(files)?;
        Ok(Self {
            files: files.to_vec(),
            current: std::sync::RwLock::new(Arc::new(bundles)),
            stamp: std::sync::Mutex::new(Self::stamp_of(files)),
        })
    }

    fn stamp_of(files: &[(TrustDomain, PathBuf)]) -> Vec<Option<std::time::SystemTime>> {
        files
            .iter()
            .map(|(_, p)| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    pub fn current(&self) -> Arc<TrustBundles> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the bundles if a file changed. `Ok(true)` when a new set is in force;
    /// on error the previous set stays.
    pub fn refresh(&self) -> Result<bool, BundleError> {
        let now = Self::stamp_of(&self.files);
        {
            let last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *last == now {
                return Ok(false);
            }
        }
        let fresh = TrustBundles::from_pem_files(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(true)
    }
}
