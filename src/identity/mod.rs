//! Who is calling. Identity is parsed once, at the edge, into a [`VerifiedCaller`] that
//! only this module can construct; policy, broker and providers accept nothing weaker.

pub mod bearer;
pub mod bundle;
pub mod bundle_endpoint;
pub mod dpop;
pub mod jwks;
mod once_key;
pub mod spiffe_id;
pub mod strict_json;
pub mod workload_api;
pub mod x509;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use time::OffsetDateTime;

pub use bundle::{BundleError, LiveBundles, TrustBundles};
pub use once_key::OnceKey;
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
    #[error(
        "X.509-SVID leaf's SPIFFE ID must have a path (a trust domain alone names no workload)"
    )]
    LeafWithoutPath,
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
    #[error("a certificate that signs in the X.509-SVID chain is not a CA (basicConstraints cA)")]
    IntermediateNotCa,
    #[error("a signing certificate in the X.509-SVID chain lacks the keyCertSign key usage")]
    IssuerNotCertSigner,
    #[error(
        "the X.509-SVID chain has more CAs below a certificate than its pathLenConstraint allows"
    )]
    PathLenExceeded,
    #[error("the X.509-SVID chain violates a CA's name constraints")]
    NameConstraintViolated,
    #[error("an intermediate CA of the X.509-SVID chain has expired")]
    IntermediateExpired,
    #[error("an intermediate CA of the X.509-SVID chain is not valid yet")]
    IntermediateNotYetValid,

    // --- Bearer tokens (JWT-SVID, OIDC). One variant per RFC 8725 / JWT-SVID rule.
    #[error("a request may carry a client certificate or a bearer token, not both")]
    AmbiguousCredentials,
    #[error("the Authorization header must be `Bearer <token>`")]
    AuthorizationScheme,
    #[error("bearer token exceeds {0} bytes")]
    TokenTooLarge(usize),
    #[error("bearer token is not a compact JWS: {0}")]
    TokenMalformed(&'static str),
    #[error("JWT {part} is not valid JSON: {reason}")]
    JsonMalformed { part: &'static str, reason: String },
    #[error("JWT {part} has the member {name:?} twice")]
    DuplicateMember { part: &'static str, name: String },
    #[error("JWT alg \"none\" is never accepted")]
    AlgNone,
    #[error("JWT alg {0} is symmetric; only asymmetric signatures are accepted")]
    AlgSymmetric(String),
    #[error("JWT alg {0} is not allowed for this issuer")]
    AlgNotAllowed(String),
    #[error("JWT header {0:?} is refused: keys come only from configured sources")]
    EmbeddedKeyHeader(&'static str),
    #[error("JWT header lists critical extensions Mayfly does not understand: {0}")]
    UnsupportedCrit(String),
    #[error("JWT typ {0:?} is not the type this issuer uses")]
    TypMismatch(String),
    #[error("JWT has no kid and the issuer has several keys")]
    MissingKid,
    #[error("no key with kid {0:?} for this issuer")]
    UnknownKid(String),
    #[error("the issuer's keys cannot be loaded: {0}")]
    KeysUnavailable(String),
    #[error("the key does not fit the token's alg")]
    KeyAlgMismatch,
    #[error("JWT signature is invalid")]
    BadSignature,
    #[error("JWT claim {0:?} is required")]
    MissingClaim(&'static str),
    #[error("JWT claim {0:?} has the wrong type")]
    ClaimType(&'static str),
    #[error("JWT issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("JWT audience does not include Mayfly's audience")]
    AudienceMismatch,
    #[error("JWT-SVID carries {0} audiences; only one is accepted")]
    MultipleAudiences(usize),
    #[error("JWT has expired")]
    TokenExpired,
    #[error("JWT is not valid yet (nbf)")]
    TokenNotYetValid,
    #[error("JWT was issued in the future (iat)")]
    IssuedInFuture,
}

/// How the caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    X509Svid,
    JwtSvid,
    Oidc,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::X509Svid => "x509_svid",
            AuthMethod::JwtSvid => "jwt_svid",
            AuthMethod::Oidc => "oidc",
        }
    }
}

/// An OIDC workload identity: the token's `iss` and `sub`. String form `issuer#sub`
/// (an OIDC issuer URL has no fragment, so the first `#` separates them).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OidcSubject {
    raw: String,
    split: usize,
}

/// Why `issuer#sub` is not an OIDC principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error(transparent)]
    Spiffe(#[from] SpiffeIdError),
    #[error("OIDC principal must be `issuer#sub` with an http(s) issuer and a non-empty sub")]
    Oidc,
}

impl OidcSubject {
    pub fn new(issuer: &str, sub: &str) -> Result<Self, PrincipalError> {
        let ok_issuer = (issuer.starts_with("https://") || issuer.starts_with("http://"))
            && !issuer.contains('#');
        if !ok_issuer
            || sub.is_empty()
            || issuer.len() + sub.len() > 2048
            || sub.chars().any(char::is_control)
        {
            return Err(PrincipalError::Oidc);
        }
        Ok(Self {
            raw: format!("{issuer}#{sub}"),
            split: issuer.len(),
        })
    }
    pub fn issuer(&self) -> &str {
        &self.raw[..self.split]
    }
    pub fn sub(&self) -> &str {
        &self.raw[self.split + 1..]
    }
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

/// A workload identity. Serialised as its string form (`spiffe://…`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Spiffe(SpiffeId),
    Oidc(OidcSubject),
}

impl Principal {
    /// `spiffe://…` is a SPIFFE ID; anything else must be `issuer#sub`.
    pub fn parse(s: &str) -> Result<Self, PrincipalError> {
        if s.starts_with("spiffe://") || !s.contains('#') {
            return Ok(SpiffeId::parse(s).map(Principal::Spiffe)?);
        }
        let (iss, sub) = s.split_once('#').ok_or(PrincipalError::Oidc)?;
        OidcSubject::new(iss, sub).map(Principal::Oidc)
    }
    pub fn as_str(&self) -> &str {
        match self {
            Principal::Spiffe(id) => id.as_str(),
            Principal::Oidc(o) => o.as_str(),
        }
    }
    /// The SPIFFE trust domain; empty for an OIDC principal.
    pub fn trust_domain(&self) -> &str {
        match self {
            Principal::Spiffe(id) => id.trust_domain(),
            Principal::Oidc(_) => "",
        }
    }
    /// The SPIFFE ID path; empty for an OIDC principal.
    pub fn path(&self) -> &str {
        match self {
            Principal::Spiffe(id) => id.path(),
            Principal::Oidc(_) => "",
        }
    }
    pub fn issuer(&self) -> Option<&str> {
        match self {
            Principal::Spiffe(_) => None,
            Principal::Oidc(o) => Some(o.issuer()),
        }
    }
    pub fn subject(&self) -> Option<&str> {
        match self {
            Principal::Spiffe(_) => None,
            Principal::Oidc(o) => Some(o.sub()),
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
    /// `sha256:` fingerprint of the leaf certificate or of the bearer token.
    pub credential_fingerprint: String,
    /// The `iss` of a bearer token (JWT-SVIDs may carry one; OIDC tokens always do).
    pub issuer: Option<String>,
    /// Selected token claims (see `bearer::POSTURE_CLAIMS`), as strings.
    pub claims: BTreeMap<String, String>,
}

impl Posture {
    pub fn credential_remaining_secs(&self, now: OffsetDateTime) -> i64 {
        (self.credential_not_after - now).whole_seconds().max(0)
    }
}

/// RFC 8705 §3.1: base64url (no padding) of the SHA-256 of a certificate's DER.
pub fn x5t_s256(der: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

/// The single-use `jti` of a verified bearer token, to be consumed once the request it
/// authenticates has passed authorization (`Broker::spend_single_use`). Shared by every
/// clone of the caller, so one request consumes it once however many steps it runs.
#[derive(Debug)]
pub struct SingleUse {
    /// `jti:bearer:<iss or trust domain>:<jti>`.
    pub key: String,
    /// The token's `exp` plus leeway: the `jti` is remembered until then.
    pub until: OffsetDateTime,
    spent: std::sync::atomic::AtomicBool,
}

impl SingleUse {
    pub(in crate::identity) fn new(key: String, until: OffsetDateTime) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            key,
            until,
            spent: std::sync::atomic::AtomicBool::new(false),
        })
    }
    /// Marks it spent by this request; `true` if it was not already.
    pub fn claim(&self) -> bool {
        !self.spent.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
    /// Whether this request already consumed it.
    pub fn is_spent(&self) -> bool {
        self.spent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A caller whose identity was verified cryptographically. Only `identity` constructs it.
#[derive(Debug, Clone)]
pub struct VerifiedCaller {
    principal: Principal,
    posture: Posture,
    /// RFC 8705 `x5t#S256` of the client certificate the caller presented (X.509-SVID
    /// callers only): what a certificate-bound token is bound to.
    cert_thumbprint: Option<String>,
    single_use: Option<std::sync::Arc<SingleUse>>,
}

impl VerifiedCaller {
    pub(in crate::identity) fn new(principal: Principal, posture: Posture) -> Self {
        Self {
            principal,
            posture,
            cert_thumbprint: None,
            single_use: None,
        }
    }
    pub(in crate::identity) fn with_single_use(
        mut self,
        single_use: Option<std::sync::Arc<SingleUse>>,
    ) -> Self {
        self.single_use = single_use;
        self
    }
    /// The single-use `jti` this request must consume, if its token is single-use.
    pub fn single_use(&self) -> Option<&std::sync::Arc<SingleUse>> {
        self.single_use.as_ref()
    }
    /// The caller proved possession of this certificate (its DER) in the TLS handshake.
    pub(in crate::identity) fn with_certificate(mut self, leaf_der: &[u8]) -> Self {
        self.cert_thumbprint = Some(x5t_s256(leaf_der));
        self
    }
    /// RFC 8705 §3.1 `x5t#S256` of the presented client certificate, if any.
    pub fn cert_thumbprint(&self) -> Option<&str> {
        self.cert_thumbprint.as_deref()
    }
    /// Tests elsewhere in the crate: a caller with this identity and posture, as if verified.
    #[cfg(test)]
    pub(crate) fn for_tests(principal: Principal, posture: Posture) -> Self {
        Self::new(principal, posture)
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
