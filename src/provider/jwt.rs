//! The `jwt` provider: Mayfly-signed access tokens (RFC 9068 shape, `typ: at+jwt`) for
//! tools and MCP servers. ES256 or EdDSA, never RSA or HMAC. `jti` is the lease id, so
//! introspection (RFC 7662) answers from the lease: revoked or expired → `active:false`.
//!
//! How it dies: at `exp`, or for every resource server that introspects, the moment its
//! lease is revoked. A resource server that only checks the signature offline keeps
//! accepting a revoked token until `exp`: keep these TTLs short.

use async_trait::async_trait;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::Path;

use super::{CredentialProvider, MintRequest, Minted, ProviderError, Revocation};
use crate::lease::Lease;
use crate::secret::{Secret, fingerprint};
use crate::task::ProviderKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SigningAlg {
    ES256,
    EdDSA,
}

/// Claims of a Mayfly access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    /// The target, or every RFC 8707 `resource` the token was minted for.
    pub aud: Audience,
    pub scope: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    pub task_id: String,
    pub purpose: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    /// RFC 8693 §4.1 actor chain of a delegated task: `act.sub` is the current holder
    /// (the caller the token was minted for), and each earlier holder is nested one level
    /// deeper. `sub` is then the principal at the root of the delegation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Value>,
    /// RFC 7800 confirmation: the key the holder must prove possession of (RFC 8705
    /// `x5t#S256` of its client certificate, or RFC 9449 `jkt` of its DPoP key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// The `aud` claim: a string for one audience, an array for several (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience(Vec<String>);

impl Audience {
    pub fn one(aud: impl Into<String>) -> Self {
        Self(vec![aud.into()])
    }
    /// Several audiences (an empty list is not an audience: `None`).
    pub fn many(auds: Vec<String>) -> Option<Self> {
        (!auds.is_empty()).then_some(Self(auds))
    }
    pub fn values(&self) -> &[String] {
        &self.0
    }
    pub fn contains(&self, aud: &str) -> bool {
        self.0.iter().any(|a| a == aud)
    }
}

impl Serialize for Audience {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            all => all.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d)? {
            OneOrMany::One(a) => Ok(Self(vec![a])),
            OneOrMany::Many(v) => {
                Self::many(v).ok_or_else(|| serde::de::Error::custom("empty aud array"))
            }
        }
    }
}

/// RFC 7800 `cnf`: exactly one confirmation method per token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Confirmation {
    /// RFC 8705 §3.1: base64url SHA-256 of the client certificate's DER.
    #[serde(rename = "x5t#S256")]
    X5tS256(String),
    /// RFC 9449 §6.1: RFC 7638 SHA-256 thumbprint of the DPoP public key.
    #[serde(rename = "jkt")]
    Jkt(String),
}

/// Whether tokens for a target are sender-constrained (`binding` in `[providers.jwt]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// Never bound: a plain bearer token even for a caller with a key (for resource
    /// servers that cannot check `cnf`).
    Off,
    /// Bound whenever the caller has a key: every X.509-SVID caller (its certificate),
    /// and every caller that sent a DPoP proof. A bearer caller without a proof gets a
    /// bearer token.
    Optional,
    /// Always bound: a caller with neither a client certificate nor a DPoP proof is
    /// refused (`binding_required`).
    Required,
}

impl Binding {
    pub fn as_str(self) -> &'static str {
        match self {
            Binding::Off => "off",
            Binding::Optional => "optional",
            Binding::Required => "required",
        }
    }
}

/// The binding mode of every target: a default and per-target overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRules {
    pub default: Binding,
    pub targets: std::collections::HashMap<String, Binding>,
}

impl Default for BindingRules {
    fn default() -> Self {
        Self {
            default: Binding::Optional,
            targets: Default::default(),
        }
    }
}

impl BindingRules {
    pub fn for_target(&self, target: &str) -> Binding {
        self.targets.get(target).copied().unwrap_or(self.default)
    }

    /// The mode of a token for all of `audiences`: `off` if any audience cannot check
    /// a binding, else `required` if any demands it. `off` beside `required` has no
    /// answer that serves both resource servers.
    pub fn for_audiences(&self, audiences: &[String]) -> Result<Binding, ProviderError> {
        let modes: Vec<Binding> = audiences.iter().map(|a| self.for_target(a)).collect();
        let off = modes.contains(&Binding::Off);
        let required = modes.contains(&Binding::Required);
        match (off, required) {
            (true, true) => Err(ProviderError::InvalidGrant(
                "these resources disagree: one requires bound tokens, another accepts none".into(),
            )),
            (true, false) => Ok(Binding::Off),
            (false, true) => Ok(Binding::Required),
            (false, false) => Ok(Binding::Optional),
        }
    }

    /// The confirmation for a token under `mode`: the DPoP key if the request proved
    /// one (the client asked for DPoP explicitly), else the client certificate.
    pub fn confirm(
        mode: Binding,
        cert_thumbprint: Option<&str>,
        dpop_jkt: Option<&str>,
    ) -> Result<Option<Confirmation>, ProviderError> {
        if mode == Binding::Off {
            return Ok(None);
        }
        let cnf = dpop_jkt
            .map(|j| Confirmation::Jkt(j.to_string()))
            .or_else(|| cert_thumbprint.map(|t| Confirmation::X5tS256(t.to_string())));
        if cnf.is_none() && mode == Binding::Required {
            return Err(ProviderError::BindingRequired);
        }
        Ok(cnf)
    }
}

impl AccessClaims {
    /// The principal holding the token: the current actor of a delegated token
    /// (`act.sub`), else `sub`.
    pub fn holder(&self) -> Option<&str> {
        match &self.act {
            Some(act) => act.get("sub").and_then(Value::as_str),
            None => Some(self.sub.as_str()),
        }
    }
}

/// RFC 8693 §4.1 `sub` and `act` for a token held by `holder` under a task delegated
/// by `delegators` (owners of the tasks above, nearest first): `sub` is the root of
/// the delegation (the last delegator), `act` the holder with the earlier holders
/// nested inside, nearest first. Without delegation: `sub` is the holder, no `act`.
pub fn delegation_claims(
    holder: &crate::identity::Principal,
    delegators: &[crate::identity::Principal],
) -> (String, Option<Value>) {
    let Some((root, between)) = delegators.split_last() else {
        return (holder.to_string(), None);
    };
    let actors = std::iter::once(holder).chain(between);
    let act = actors
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .fold(None, |inner, p| {
            let mut v = json!({"sub": p.as_str()});
            if let Some(i) = inner {
                v["act"] = i;
            }
            Some(v)
        });
    (root.to_string(), act)
}

/// The private key, parsed once. (jsonwebtoken's `EncodingKey` re-parses and re-checks
/// its PKCS#8 document on every signature — a point multiplication per token.)
enum Signer {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// One signing key with its public JWK.
pub struct SigningKey {
    alg: SigningAlg,
    kid: String,
    signer: Signer,
    decoding: DecodingKey,
    jwk: Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn key_err(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Key(e.to_string())
}

impl SigningKey {
    /// Generates a fresh key.
    pub fn generate(alg: SigningAlg) -> Result<(Self, Secret<String>), ProviderError> {
        let pair = match alg {
            SigningAlg::ES256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            SigningAlg::EdDSA => KeyPair::generate_for(&PKCS_ED25519),
        }
        .map_err(key_err)?;
        let pem = Secret::new(pair.serialize_pem());
        Ok((Self::from_pair(&pair)?, pem))
    }

    /// Loads a PKCS#8 PEM key (P-256 or Ed25519); the algorithm follows the key.
    pub fn from_pem(pem: &str) -> Result<Self, ProviderError> {
        let pair = KeyPair::from_pem(pem).map_err(key_err)?;
        Self::from_pair(&pair)
    }

    /// Loads `path`, or creates it (mode 0600) with a new key if `generate` and it is absent.
    pub fn load_or_generate(
        path: &Path,
        generate: Option<SigningAlg>,
    ) -> Result<Self, ProviderError> {
        match std::fs::read_to_string(path) {
            Ok(pem) => Self::from_pem(&pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let alg = generate.ok_or_else(|| {
                    key_err(format!("signing key {} does not exist", path.display()))
                })?;
                let (key, pem) = Self::generate(alg)?;
                crate::secret::write_private_file(path, pem.expose().as_bytes())
                    .map_err(|e| key_err(format!("{}: {e}", path.display())))?;
                Ok(key)
            }
            Err(e) => Err(key_err(format!("{}: {e}", path.display()))),
        }
    }

    fn from_pair(pair: &KeyPair) -> Result<Self, ProviderError> {
        let raw = pair.public_key_raw();
        let (alg, jwk_core) = if pair.algorithm() == &PKCS_ECDSA_P256_SHA256 {
            if raw.len() != 65 || raw[0] != 4 {
                return Err(key_err("P-256 public key is not an uncompressed point"));
            }
            let (x, y) = (
                URL_SAFE_NO_PAD.encode(&raw[1..33]),
                URL_SAFE_NO_PAD.encode(&raw[33..]),
            );
            (
                SigningAlg::ES256,
                json!({"crv": "P-256", "kty": "EC", "x": x, "y": y}),
            )
        } else if pair.algorithm() == &PKCS_ED25519 {
            (
                SigningAlg::EdDSA,
                json!({"crv": "Ed25519", "kty": "OKP", "x": URL_SAFE_NO_PAD.encode(raw)}),
            )
        } else {
            return Err(key_err(
                "signing key must be P-256 (ES256) or Ed25519 (EdDSA)",
            ));
        };
        // RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order,
        // which is how serde_json serialises this map.
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(jwk_core.to_string().as_bytes()));
        let pkcs8 = pair.serialize_der();
        let (signer, decoding) = match alg {
            SigningAlg::ES256 => (
                Signer::Es256(
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
                        .map_err(key_err)?,
                ),
                DecodingKey::from_ec_components(
                    jwk_core["x"].as_str().unwrap_or_default(),
                    jwk_core["y"].as_str().unwrap_or_default(),
                )
                .map_err(key_err)?,
            ),
            SigningAlg::EdDSA => (
                Signer::EdDsa(Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(key_err)?),
                DecodingKey::from_ed_components(jwk_core["x"].as_str().unwrap_or_default())
                    .map_err(key_err)?,
            ),
        };
        let mut jwk = jwk_core;
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(Self::jose_alg(alg));
        Ok(Self {
            alg,
            kid,
            signer,
            decoding,
            jwk,
        })
    }

    fn jose_alg(alg: SigningAlg) -> &'static str {
        match alg {
            SigningAlg::ES256 => "ES256",
            SigningAlg::EdDSA => "EdDSA",
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self.alg {
            SigningAlg::ES256 => Algorithm::ES256,
            SigningAlg::EdDSA => Algorithm::EdDSA,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK (with `kid`, `use`, `alg`).
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// The base64url JWS header for `typ`, signed by this key.
    fn header_b64(&self, typ: &str) -> String {
        let header = json!({"alg": Self::jose_alg(self.alg), "kid": self.kid, "typ": typ});
        URL_SAFE_NO_PAD.encode(header.to_string())
    }

    /// A compact JWS: `header_b64` . base64url(claims) . signature.
    fn sign_with_header<C: Serialize>(
        &self,
        header_b64: &str,
        claims: &C,
    ) -> Result<String, ProviderError> {
        let mint_err = |e: &dyn std::fmt::Display| ProviderError::Mint(e.to_string());
        let payload = serde_json::to_vec(claims).map_err(|e| mint_err(&e))?;
        let mut out = String::with_capacity(header_b64.len() + payload.len() * 4 / 3 + 100);
        out.push_str(header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig = match &self.signer {
            Signer::Es256(k) => k
                .sign(&aws_lc_rs::rand::SystemRandom::new(), out.as_bytes())
                .map_err(|e| mint_err(&e))?,
            Signer::EdDsa(k) => k.sign(out.as_bytes()),
        };
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }

    /// Signs arbitrary claims (dev tokens: `mayfly dev token`).
    pub fn sign_json(&self, claims: &Value, typ: &str) -> Result<String, ProviderError> {
        self.sign_with_header(&self.header_b64(typ), claims)
    }
}

/// Why a presented access token is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a well-formed JWS")]
    Malformed,
    #[error("token was not signed by a current Mayfly key")]
    UnknownKey,
    #[error("token signature or claims are invalid: {0}")]
    Invalid(String),
}

/// The keys an issuer holds: it signs with `current` and accepts tokens of any of them
/// (`next` is published ahead of a rotation, `previous` until its tokens expire).
struct KeySet {
    current: std::sync::Arc<SigningKey>,
    /// Every key, current first, then next and previous when present (distinct kids).
    all: Vec<std::sync::Arc<SigningKey>>,
    /// The access-token header of `current`, encoded once.
    header_b64: String,
    /// SHA-256 of each file as last read (`current`, `next`, `previous`).
    stamp: [Option<[u8; 32]>; 3],
}

impl KeySet {
    fn of(current: SigningKey, others: Vec<SigningKey>, stamp: [Option<[u8; 32]>; 3]) -> Self {
        let current = std::sync::Arc::new(current);
        let mut all = vec![current.clone()];
        for k in others {
            if all.iter().all(|a| a.kid != k.kid) {
                all.push(std::sync::Arc::new(k));
            }
        }
        Self {
            header_b64: current.header_b64("at+jwt"),
            current,
            all,
            stamp,
        }
    }
}

/// A directory holding the key set as `current.pem` (required), `next.pem` and
/// `previous.pem` (optional), re-read when a file changes (checked every `interval`).
#[derive(Debug, Clone)]
pub struct KeyDir {
    pub dir: std::path::PathBuf,
    pub interval: std::time::Duration,
}

pub const KEY_FILES: [&str; 3] = ["current.pem", "next.pem", "previous.pem"];

impl KeyDir {
    /// Reads the three files: their contents' digests and, if any differs from `seen`,
    /// the new key set.
    fn read(&self, seen: Option<&[Option<[u8; 32]>; 3]>) -> Result<Option<KeySet>, ProviderError> {
        let mut texts: [Option<String>; 3] = [None, None, None];
        let mut stamp = [None; 3];
        for (i, name) in KEY_FILES.iter().enumerate() {
            let path = self.dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(t) => {
                    stamp[i] = Some(Sha256::digest(t.as_bytes()).into());
                    texts[i] = Some(t);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && i > 0 => {}
                Err(e) => return Err(key_err(format!("{}: {e}", path.display()))),
            }
        }
        if seen == Some(&stamp) {
            return Ok(None);
        }
        let [current, next, previous] = texts;
        let current = SigningKey::from_pem(
            current
                .as_deref()
                .ok_or_else(|| key_err("current.pem is required"))?,
        )?;
        let mut others = Vec::new();
        for t in [next, previous].into_iter().flatten() {
            others.push(SigningKey::from_pem(&t)?);
        }
        Ok(Some(KeySet::of(current, others, stamp)))
    }
}

/// Signs and checks Mayfly access tokens with a key set that may change while running.
pub struct JwtIssuer {
    issuer: String,
    keys: std::sync::RwLock<std::sync::Arc<KeySet>>,
    dir: Option<KeyDir>,
    /// When the directory was last looked at.
    checked: std::sync::Mutex<std::time::Instant>,
}

impl std::fmt::Debug for JwtIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtIssuer")
            .field("issuer", &self.issuer)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Upper bound on a token we will even try to parse at introspection.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

impl JwtIssuer {
    /// One fixed key.
    pub fn new(issuer: String, key: SigningKey) -> Self {
        Self {
            issuer,
            keys: std::sync::RwLock::new(std::sync::Arc::new(KeySet::of(
                key,
                Vec::new(),
                [None; 3],
            ))),
            dir: None,
            checked: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// The key set of a directory (see [`KeyDir`]), re-read when its files change.
    pub fn from_dir(issuer: String, dir: KeyDir) -> Result<Self, ProviderError> {
        let set = dir
            .read(None)?
            .ok_or_else(|| key_err("key directory unreadable"))?;
        Ok(Self {
            issuer,
            keys: std::sync::RwLock::new(std::sync::Arc::new(set)),
            dir: Some(dir),
            checked: std::sync::Mutex::new(std::time::Instant::now()),
        })
    }

    /// The key set now, re-reading the directory if `interval` has passed. A change that
    /// does not parse keeps the set in use (logged and counted): a half-written Secret
    /// never leaves a replica without keys.
    fn keys(&self) -> std::sync::Arc<KeySet> {
        if let Some(dir) = &self.dir {
            let due = {
                let mut at = self.checked.lock().unwrap_or_else(|p| p.into_inner());
                if at.elapsed() >= dir.interval {
                    *at = std::time::Instant::now();
                    true
                } else {
                    false
                }
            };
            if due {
                self.reload(dir);
            }
        }
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn reload(&self, dir: &KeyDir) {
        let seen = self.keys.read().unwrap_or_else(|p| p.into_inner()).stamp;
        match dir.read(Some(&seen)) {
            Ok(None) => {}
            Ok(Some(set)) => {
                let kids: Vec<&str> = set.all.iter().map(|k| k.kid()).collect();
                tracing::info!(current = set.current.kid(), keys = ?kids, "jwt signing keys reloaded");
                metrics::counter!("mayfly_jwt_key_reloads_total").increment(1);
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(set);
            }
            Err(e) => {
                metrics::counter!("mayfly_jwt_key_reload_errors_total").increment(1);
                tracing::error!(error = %e, "jwt signing keys changed but cannot be loaded; keeping the current set");
            }
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Every published key: current, next, previous.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self.keys().all.iter().map(|k| k.jwk.clone()).collect();
        json!({ "keys": keys })
    }

    /// The kid tokens are signed with now.
    pub fn current_kid(&self) -> String {
        self.keys().current.kid.clone()
    }

    pub fn algorithms(&self) -> Vec<&'static str> {
        let mut algs: Vec<&'static str> = self
            .keys()
            .all
            .iter()
            .map(|k| SigningKey::jose_alg(k.alg))
            .collect();
        algs.sort_unstable();
        algs.dedup();
        algs
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, ProviderError> {
        let set = self.keys();
        set.current.sign_with_header(&set.header_b64, claims)
    }

    /// Checks signature, algorithm, key id and issuer. Expiry is *not* checked here:
    /// introspection answers `active:false` for an expired token rather than an error.
    /// Any key of the set verifies (a token signed by another replica before or after a
    /// rotation step).
    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let set = self.keys();
        let key = set
            .all
            .iter()
            .find(|k| header.kid.as_deref() == Some(k.kid.as_str()) && header.alg == k.algorithm())
            .ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(key.algorithm());
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims = ["iss", "sub", "aud", "exp", "jti"]
            .into_iter()
            .map(String::from)
            .collect();
        v.set_issuer(&[&self.issuer]);
        jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }
}

/// The provider built around a [`JwtIssuer`].
pub struct JwtProvider {
    issuer: std::sync::Arc<JwtIssuer>,
    bindings: BindingRules,
}

impl JwtProvider {
    pub fn new(issuer: std::sync::Arc<JwtIssuer>) -> Self {
        Self::with_bindings(issuer, BindingRules::default())
    }
    pub fn with_bindings(issuer: std::sync::Arc<JwtIssuer>, bindings: BindingRules) -> Self {
        Self { issuer, bindings }
    }
}

#[async_trait]
impl CredentialProvider for JwtProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Jwt
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        let lease = req.lease;
        let mut audiences = vec![lease.target.clone()];
        audiences.extend(req.audience.iter().filter(|a| **a != lease.target).cloned());
        let mode = self.bindings.for_audiences(&audiences)?;
        let cnf = BindingRules::confirm(mode, req.caller.cert_thumbprint(), req.dpop_jkt)?;
        let token_type = match cnf {
            Some(Confirmation::Jkt(_)) => "DPoP",
            _ => "Bearer",
        };
        let (sub, act) = delegation_claims(req.caller.principal(), req.delegation);
        let claims = AccessClaims {
            iss: self.issuer.issuer.clone(),
            sub,
            aud: Audience(audiences),
            scope: lease.actions.iter().cloned().collect::<Vec<_>>().join(" "),
            exp: lease.expires_at.unix_timestamp(),
            iat: lease.issued_at.unix_timestamp(),
            nbf: lease.issued_at.unix_timestamp(),
            jti: lease.id.to_string(),
            task_id: req.task.id.to_string(),
            purpose: req.task.purpose.clone(),
            resources: lease.resources.iter().cloned().collect(),
            act,
            cnf,
        };
        let token = self.issuer.sign(&claims)?;
        Ok(Minted {
            fingerprint: fingerprint(token.as_bytes()),
            credential: Secret::new(json!({"access_token": token, "token_type": token_type})),
            handle: None,
        })
    }

    fn mints_in_process(&self) -> bool {
        true
    }

    async fn revoke(&self, _lease: &Lease) -> Result<Revocation, ProviderError> {
        // The lease state is the revocation: introspection reads it.
        Ok(Revocation::Revoked)
    }

    async fn ready(&self) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(iss: &str) -> AccessClaims {
        AccessClaims {
            iss: iss.into(),
            sub: "spiffe://t/a".into(),
            aud: Audience::one("https://api"),
            scope: "read".into(),
            exp: 2_000_000_000,
            iat: 1_000_000_000,
            nbf: 1_000_000_000,
            jti: "lse_x".into(),
            task_id: "tsk_x".into(),
            purpose: "p".into(),
            resources: vec![],
            act: None,
            cnf: None,
        }
    }

    #[test]
    fn es256_and_eddsa_tokens_verify_with_their_own_key_only() {
        crate::install_crypto_provider();
        for alg in [SigningAlg::ES256, SigningAlg::EdDSA] {
            let (key, _) = SigningKey::generate(alg).expect("key");
            let issuer = JwtIssuer::new("https://mayfly".into(), key);
            let token = issuer.sign(&claims("https://mayfly")).expect("sign");
            assert_eq!(
                issuer.verify(&token).expect("verify"),
                claims("https://mayfly")
            );
            let (other, _) = SigningKey::generate(alg).expect("key");
            let other = JwtIssuer::new("https://mayfly".into(), other);
            assert_eq!(other.verify(&token), Err(TokenError::UnknownKey));
        }
    }

    #[test]
    fn a_token_with_a_foreign_issuer_is_invalid() {
        crate::install_crypto_provider();
        let (key, _) = SigningKey::generate(SigningAlg::ES256).expect("key");
        let issuer = JwtIssuer::new("https://mayfly".into(), key);
        let token = issuer.sign(&claims("https://evil")).expect("sign");
        assert!(matches!(issuer.verify(&token), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn a_tampered_payload_fails_the_signature() {
        crate::install_crypto_provider();
        let (key, _) = SigningKey::generate(SigningAlg::ES256).expect("key");
        let issuer = JwtIssuer::new("https://mayfly".into(), key);
        let token = issuer.sign(&claims("https://mayfly")).expect("sign");
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut c = claims("https://mayfly");
        c.scope = "admin".into();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).expect("json"));
        assert!(matches!(
            issuer.verify(&parts.join(".")),
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(issuer.verify("not-a-jwt"), Err(TokenError::Malformed));
    }

    /// RFC 8693 §4.1: `sub` is the root of the delegation, `act` the current holder,
    /// earlier holders nested deeper. Root `a` delegated to `b`, `b` to `c`.
    #[test]
    fn sub_is_the_delegation_root_and_act_the_current_holder() {
        let p = |s: &str| crate::identity::Principal::parse(s).expect("id");
        let (a, b, c) = (p("spiffe://t/a"), p("spiffe://t/b"), p("spiffe://t/c"));
        assert_eq!(delegation_claims(&a, &[]), ("spiffe://t/a".into(), None));
        assert_eq!(
            delegation_claims(&b, std::slice::from_ref(&a)),
            ("spiffe://t/a".into(), Some(json!({"sub": "spiffe://t/b"})))
        );
        let (sub, act) = delegation_claims(&c, &[b.clone(), a.clone()]);
        assert_eq!(sub, "spiffe://t/a");
        assert_eq!(
            act,
            Some(json!({"sub": "spiffe://t/c", "act": {"sub": "spiffe://t/b"}}))
        );
        let mut token = claims("https://mayfly");
        token.sub = sub;
        token.act = act;
        assert_eq!(token.holder(), Some("spiffe://t/c"));
        assert_eq!(claims("x").holder(), Some("spiffe://t/a"));
    }

    #[test]
    fn binding_modes_decide_the_confirmation() {
        use Binding::*;
        let x5t = Some("cert-thumb");
        let jkt = Some("key-thumb");
        let confirm = BindingRules::confirm;
        assert_eq!(confirm(Off, x5t, jkt).expect("off"), None);
        assert_eq!(
            confirm(Optional, x5t, None).expect("optional"),
            Some(Confirmation::X5tS256("cert-thumb".into()))
        );
        // The client asked for DPoP: it wins over the certificate.
        assert_eq!(
            confirm(Optional, x5t, jkt).expect("optional"),
            Some(Confirmation::Jkt("key-thumb".into()))
        );
        assert_eq!(confirm(Optional, None, None).expect("optional"), None);
        assert!(matches!(
            confirm(Required, None, None),
            Err(ProviderError::BindingRequired)
        ));
        assert_eq!(
            confirm(Required, x5t, None).expect("required"),
            Some(Confirmation::X5tS256("cert-thumb".into()))
        );
    }

    #[test]
    fn several_audiences_take_the_strictest_binding_and_off_with_required_is_refused() {
        let rules = BindingRules {
            default: Binding::Optional,
            targets: [
                ("https://strict".to_string(), Binding::Required),
                ("https://legacy".to_string(), Binding::Off),
            ]
            .into_iter()
            .collect(),
        };
        let aud = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rules
                .for_audiences(&aud(&["https://a", "https://strict"]))
                .expect("mode"),
            Binding::Required
        );
        assert_eq!(
            rules
                .for_audiences(&aud(&["https://a", "https://legacy"]))
                .expect("mode"),
            Binding::Off
        );
        assert!(matches!(
            rules.for_audiences(&aud(&["https://strict", "https://legacy"])),
            Err(ProviderError::InvalidGrant(_))
        ));
    }

    #[test]
    fn cnf_and_audiences_serialise_as_the_rfcs_say() {
        let mut c = claims("https://mayfly");
        c.cnf = Some(Confirmation::X5tS256("abc".into()));
        let v = serde_json::to_value(&c).expect("json");
        assert_eq!(v["cnf"], json!({"x5t#S256": "abc"}));
        assert_eq!(v["aud"], json!("https://api"));
        c.cnf = Some(Confirmation::Jkt("def".into()));
        c.aud = Audience::many(vec!["https://a".into(), "https://b".into()]).expect("aud");
        let v = serde_json::to_value(&c).expect("json");
        assert_eq!(v["cnf"], json!({"jkt": "def"}));
        assert_eq!(v["aud"], json!(["https://a", "https://b"]));
        let back: AccessClaims = serde_json::from_value(v).expect("back");
        assert_eq!(back, c);
        assert_eq!(Audience::many(vec![]), None);
    }

    #[test]
    fn a_key_directory_rotates_without_restart_and_verifies_every_published_key() {
        crate::install_crypto_provider();
        let tmp = tempfile::tempdir().expect("tmp");
        let write = |name: &str, pem: &Secret<String>| {
            std::fs::write(tmp.path().join(name), pem.expose()).expect("write");
        };
        let (k1, p1) = SigningKey::generate(SigningAlg::ES256).expect("key");
        let (k2, p2) = SigningKey::generate(SigningAlg::EdDSA).expect("key");
        write("current.pem", &p1);
        let dir = KeyDir {
            dir: tmp.path().to_path_buf(),
            interval: std::time::Duration::ZERO,
        };
        let issuer = JwtIssuer::from_dir("https://mayfly".into(), dir).expect("dir");
        let old = issuer.sign(&claims("https://mayfly")).expect("sign");
        assert_eq!(issuer.current_kid(), k1.kid());
        // Step 1: the next key is published, still signing with the current one.
        write("next.pem", &p2);
        let kids: Vec<String> = issuer.jwks()["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().expect("kid").to_string())
            .collect();
        assert_eq!(kids, vec![k1.kid().to_string(), k2.kid().to_string()]);
        assert_eq!(issuer.current_kid(), k1.kid());
        // Step 2: next becomes current, current becomes previous.
        write("current.pem", &p2);
        write("previous.pem", &p1);
        std::fs::remove_file(tmp.path().join("next.pem")).expect("rm");
        let new = issuer.sign(&claims("https://mayfly")).expect("sign");
        assert_eq!(issuer.current_kid(), k2.kid());
        assert!(
            issuer.verify(&old).is_ok(),
            "tokens of the previous key still verify"
        );
        assert!(issuer.verify(&new).is_ok());
        assert_eq!(issuer.algorithms(), vec!["ES256", "EdDSA"]);
        // A broken file keeps the set in use.
        std::fs::write(tmp.path().join("current.pem"), "garbage").expect("write");
        assert_eq!(issuer.current_kid(), k2.kid());
        // Step 3: previous removed once its tokens expired.
        write("current.pem", &p2);
        std::fs::remove_file(tmp.path().join("previous.pem")).expect("rm");
        assert_eq!(issuer.verify(&old), Err(TokenError::UnknownKey));
        assert!(issuer.verify(&new).is_ok());
    }

    #[test]
    fn a_key_written_to_pem_loads_back_with_the_same_kid() {
        crate::install_crypto_provider();
        let (key, pem) = SigningKey::generate(SigningAlg::ES256).expect("key");
        let again = SigningKey::from_pem(pem.expose()).expect("load");
        assert_eq!(key.kid(), again.kid());
    }
}
