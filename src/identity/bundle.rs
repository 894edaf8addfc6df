//! Trust bundles: the CA certificates of each trust domain, one verifier per domain, so
//! an SVID is only ever checked against the bundle of the trust domain it names.
//!
//! A domain's bundle comes from one source (see `config`): a PEM file, a SPIFFE bundle
//! endpoint, or the SPIFFE Workload API. Each source replaces only its own domains in
//! [`LiveBundles`]; a source that fails keeps its domains' last good bundle.

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
    /// A bundle received from a bundle endpoint or the Workload API was refused.
    #[error("trust bundle for {trust_domain} from {origin}: {reason}")]
    Invalid {
        trust_domain: String,
        origin: String,
        reason: String,
    },
    /// The SPIFFE bundle endpoint could not be read (or its answer was refused).
    #[error("bundle endpoint {url}: {reason}")]
    Endpoint { url: String, reason: String },
    /// Fail closed at start-up: the Workload API gave no bundle for these trust domains
    /// within the configured time.
    #[error(
        "SPIFFE Workload API {socket}: no bundle for {missing:?} within {waited:?} (last error: {last_error})"
    )]
    WorkloadApiStartup {
        socket: String,
        /// `"X.509 <trust domain>"` / `"JWT <trust domain>"`.
        missing: Vec<String>,
        waited: Duration,
        last_error: String,
    },
}

/// One trust domain's bundle, ready to verify with.
pub(crate) struct DomainBundle {
    /// The trust anchors: client X.509-SVIDs are path-validated against them
    /// (`x509::verify_svid`), and so is a server's SVID (the `https_spiffe` profile).
    pub(crate) roots: Arc<RootCertStore>,
}

impl DomainBundle {
    /// A bundle from DER certificates; `origin` names where they came from in errors.
    fn from_certs(
        certs: Vec<CertificateDer<'static>>,
        bad: impl Fn(String) -> BundleError,
    ) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(bad("no certificate".into()));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }
}

/// Parses a PEM bundle into DER certificates (at least one).
fn pem_certs(pem: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::BadCertificate {
            path: origin.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(BundleError::Empty {
            path: origin.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads a PEM bundle file into DER certificates (at least one).
pub fn read_pem_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let pem = std::fs::read(path).map_err(|source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    pem_certs(&pem, path)
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
        let certs = pem_certs(pem, origin)?;
        let bundle = DomainBundle::from_certs(certs, |reason| BundleError::BadCertificate {
            path: origin.to_path_buf(),
            reason,
        })?;
        self.domains.insert(td.to_string(), Arc::new(bundle));
        Ok(())
    }

    pub(crate) fn domain(&self, name: &str) -> Option<&Arc<DomainBundle>> {
        self.domains.get(name)
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }
}

/// The trust bundles in force, replaceable while the broker runs. Each trust domain is
/// replaced on its own by its source: `refresh` re-reads the PEM files of file-sourced
/// domains, the bundle endpoint and Workload API tasks call `replace`. A refused update
/// leaves the domain's last good bundle in force.
pub struct LiveBundles {
    files: Vec<(TrustDomain, PathBuf)>,
    current: std::sync::RwLock<Arc<TrustBundles>>,
    stamp: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
}

impl LiveBundles {
    /// Every domain from a PEM file.
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

    /// Puts `certs` in force as the bundle of `td` (new connections verify against it).
    /// On error the domain keeps its previous bundle.
    pub fn replace(
        &self,
        td: &TrustDomain,
        certs: Vec<CertificateDer<'static>>,
        origin: &str,
    ) -> Result<(), BundleError> {
        let bundle = DomainBundle::from_certs(certs, |reason| BundleError::Invalid {
            trust_domain: td.to_string(),
            origin: origin.to_string(),
            reason,
        })?;
        self.swap(|domains| {
            domains.insert(td.to_string(), Arc::new(bundle));
        });
        Ok(())
    }

    /// Stops trusting `td` (its source no longer lists it). Returns whether it was trusted.
    pub fn remove(&self, td: &TrustDomain) -> bool {
        let mut removed = false;
        self.swap(|domains| removed = domains.remove(td.as_str()).is_some());
        removed
    }

    /// Copy-on-write under the write lock, so concurrent sources never lose an update.
    fn swap(&self, change: impl FnOnce(&mut HashMap<String, Arc<DomainBundle>>)) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut next = TrustBundles::clone(&cur);
        change(&mut next.domains);
        *cur = Arc::new(next);
    }

    /// Re-reads the file-sourced bundles if a file changed. `Ok(true)` when new bundles
    /// are in force; on error every file-sourced domain keeps its previous bundle.
    pub fn refresh(&self) -> Result<bool, BundleError> {
        let now = Self::stamp_of(&self.files);
        {
            let last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *last == now {
                return Ok(false);
            }
        }
        let fresh = TrustBundles::from_pem_files(&self.files)?;
        self.swap(|domains| domains.extend(fresh.domains));
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(true)
    }
}
