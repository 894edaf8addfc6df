//! Two trust domains minted in code with rcgen, their SVIDs on disk, and a
//! `VerifiedCaller` made by the real identity code.

use super::client;
use mayfly::pki::{Ca, LeafSpec};
use std::path::{Path, PathBuf};

pub const TD_A: &str = "a.test";
pub const TD_B: &str = "b.test";
pub const AGENT: &str = "spiffe://a.test/agent/one";
pub const AGENT2: &str = "spiffe://a.test/agent/two";
pub const OPERATOR: &str = "spiffe://a.test/operator/admin";

/// A cert/key pair on disk.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Two trust domains with their CAs, a server certificate, and files on disk.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_a: Ca,
    pub ca_b: Ca,
    pub bundle_a: PathBuf,
    pub bundle_b: PathBuf,
    pub server: Pair,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        mayfly::install_crypto_provider();
        let ca_a = Ca::generate("CA A", TD_A).expect("ca a");
        let ca_b = Ca::generate("CA B", TD_B).expect("ca b");
        let bundle_a = dir.join("bundle-a.pem");
        let bundle_b = dir.join("bundle-b.pem");
        std::fs::write(&bundle_a, ca_a.cert_pem()).expect("write");
        std::fs::write(&bundle_b, ca_b.cert_pem()).expect("write");
        let mut pki = Self {
            dir: dir.to_path_buf(),
            ca_a,
            ca_b,
            bundle_a,
            bundle_b,
            server: Pair {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
        };
        let spec = LeafSpec::server(
            None,
            &["localhost"],
            &["127.0.0.1".parse().expect("ip")],
            30,
        );
        pki.server = pki.issue_with(&pki.ca_a, "server", &spec);
        pki
    }

    pub fn issue_with(&self, ca: &Ca, name: &str, spec: &LeafSpec) -> Pair {
        let issued = ca.issue(spec).expect("issue");
        let pair = Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pair.cert, &issued.cert_pem).expect("write");
        std::fs::write(&pair.key, issued.key_pem.expose()).expect("write");
        pair
    }

    /// A valid SVID for `id` from trust domain A's CA.
    /// An mTLS client presenting a fresh SVID for `id`, trusting the server's CA.
    pub fn client_as(&self, name: &str, id: &str) -> reqwest::Client {
        client(&self.bundle_a, Some(&self.svid(name, id)))
    }

    pub fn svid(&self, name: &str, id: &str) -> Pair {
        self.issue_with(&self.ca_a, name, &LeafSpec::svid(id, 1))
    }
}

/// A `VerifiedCaller` produced by the real identity code from `pair` (trust domain A).
pub fn verified(pki: &Pki, pair: &Pair) -> mayfly::identity::VerifiedCaller {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_file_iter(&pair.cert)
            .expect("pem")
            .collect::<Result<_, _>>()
            .expect("der");
    let bundles = mayfly::identity::TrustBundles::from_pem_files(&[(
        mayfly::identity::TrustDomain::parse(TD_A).expect("td"),
        pki.bundle_a.clone(),
    )])
    .expect("bundles");
    mayfly::identity::x509::verify_svid(
        &chain,
        &bundles,
        Some("127.0.0.1".parse().expect("ip")),
        rustls_pki_types::UnixTime::now(),
    )
    .expect("valid svid")
}
