//! Who is calling. Identity is parsed once, at the edge, into a [`VerifiedCaller`] that
//! only this module can construct; policy, broker and providers accept nothing weaker.

pub mod bundle;
pub mod spiffe_id;
pub mod x509;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::IpAddr;
use time::OffsetDateTime;

pub use bundle::{BundleError, TrustBundles};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a caller's proof of identity was refused. Each rule has its own variant (and its
/// own stable API code, assigned in `api::error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("a client certificate (X.509-SVID) is required")]
    ClientCertRequired,
    #[error("client certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("X.509-SVID must carry exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    #[error("X.509-SVID URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[from] SpiffeIdError),
    #[error("X.509-SVID leaf certificate must not be a CA")]
    LeafIsCa,
    #[error("X.509-SVID leaf must have the digitalSignature key usage")]
    MissingDigitalSignature,
    #[error("X.509-SVID leaf must not have the keyCertSign or cRLSign key usage")]
    ForbiddenKeyUsage,
    #[error("no trust bundle for trust domain {0:?}")]
    UnknownTrustDomain(String),
    #[error("X.509-SVID has expired")]
    Expired,
    #[error("X.509-SVID is not valid yet")]
    NotYetValid,
    #[error("X.509-SVID does not chain to the bundle of its trust domain: {0}")]
    UntrustedChain(String),
    #[error("X.509-SVID extended key usage does not allow client authentication")]
    WrongExtendedKeyUsage,
    #[error("X.509-SVID chain is invalid: {0}")]
    ChainInvalid(String),
}

/// How the caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    X509Svid,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::X509Svid => "x509_svid",
        }
    }
}

/// A workload identity. Serialised as its string form (`spiffe://…`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Spiffe(SpiffeId),
}

impl Principal {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        SpiffeId::parse(s).map(Principal::Spiffe)
    }
    pub fn as_str(&self) -> &str {
        match self {
            Principal::Spiffe(id) => id.as_str(),
        }
    }
    pub fn trust_domain(&self) -> &str {
        match self {
            Principal::Spiffe(id) => id.trust_domain(),
        }
    }
    pub fn path(&self) -> &str {
        match self {
            Principal::Spiffe(id) => id.path(),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({})", self.as_str())
    }
}

impl Serialize for Principal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Principal::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Evidence beside identity, read by policy and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Posture {
    pub method: AuthMethod,
    pub trust_domain: String,
    pub source: Option<IpAddr>,
    /// When the presented credential (certificate) stops being valid.
    #[serde(with = "time::serde::rfc3339")]
    pub credential_not_after: OffsetDateTime,
    /// `sha256:` fingerprint of the leaf certificate.
    pub credential_fingerprint: String,
}

impl Posture {
    pub fn credential_remaining_secs(&self, now: OffsetDateTime) -> i64 {
        (self.credential_not_after - now).whole_seconds().max(0)
    }
}

/// A caller whose identity was verified cryptographically. Only `identity` constructs it.
#[derive(Debug, Clone)]
pub struct VerifiedCaller {
    principal: Principal,
    posture: Posture,
}

impl VerifiedCaller {
    pub(in crate::identity) fn new(principal: Principal, posture: Posture) -> Self {
        Self { principal, posture }
    }
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
    pub fn method(&self) -> AuthMethod {
        self.posture.method
    }
    pub fn posture(&self) -> &Posture {
        &self.posture
    }
}
