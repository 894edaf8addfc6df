//! DPoP (RFC 9449): a client proves possession of a key with each request, and the
//! tokens Mayfly mints for it are bound to that key (`cnf.jkt`), so a stolen token is
//! useless without the key.
//!
//! A proof is checked in this order, each rule with its own [`DpopError`] (RFC 9449
//! §4.3): size → three base64url segments → header and claims are JSON objects without
//! duplicate members → `typ` is `dpop+jwt` → `alg` is asymmetric and supported → `jwk`
//! is a public key of a type that fits `alg` (no private member) and no other key header
//! → `crit` absent → signature → `jti`, `htm`, `htu`, `iat` present → `htm` = the
//! request method → `htu` = the request URL (normalised, without query and fragment) →
//! `iat` inside the window → `ath` = hash of the access token when one is presented →
//! `nonce` when the server requires one. The `jti` is not checked here: the broker
//! consumes it in the shared store with the lease of the credential the proof obtains
//! (so a refused request never burns it, and every replica sees the same set).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::Jwk;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use super::OnceKey;
use super::strict_json::{self, StrictJsonError};

/// Largest proof accepted (an RSA-4096 `jwk` fits with room to spare).
pub const MAX_PROOF_BYTES: usize = 8 * 1024;
/// Longest `jti` accepted (RFC 9449 suggests 96 random bits; UUIDs are 36 characters).
pub const MAX_JTI_LEN: usize = 128;
/// The `typ` of a DPoP proof.
pub const PROOF_TYP: &str = "dpop+jwt";
/// Signature algorithms accepted in proofs (asymmetric only; never `none` or HS*).
pub const ALGORITHMS: &[&str] = &[
    "ES256", "ES384", "EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
];
/// Smallest RSA modulus accepted in a proof's `jwk`, in bits.
const MIN_RSA_BITS: usize = 2048;
/// JWK members that only a private key has (RFC 7517/7518): a proof carrying one has
/// leaked its key and is refused.
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Why a DPoP proof was refused. Each has a stable code (`code()`), documented in
/// docs/api-errors.md; the token endpoint answers them all as `invalid_dpop_proof`
/// except [`DpopError::UseNonce`] (`use_dpop_nonce`), as RFC 9449 says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("a request may carry one DPoP header, found {0}")]
    MultipleProofs(usize),
    #[error("DPoP proof exceeds {MAX_PROOF_BYTES} bytes")]
    TooLarge,
    #[error("DPoP proof is not a compact JWS: {0}")]
    Malformed(&'static str),
    #[error("DPoP proof {part} is not valid JSON or has a duplicate member: {reason}")]
    Json { part: &'static str, reason: String },
    #[error("DPoP proof typ must be \"dpop+jwt\"")]
    Typ,
    #[error("DPoP proof alg {0:?} is refused: asymmetric algorithms only")]
    Alg(String),
    #[error(
        "DPoP proof jwk is missing, not a public key of a supported type, or does not fit alg: {0}"
    )]
    Jwk(&'static str),
    #[error("DPoP proof jwk carries private key member {0:?}")]
    PrivateKey(String),
    #[error("DPoP proof header {0:?} is refused")]
    Header(&'static str),
    #[error("DPoP proof signature is invalid")]
    Signature,
    #[error("DPoP proof claim {0:?} is missing or has the wrong type")]
    Claim(&'static str),
    #[error("DPoP proof htm does not match the request method")]
    Htm,
    #[error("DPoP proof htu does not match the request URL")]
    Htu,
    #[error("DPoP proof is too old (iat outside the accepted window)")]
    Expired,
    #[error("DPoP proof was issued in the future (iat)")]
    Future,
    #[error("DPoP proof ath is missing or is not the hash of the presented access token")]
    Ath,
    #[error("a fresh server nonce is required in the DPoP proof")]
    UseNonce,
    #[error("DPoP proof was already used (jti)")]
    Replayed,
}

impl DpopError {
    /// The stable machine code of this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            DpopError::MultipleProofs(_) => "dpop_proof_multiple",
            DpopError::TooLarge => "dpop_proof_too_large",
            DpopError::Malformed(_) | DpopError::Json { .. } => "dpop_proof_malformed",
            DpopError::Typ => "dpop_proof_typ",
            DpopError::Alg(_) => "dpop_proof_alg",
            DpopError::Jwk(_) => "dpop_proof_jwk",
            DpopError::PrivateKey(_) => "dpop_proof_private_key",
            DpopError::Header(_) => "dpop_proof_header",
            DpopError::Signature => "dpop_proof_signature",
            DpopError::Claim(_) => "dpop_proof_claim",
            DpopError::Htm => "dpop_proof_htm",
            DpopError::Htu => "dpop_proof_htu",
            DpopError::Expired => "dpop_proof_expired",
            DpopError::Future => "dpop_proof_future",
            DpopError::Ath => "dpop_proof_ath",
            DpopError::UseNonce => "use_dpop_nonce",
            DpopError::Replayed => "dpop_proof_replayed",
        }
    }
}

/// `[dpop]` settings, validated.
#[derive(Debug, Clone)]
pub struct DpopConfig {
    /// How old (by `iat`) a proof may be.
    pub max_age: Duration,
    /// Clock skew allowed for a proof from the future.
    pub leeway: Duration,
    /// When set, every proof must carry a nonce Mayfly issued (`DPoP-Nonce`).
    pub nonce: Option<NonceKey>,
}

impl Default for DpopConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(60),
            leeway: Duration::from_secs(5),
            nonce: None,
        }
    }
}

/// Server nonces without server state: `base64url(window ‖ HMAC-SHA256(key, window))`,
/// valid in their window and the next, on every replica holding the same key file.
#[derive(Clone)]
pub struct NonceKey {
    key: Arc<aws_lc_rs::hmac::Key>,
    lifetime: Duration,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceKey")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl NonceKey {
    /// `secret` must be at least 32 bytes (the key file's content).
    pub fn new(secret: &[u8], lifetime: Duration) -> Result<Self, String> {
        if secret.len() < 32 {
            return Err("the nonce secret must be at least 32 bytes".into());
        }
        if lifetime.as_secs() == 0 {
            return Err("nonce_lifetime must be at least 1s".into());
        }
        Ok(Self {
            key: Arc::new(aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                secret,
            )),
            lifetime,
        })
    }

    fn window(&self, now: OffsetDateTime) -> u64 {
        u64::try_from(now.unix_timestamp()).unwrap_or(0) / self.lifetime.as_secs().max(1)
    }

    fn for_window(&self, w: u64) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.key, &w.to_be_bytes());
        let mut raw = w.to_be_bytes().to_vec();
        raw.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The nonce to hand out now.
    pub fn current(&self, now: OffsetDateTime) -> String {
        self.for_window(self.window(now))
    }

    fn accepts(&self, nonce: &str, now: OffsetDateTime) -> bool {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(nonce) else {
            return false;
        };
        let Some((window, tag)) = raw.split_first_chunk::<8>() else {
            return false;
        };
        let (got, current) = (u64::from_be_bytes(*window), self.window(now));
        // This window or the one before; the MAC is compared in constant time.
        (got == current || got.saturating_add(1) == current)
            && aws_lc_rs::hmac::verify(&self.key, window, tag).is_ok()
    }
}

/// What a proof must match: the request it came with. (No `Debug`: it holds the
/// access token.)
#[derive(Clone, Copy)]
pub struct ProofContext<'a> {
    /// The HTTP method, as sent (`POST`).
    pub method: &'a str,
    /// The URL the request was sent to: Mayfly's public base (its issuer) and the path.
    pub url: &'a str,
    /// The access token presented with the request (`Authorization`), if any: the proof
    /// must carry its hash (`ath`).
    pub access_token: Option<&'a str>,
    pub now: OffsetDateTime,
}

/// A proof that passed every check: the key it proved, as its RFC 7638 thumbprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    pub jkt: String,
}

/// Checks DPoP proofs. The `jti` a proof carries is consumed by the caller, in the
/// shared store, with the write of whatever the proof obtains (`check_unspent`).
pub struct DpopVerifier {
    cfg: DpopConfig,
}

impl std::fmt::Debug for DpopVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopVerifier")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn b64(seg: &str) -> Result<Vec<u8>, DpopError> {
    if seg.is_empty() {
        return Err(DpopError::Malformed("empty segment"));
    }
    URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|_| DpopError::Malformed("segment is not base64url"))
}

fn object(part: &'static str, bytes: &[u8]) -> Result<Map<String, Value>, DpopError> {
    match strict_json::parse(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(DpopError::Json {
            part,
            reason: "not a JSON object".into(),
        }),
        Err(StrictJsonError::Duplicate(name)) => Err(DpopError::Json {
            part,
            reason: format!("duplicate member {name:?}"),
        }),
        Err(StrictJsonError::Malformed(reason)) => Err(DpopError::Json { part, reason }),
    }
}

fn str_member<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    m.get(name).and_then(Value::as_str)
}

/// RFC 7638 §3.2 thumbprint of a public JWK: SHA-256 over its required members in
/// lexicographic order, without whitespace. Errors name a missing member.
pub fn jwk_thumbprint(jwk: &Map<String, Value>) -> Result<String, DpopError> {
    let member = |name: &'static str| -> Result<String, DpopError> {
        let v = str_member(jwk, name).ok_or(DpopError::Jwk("a required member is missing"))?;
        serde_json::to_string(v).map_err(|_| DpopError::Jwk("member is not a string"))
    };
    let canonical = match str_member(jwk, "kty") {
        Some("EC") => format!(
            r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
            member("crv")?,
            member("x")?,
            member("y")?
        ),
        Some("OKP") => format!(
            r#"{{"crv":{},"kty":"OKP","x":{}}}"#,
            member("crv")?,
            member("x")?
        ),
        Some("RSA") => format!(
            r#"{{"e":{},"kty":"RSA","n":{}}}"#,
            member("e")?,
            member("n")?
        ),
        _ => return Err(DpopError::Jwk("kty must be EC, OKP or RSA")),
    };
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

/// RFC 9449 §4.3 point 9 with RFC 3986 §6.2.2–6.2.3: scheme and host lower-cased,
/// default port dropped, dot segments resolved, empty path as `/`; query and fragment
/// ignored. `None` for anything that is not an absolute http(s) URL.
pub fn normalize_htu(raw: &str) -> Option<String> {
    let mut u = url::Url::parse(raw).ok()?;
    if !matches!(u.scheme(), "https" | "http") || u.host().is_none() {
        return None;
    }
    u.set_query(None);
    u.set_fragment(None);
    Some(u.to_string())
}

/// `ath`: base64url SHA-256 of the access token's ASCII (RFC 9449 §4.2).
pub fn access_token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<i64, DpopError> {
    match claims.get(name) {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.floor() as i64)
            })
            .ok_or(DpopError::Claim(name)),
        _ => Err(DpopError::Claim(name)),
    }
}

/// Checks that a public JWK fits `alg` and builds its verification key.
fn key_for(
    alg: Algorithm,
    jwk: &Map<String, Value>,
) -> Result<jsonwebtoken::DecodingKey, DpopError> {
    if let Some(name) = PRIVATE_MEMBERS.iter().find(|m| jwk.contains_key(**m)) {
        return Err(DpopError::PrivateKey((*name).to_string()));
    }
    let kty = str_member(jwk, "kty");
    let crv = str_member(jwk, "crv");
    let fits = match alg {
        Algorithm::ES256 => kty == Some("EC") && crv == Some("P-256"),
        Algorithm::ES384 => kty == Some("EC") && crv == Some("P-384"),
        Algorithm::EdDSA => kty == Some("OKP") && crv == Some("Ed25519"),
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => kty == Some("RSA"),
        _ => false,
    };
    if !fits {
        return Err(DpopError::Jwk("the key type or curve does not fit alg"));
    }
    if kty == Some("RSA") {
        let n = str_member(jwk, "n")
            .and_then(|n| URL_SAFE_NO_PAD.decode(n).ok())
            .ok_or(DpopError::Jwk("RSA modulus is not base64url"))?;
        let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
        if bits < MIN_RSA_BITS {
            return Err(DpopError::Jwk("RSA modulus is shorter than 2048 bits"));
        }
    }
    let parsed: Jwk = serde_json::from_value(Value::Object(jwk.clone()))
        .map_err(|_| DpopError::Jwk("not a valid JWK"))?;
    jsonwebtoken::DecodingKey::from_jwk(&parsed).map_err(|_| DpopError::Jwk("not a usable key"))
}

/// The header of a proof: `typ`, an allowed `alg`, the key as an embedded `jwk` and no
/// other way to name one, no `crit`.
fn header_rules(
    header: &Map<String, Value>,
) -> Result<(Algorithm, &Map<String, Value>), DpopError> {
    if !str_member(header, "typ").is_some_and(|t| t.eq_ignore_ascii_case(PROOF_TYP)) {
        return Err(DpopError::Typ);
    }
    let alg_name = str_member(header, "alg").ok_or(DpopError::Alg(String::new()))?;
    if !ALGORITHMS.contains(&alg_name) {
        return Err(DpopError::Alg(alg_name.to_string()));
    }
    let alg: Algorithm = alg_name
        .parse()
        .map_err(|_| DpopError::Alg(alg_name.to_string()))?;
    let jwk = match header.get("jwk") {
        Some(Value::Object(j)) => j,
        _ => return Err(DpopError::Jwk("the header has no jwk object")),
    };
    // The key is the jwk; any other way to name one is ambiguous (a `kid` names
    // nothing here and is ignored).
    for name in ["jku", "x5u", "x5c"] {
        if header.contains_key(name) {
            return Err(DpopError::Header(name));
        }
    }
    if header.contains_key("crit") {
        return Err(DpopError::Header("crit"));
    }
    Ok((alg, jwk))
}

impl DpopVerifier {
    pub fn new(cfg: DpopConfig) -> Self {
        Self { cfg }
    }

    /// The nonce to announce in `DPoP-Nonce`, when nonces are required.
    pub fn nonce(&self, now: OffsetDateTime) -> Option<String> {
        self.cfg.nonce.as_ref().map(|k| k.current(now))
    }

    /// Every check of a proof (last, the refusals that do not burn its `jti`): the proven
    /// key, and the `jti` the caller must consume (`OnceKey`, kept until the proof could no longer pass the
    /// `iat` window anyway) before anything it authorizes leaves the broker. The broker
    /// consumes it in the same write as the credential's lease.
    pub fn check_unspent(
        &self,
        proof: &str,
        ctx: ProofContext<'_>,
    ) -> Result<(VerifiedProof, OnceKey), DpopError> {
        let (jkt, jti, iat) = self.check(proof, ctx)?;
        let until = OffsetDateTime::from_unix_timestamp(iat).unwrap_or(ctx.now)
            + self.cfg.max_age
            + self.cfg.leeway
            + Duration::from_secs(1);
        let key = format!("jti:dpop:{jkt}:{jti}");
        Ok((VerifiedProof { jkt }, OnceKey { key, until }))
    }

    /// Every check but the `jti` store: (jkt, jti, iat).
    fn check(
        &self,
        proof: &str,
        ctx: ProofContext<'_>,
    ) -> Result<(String, String, i64), DpopError> {
        if proof.len() > MAX_PROOF_BYTES {
            return Err(DpopError::TooLarge);
        }
        let mut parts = proof.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DpopError::Malformed("a JWS has three segments"));
        };
        let header = object("header", &b64(h64)?)?;
        let claims = object("claims", &b64(p64)?)?;
        b64(s64)?;

        let (alg, jwk) = header_rules(&header)?;
        let key = key_for(alg, jwk)?;
        let jkt = jwk_thumbprint(jwk)?;
        let signed = &proof[..h64.len() + 1 + p64.len()];
        match jsonwebtoken::crypto::verify(s64, signed.as_bytes(), &key, alg) {
            Ok(true) => {}
            _ => return Err(DpopError::Signature),
        }

        let (jti, iat) = self.claim_rules(&claims, ctx)?;
        Ok((jkt, jti, iat))
    }

    /// The claims of a proof whose signature holds: `jti`, `htm`/`htu` for this
    /// request, `iat` in the window, `ath` for the access token, the nonce.
    fn claim_rules(
        &self,
        claims: &Map<String, Value>,
        ctx: ProofContext<'_>,
    ) -> Result<(String, i64), DpopError> {
        let jti = str_member(claims, "jti")
            .filter(|j| {
                !j.is_empty() && j.len() <= MAX_JTI_LEN && j.bytes().all(|b| b.is_ascii_graphic())
            })
            .ok_or(DpopError::Claim("jti"))?;
        let htm = str_member(claims, "htm").ok_or(DpopError::Claim("htm"))?;
        let htu = str_member(claims, "htu").ok_or(DpopError::Claim("htu"))?;
        let iat = time_claim(claims, "iat")?;
        if htm != ctx.method {
            return Err(DpopError::Htm);
        }
        match (normalize_htu(htu), normalize_htu(ctx.url)) {
            (Some(got), Some(want)) if got == want => {}
            _ => return Err(DpopError::Htu),
        }
        let now = ctx.now.unix_timestamp();
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        if iat > now.saturating_add(secs(self.cfg.leeway)) {
            return Err(DpopError::Future);
        }
        if iat < now.saturating_sub(secs(self.cfg.max_age)) {
            return Err(DpopError::Expired);
        }
        if let Some(token) = ctx.access_token {
            let want = access_token_hash(token);
            if str_member(claims, "ath") != Some(want.as_str()) {
                return Err(DpopError::Ath);
            }
        }
        if let Some(k) = &self.cfg.nonce {
            let ok = str_member(claims, "nonce").is_some_and(|n| k.accepts(n, ctx.now));
            if !ok {
                return Err(DpopError::UseNonce);
            }
        }
        Ok((jti.to_string(), iat))
    }
}

/// A DPoP key a client holds (`mayfly dpop`): signs proofs. P-256 (ES256) or Ed25519.
pub struct ProofKey {
    alg: &'static str,
    jwk: Value,
    signer: ProofSigner,
}

enum ProofSigner {
    Es256(aws_lc_rs::signature::EcdsaKeyPair),
    EdDsa(aws_lc_rs::signature::Ed25519KeyPair),
}

/// What a proof is for. (No `Debug`: it may hold an access token.)
#[derive(Clone, Default)]
pub struct ProofRequest {
    pub method: String,
    pub url: String,
    pub access_token: Option<String>,
    pub nonce: Option<String>,
    /// Overrides `iat` (tests of the window); now when `None`.
    pub iat: Option<i64>,
    /// Overrides the random `jti` (tests of replay).
    pub jti: Option<String>,
}

impl ProofKey {
    /// Loads a PKCS#8 PEM key (P-256 or Ed25519).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        use aws_lc_rs::signature::{
            ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
        };
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| e.to_string())?;
        let der = pair.serialize_der();
        if pair.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
                .map_err(|e| e.to_string())?;
            let raw = k.public_key().as_ref().to_vec();
            if raw.len() != 65 {
                return Err("P-256 public key is not an uncompressed point".into());
            }
            let jwk = serde_json::json!({
                "kty": "EC", "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
            });
            Ok(Self {
                alg: "ES256",
                jwk,
                signer: ProofSigner::Es256(k),
            })
        } else if pair.algorithm() == &rcgen::PKCS_ED25519 {
            let k = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| e.to_string())?;
            let jwk = serde_json::json!({
                "kty": "OKP", "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(k.public_key().as_ref()),
            });
            Ok(Self {
                alg: "EdDSA",
                jwk,
                signer: ProofSigner::EdDsa(k),
            })
        } else {
            Err("a DPoP key must be P-256 (ES256) or Ed25519 (EdDSA)".into())
        }
    }

    /// A new key and its PKCS#8 PEM.
    pub fn generate(eddsa: bool) -> Result<(Self, crate::secret::Secret<String>), String> {
        let alg = if eddsa {
            &rcgen::PKCS_ED25519
        } else {
            &rcgen::PKCS_ECDSA_P256_SHA256
        };
        let pair = rcgen::KeyPair::generate_for(alg).map_err(|e| e.to_string())?;
        let pem = crate::secret::Secret::new(pair.serialize_pem());
        Ok((Self::from_pem(pem.expose())?, pem))
    }

    /// The public JWK.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// RFC 7638 thumbprint of the public key (the `cnf.jkt` of tokens bound to it).
    pub fn thumbprint(&self) -> String {
        match &self.jwk {
            Value::Object(m) => jwk_thumbprint(m).unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// A signed proof for `req`.
    pub fn proof(&self, req: &ProofRequest) -> Result<String, String> {
        let header = serde_json::json!({"typ": PROOF_TYP, "alg": self.alg, "jwk": self.jwk});
        let mut claims = serde_json::json!({
            "jti": req.jti.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            "htm": req.method,
            "htu": req.url,
            "iat": req.iat.unwrap_or_else(|| OffsetDateTime::now_utc().unix_timestamp()),
        });
        if let Some(t) = &req.access_token {
            claims["ath"] = Value::String(access_token_hash(t));
        }
        if let Some(n) = &req.nonce {
            claims["nonce"] = Value::String(n.clone());
        }
        let mut out = URL_SAFE_NO_PAD.encode(header.to_string());
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = match &self.signer {
            ProofSigner::Es256(k) => k
                .sign(&aws_lc_rs::rand::SystemRandom::new(), out.as_bytes())
                .map_err(|e| e.to_string())?
                .as_ref()
                .to_vec(),
            ProofSigner::EdDsa(k) => k.sign(out.as_bytes()).as_ref().to_vec(),
        };
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(out)
    }
}

#[cfg(test)]
#[path = "dpop_tests.rs"]
mod tests;
