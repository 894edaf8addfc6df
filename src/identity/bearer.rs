//! Bearer tokens: JWT-SVIDs and OIDC workload tokens (GitHub Actions, GitLab CI,
//! Kubernetes projected service-account tokens, any OIDC issuer).
//!
//! The checks run in this order, each with its own `VerifyError` (RFC 8725):
//! size (before any parsing) → three base64url segments → header and claims are JSON
//! objects without duplicate members → `alg` is not `none`, not HS*, → no
//! `jku`/`x5u`/`jwk`/`x5c` header (keys come only from configuration) → `crit` is
//! absent (Mayfly understands no extension) → route: a configured `iss` is an OIDC
//! issuer; otherwise a SPIFFE `sub` names the JWT-SVID trust domain → `alg` on the
//! issuer's allow-list → `typ` if the issuer defines one → key by `kid` from the
//! issuer's key cache → signature → `exp` (required), `nbf`, `iat` with leeway →
//! `aud` → `sub` → single-use `jti` present. A single-use token's `jti` is not consumed
//! here: the verified caller carries it (`SingleUse`) and the broker consumes it in the
//! shared store only after the request passed authorization, so neither a refused token
//! nor a well-signed token of an unauthorized subject ever takes room in the store.
//! JOSE library: jsonwebtoken 11 on aws-lc-rs (the crate's one crypto stack); it is
//! used for key import and signature verification only — every claim rule is here.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::KeyAlgorithm;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

use super::jwks::{KeyCache, Lookup, VerificationKey};
use super::strict_json::{self, StrictJsonError};
use super::{
    AuthMethod, OidcSubject, Posture, Principal, SingleUse, SpiffeId, VerifiedCaller, VerifyError,
};

/// Claims copied into the posture (as strings) when present, so Cedar can read them.
/// GitHub Actions, GitLab CI, and Kubernetes (`kubernetes.io` is flattened to
/// `namespace`, `service_account`, `pod`).
pub const POSTURE_CLAIMS: &[&str] = &[
    "repository",
    "repository_id",
    "repository_owner",
    "repository_owner_id",
    "ref",
    "ref_type",
    "sha",
    "workflow",
    "workflow_ref",
    "job_workflow_ref",
    "environment",
    "event_name",
    "actor",
    "run_id",
    "run_number",
    "run_attempt",
    "runner_environment",
    "project_path",
    "namespace_path",
    "pipeline_id",
    "job_id",
    // GitLab's immutable ids: policies should match these, not the renamable paths.
    "project_id",
    "namespace_id",
    "namespace",
    "service_account",
    "pod",
];

/// The only algorithms a verifier may be configured with (asymmetric).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "none" => Err("\"none\" is never accepted".into()),
        n if n.starts_with("HS") => Err(format!("{n} is symmetric; never accepted")),
        n => n
            .parse::<Algorithm>()
            .map_err(|_| format!("unknown algorithm {n:?}")),
    }
}

/// Rules for one trusted token source.
#[derive(Debug, Clone)]
pub struct IssuerRules {
    pub audiences: Vec<String>,
    pub allow_multiple_audiences: bool,
    pub algorithms: Vec<Algorithm>,
    /// Accepted `typ` values (compared case-insensitively); `None`: not checked.
    pub typ: Option<Vec<String>>,
    pub leeway: Duration,
    /// `jti` required and accepted once.
    pub single_use: bool,
    /// Claims naming one CI job (token exchange); empty: no exchange for this issuer.
    pub job_claims: Vec<String>,
    /// Upper bound on the life of an implicit task made by token exchange.
    pub max_exchange_ttl: Duration,
}

/// A trusted issuer: its rules and its keys.
#[derive(Debug)]
pub struct TrustedIssuer {
    pub rules: IssuerRules,
    pub keys: Arc<KeyCache>,
}

/// Bearer tokens already verified, by SHA-256 of the token, so a workload presenting the
/// same JWT-SVID or OIDC token on every request pays for parsing and signature checking
/// once rather than per request (ES256 verification is ~165 µs).
///
/// Sound because a hit re-checks everything that can change: the token's `exp` (with the
/// issuer's leeway) against the current time; that the issuer's key for the token's `kid`
/// is still found; and that the key set has not been re-read since the token was
/// verified (`KeyCache::fetch_count`), so a rotated or removed key is never trusted
/// from memory. Everything else a verification decides (header rules, algorithm, `aud`,
/// `nbf`/`iat` — which only become truer with time — the principal and posture claims)
/// is a function of the token bytes and the configuration alone. Single-use tokens are
/// never cached: each presentation must reach the replay check. The request's source
/// address is filled in per request, never cached.
#[derive(Debug)]
struct VerifiedCache {
    entries: Mutex<HashMap<[u8; 32], CachedToken>>,
    capacity: usize,
}

#[derive(Debug, Clone)]
struct CachedToken {
    token: VerifiedToken,
    /// `exp` plus leeway: the last second this token is accepted.
    valid_until: i64,
    kid: Option<String>,
    /// The key cache's read count before the verifying lookup.
    fetches: u64,
    svid: bool,
    issuer: String,
}

/// Verified tokens remembered at most (each entry is one token's caller, ~1 KiB).
pub const VERIFIED_CACHE_SIZE: usize = 10_000;

/// What a verified bearer token proved, before it becomes a `VerifiedCaller`.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub caller: VerifiedCaller,
    /// The token's `exp`.
    pub expires_at: OffsetDateTime,
    /// The values of the issuer's `job_claims`, in order (empty if not configured or
    /// any is missing).
    pub job: Option<Vec<String>>,
    pub max_exchange_ttl: Duration,
}

/// Verifies bearer tokens against configured JWT-SVID trust domains and OIDC issuers.
#[derive(Debug)]
pub struct BearerVerifier {
    svid: HashMap<String, TrustedIssuer>,
    oidc: HashMap<String, TrustedIssuer>,
    max_token_bytes: usize,
    verified: VerifiedCache,
}

impl Default for BearerVerifier {
    fn default() -> Self {
        Self::new(8 * 1024)
    }
}

fn b64(seg: &str) -> Result<Vec<u8>, VerifyError> {
    if seg.is_empty() {
        return Err(VerifyError::TokenMalformed("empty segment"));
    }
    URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|_| VerifyError::TokenMalformed("segment is not base64url"))
}

fn json_object(part: &'static str, bytes: &[u8]) -> Result<Map<String, Value>, VerifyError> {
    match strict_json::parse(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(VerifyError::JsonMalformed {
            part,
            reason: "not a JSON object".into(),
        }),
        Err(StrictJsonError::Duplicate(name)) => Err(VerifyError::DuplicateMember { part, name }),
        Err(StrictJsonError::Malformed(reason)) => Err(VerifyError::JsonMalformed { part, reason }),
    }
}

fn str_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(VerifyError::ClaimType(name)),
    }
}

fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        // NumericDate may be fractional; whole seconds are what matters here.
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.floor() as i64))
            .map(Some)
            .ok_or(VerifyError::ClaimType(name)),
        Some(_) => Err(VerifyError::ClaimType(name)),
    }
}

fn claim_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn posture_claims(claims: &Map<String, Value>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in POSTURE_CLAIMS {
        if let Some(v) = claims.get(*name).and_then(claim_string) {
            out.insert((*name).to_string(), v);
        }
    }
    // Kubernetes projected tokens nest their facts.
    if let Some(k8s) = claims.get("kubernetes.io") {
        let mut put = |name: &str, v: Option<&Value>| {
            if let Some(s) = v.and_then(claim_string) {
                out.insert(name.to_string(), s);
            }
        };
        put("namespace", k8s.get("namespace"));
        put("service_account", k8s.pointer("/serviceaccount/name"));
        put("pod", k8s.pointer("/pod/name"));
    }
    out
}

enum Route<'a> {
    Svid(&'a TrustedIssuer, SpiffeId),
    Oidc(&'a TrustedIssuer, String),
}

fn with_source(t: &VerifiedToken, source: Option<IpAddr>) -> VerifiedToken {
    let mut posture = t.caller.posture().clone();
    posture.source = source;
    VerifiedToken {
        caller: VerifiedCaller::new(t.caller.principal().clone(), posture)
            .with_single_use(t.caller.single_use().cloned()),
        ..t.clone()
    }
}

impl BearerVerifier {
    pub fn new(max_token_bytes: usize) -> Self {
        Self {
            svid: HashMap::new(),
            oidc: HashMap::new(),
            max_token_bytes,
            verified: VerifiedCache {
                entries: Mutex::new(HashMap::new()),
                capacity: VERIFIED_CACHE_SIZE,
            },
        }
    }

    /// Sets how many verified tokens are remembered; 0 verifies every presentation anew.
    pub fn with_verified_cache(mut self, capacity: usize) -> Self {
        self.verified.capacity = capacity;
        self
    }

    /// A verified token from the cache, if it is still valid now (see `VerifiedCache`).
    async fn cached(
        &self,
        digest: &[u8; 32],
        source: Option<IpAddr>,
        now_s: i64,
    ) -> Option<VerifiedToken> {
        let hit = {
            let entries = self
                .verified
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            entries.get(digest).cloned()
        }?;
        let issuer = if hit.svid {
            self.svid.get(&hit.issuer)
        } else {
            self.oidc.get(&hit.issuer)
        };
        let fresh = match issuer {
            Some(i) if hit.valid_until > now_s => {
                matches!(i.keys.lookup(hit.kid.as_deref()).await, Lookup::Found(_))
                    && i.keys.fetch_count().await == hit.fetches
            }
            _ => false,
        };
        if !fresh {
            // Verify again from scratch: that answers with the precise error, if any.
            self.verified
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(digest);
            return None;
        }
        Some(with_source(&hit.token, source))
    }

    fn remember(&self, digest: [u8; 32], entry: CachedToken, now_s: i64) {
        let mut entries = self
            .verified
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.verified.capacity {
            entries.retain(|_, e| e.valid_until > now_s);
            if entries.len() >= self.verified.capacity {
                // Full of live tokens: verify the newcomer every time instead.
                return;
            }
        }
        entries.insert(digest, entry);
    }

    pub fn add_trust_domain(&mut self, trust_domain: &str, issuer: TrustedIssuer) {
        self.svid.insert(trust_domain.to_string(), issuer);
    }

    pub fn add_oidc_issuer(&mut self, iss: &str, issuer: TrustedIssuer) {
        self.oidc.insert(iss.to_string(), issuer);
    }

    pub fn is_empty(&self) -> bool {
        self.svid.is_empty() && self.oidc.is_empty()
    }

    /// The key cache of a JWT-SVID trust domain (the Workload API pushes keys into it).
    pub fn svid_keys(&self, trust_domain: &str) -> Option<&Arc<KeyCache>> {
        self.svid.get(trust_domain).map(|i| &i.keys)
    }

    /// The key cache of an OIDC issuer (tests, metrics).
    pub fn oidc_keys(&self, iss: &str) -> Option<&Arc<KeyCache>> {
        self.oidc.get(iss).map(|i| &i.keys)
    }

    /// Verifies `token` at `now`; the verified caller carries `source` in its posture.
    /// The stages, in order: the JWS and its header, the issuer (by `iss` or the SVID
    /// trust domain) and its header rules, the key, the signature, then the claims.
    pub async fn verify(
        &self,
        token: &str,
        source: Option<IpAddr>,
        now: OffsetDateTime,
    ) -> Result<VerifiedToken, VerifyError> {
        if token.len() > self.max_token_bytes {
            return Err(VerifyError::TokenTooLarge(self.max_token_bytes));
        }
        let digest: Option<[u8; 32]> = (self.verified.capacity > 0).then(|| {
            use sha2::Digest;
            sha2::Sha256::digest(token.as_bytes()).into()
        });
        if let Some(d) = &digest
            && let Some(hit) = self.cached(d, source, now.unix_timestamp()).await
        {
            return Ok(hit);
        }
        let jws = Jws::parse(token)?;
        let alg_name = header_alg(&jws.header)?;
        let route = self.route(&jws.claims)?;
        let issuer = match &route {
            Route::Svid(i, _) | Route::Oidc(i, _) => *i,
        };
        let rules = &issuer.rules;
        let (alg, kid) = issuer_header_rules(&jws.header, alg_name, rules, &route)?;
        let fetches = issuer.keys.fetch_count().await;
        let key = lookup_key(issuer, kid).await?;
        check_signature(&jws, &key, alg)?;
        let checked = check_claims(&jws.claims, rules, route, now)?;
        let (valid_until, svid, issuer_name) = (
            checked.valid_until,
            checked.svid,
            checked.issuer_name.clone(),
        );
        let verified = verified_token(token, checked, rules, source)?;
        if let Some(d) = digest
            && !rules.single_use
        {
            let entry = CachedToken {
                token: with_source(&verified, None),
                valid_until,
                kid: kid.map(str::to_string),
                fetches,
                svid,
                issuer: issuer_name,
            };
            self.remember(d, entry, now.unix_timestamp());
        }
        Ok(verified)
    }

    fn route(&self, claims: &Map<String, Value>) -> Result<Route<'_>, VerifyError> {
        let iss = str_claim(claims, "iss")?;
        if let Some(iss) = iss
            && let Some(i) = self.oidc.get(iss)
        {
            return Ok(Route::Oidc(i, iss.to_string()));
        }
        let sub = str_claim(claims, "sub")?;
        match sub {
            Some(s) if s.starts_with("spiffe://") => {
                let id = SpiffeId::parse(s)?;
                match self.svid.get(id.trust_domain()) {
                    Some(i) => Ok(Route::Svid(i, id)),
                    None => Err(VerifyError::UnknownTrustDomain(id.trust_domain().into())),
                }
            }
            _ => match iss {
                Some(i) => Err(VerifyError::UnknownIssuer(i.to_string())),
                None => Err(VerifyError::MissingClaim("iss")),
            },
        }
    }
}

/// A compact JWS split into its segments, header and claims decoded as JSON objects
/// without duplicate members.
struct Jws<'a> {
    /// `header.claims`, the bytes the signature covers.
    signed: &'a str,
    signature: &'a str,
    header: Map<String, Value>,
    claims: Map<String, Value>,
}

impl<'a> Jws<'a> {
    fn parse(token: &'a str) -> Result<Self, VerifyError> {
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::TokenMalformed("a JWS has three segments"));
        };
        let header = json_object("header", &b64(h64)?)?;
        let claims = json_object("claims", &b64(p64)?)?;
        b64(s64)?;
        Ok(Self {
            signed: &token[..h64.len() + 1 + p64.len()],
            signature: s64,
            header,
            claims,
        })
    }
}

/// The header rules every issuer shares: a string `alg` that is neither `none` nor
/// symmetric, no key named by the token itself, no `crit`. Returns the `alg` text.
fn header_alg(header: &Map<String, Value>) -> Result<&str, VerifyError> {
    let alg_name = match header.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Err(VerifyError::TokenMalformed("header has no string alg")),
    };
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(VerifyError::AlgNone);
    }
    if alg_name.starts_with("HS") {
        return Err(VerifyError::AlgSymmetric(alg_name.to_string()));
    }
    for name in ["jku", "x5u", "jwk", "x5c"] {
        if header.contains_key(name) {
            return Err(VerifyError::EmbeddedKeyHeader(name));
        }
    }
    if let Some(crit) = header.get("crit") {
        return Err(VerifyError::UnsupportedCrit(crit.to_string()));
    }
    Ok(alg_name)
}

/// The header rules of the chosen issuer: `alg` among its algorithms, `typ` among its
/// types, and a `kid` (required for a JWT-SVID, §3.1). Returns the algorithm and kid.
fn issuer_header_rules<'h>(
    header: &'h Map<String, Value>,
    alg_name: &str,
    rules: &IssuerRules,
    route: &Route<'_>,
) -> Result<(Algorithm, Option<&'h str>), VerifyError> {
    let alg = alg_name
        .parse::<Algorithm>()
        .ok()
        .filter(|a| rules.algorithms.contains(a))
        .ok_or_else(|| VerifyError::AlgNotAllowed(alg_name.to_string()))?;
    if let Some(allowed) = &rules.typ {
        let typ = str_claim(header, "typ").map_err(|_| VerifyError::TypMismatch(String::new()))?;
        let ok = typ.is_some_and(|t| allowed.iter().any(|a| a.eq_ignore_ascii_case(t)));
        if !ok {
            return Err(VerifyError::TypMismatch(
                typ.unwrap_or_default().to_string(),
            ));
        }
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(VerifyError::TokenMalformed("kid is not a string")),
    };
    if kid.is_none() && matches!(route, Route::Svid(..)) {
        return Err(VerifyError::MissingKid);
    }
    Ok((alg, kid))
}

/// The issuer's key for `kid` (fetched when unknown, within the cache's limits).
async fn lookup_key(
    issuer: &TrustedIssuer,
    kid: Option<&str>,
) -> Result<VerificationKey, VerifyError> {
    match issuer.keys.lookup(kid).await {
        Lookup::Found(k) => Ok(k),
        Lookup::UnknownKid => Err(VerifyError::UnknownKid(kid.unwrap_or("").into())),
        Lookup::Ambiguous => Err(VerifyError::MissingKid),
        Lookup::Unavailable(e) => Err(VerifyError::KeysUnavailable(e.to_string())),
    }
}

/// The signature, under a key whose own `alg` (when the JWK pins one) is the token's.
fn check_signature(
    jws: &Jws<'_>,
    key: &VerificationKey,
    alg: Algorithm,
) -> Result<(), VerifyError> {
    if key
        .alg
        .is_some_and(|pinned| pinned != KeyAlgorithm::from(alg))
    {
        return Err(VerifyError::KeyAlgMismatch);
    }
    match jsonwebtoken::crypto::verify(jws.signature, jws.signed.as_bytes(), &key.key, alg) {
        Ok(true) => Ok(()),
        Ok(false) => Err(VerifyError::BadSignature),
        Err(e) => Err(match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature
            | jsonwebtoken::errors::ErrorKind::Base64(_) => VerifyError::BadSignature,
            _ => VerifyError::KeyAlgMismatch,
        }),
    }
}

/// What the claims of a signed token establish.
struct CheckedClaims {
    principal: Principal,
    method: AuthMethod,
    iss: Option<String>,
    exp: i64,
    /// `exp` plus leeway: until when the token (and its cache entry) holds.
    valid_until: i64,
    single_use: Option<Arc<SingleUse>>,
    job: Option<Vec<String>>,
    posture_claims: BTreeMap<String, String>,
    /// The cache's issuer key: SVID trust domain or OIDC `iss`.
    svid: bool,
    issuer_name: String,
}

/// The time claims (leeway absorbs clock skew only), the audience, the principal, the
/// single-use note and the job claims.
fn check_claims(
    claims: &Map<String, Value>,
    rules: &IssuerRules,
    route: Route<'_>,
    now: OffsetDateTime,
) -> Result<CheckedClaims, VerifyError> {
    let leeway = i64::try_from(rules.leeway.as_secs()).unwrap_or(i64::MAX);
    let exp = time_rules(claims, leeway, now.unix_timestamp())?;
    audience_rules(claims, rules)?;
    let iss = str_claim(claims, "iss")?.map(str::to_string);
    let (principal, method, svid, issuer_name) = match route {
        Route::Svid(_, id) => {
            let td = id.trust_domain().to_string();
            (Principal::Spiffe(id), AuthMethod::JwtSvid, true, td)
        }
        Route::Oidc(_, iss) => {
            let sub = str_claim(claims, "sub")?.ok_or(VerifyError::MissingClaim("sub"))?;
            let p = OidcSubject::new(&iss, sub).map_err(|_| VerifyError::ClaimType("sub"))?;
            (Principal::Oidc(p), AuthMethod::Oidc, false, iss)
        }
    };
    let single_use = if rules.single_use {
        let jti = str_claim(claims, "jti")?.ok_or(VerifyError::MissingClaim("jti"))?;
        let scope = iss.as_deref().unwrap_or(principal.trust_domain());
        let until = OffsetDateTime::from_unix_timestamp(exp.saturating_add(leeway))
            .map_err(|_| VerifyError::ClaimType("exp"))?;
        Some(SingleUse::new(format!("jti:bearer:{scope}:{jti}"), until))
    } else {
        None
    };
    let job = if rules.job_claims.is_empty() {
        None
    } else {
        rules
            .job_claims
            .iter()
            .map(|c| claims.get(c.as_str()).and_then(claim_string))
            .collect::<Option<Vec<_>>>()
    };
    Ok(CheckedClaims {
        principal,
        method,
        iss,
        exp,
        valid_until: exp.saturating_add(leeway),
        single_use,
        job,
        posture_claims: posture_claims(claims),
        svid,
        issuer_name,
    })
}

/// `exp` (required), `nbf` and `iat` against `now_s` with `leeway`; returns `exp`.
fn time_rules(claims: &Map<String, Value>, leeway: i64, now_s: i64) -> Result<i64, VerifyError> {
    let exp = time_claim(claims, "exp")?.ok_or(VerifyError::MissingClaim("exp"))?;
    if exp.saturating_add(leeway) <= now_s {
        return Err(VerifyError::TokenExpired);
    }
    if let Some(nbf) = time_claim(claims, "nbf")?
        && nbf > now_s.saturating_add(leeway)
    {
        return Err(VerifyError::TokenNotYetValid);
    }
    if let Some(iat) = time_claim(claims, "iat")?
        && iat > now_s.saturating_add(leeway)
    {
        return Err(VerifyError::IssuedInFuture);
    }
    Ok(exp)
}

/// `aud`: one of the issuer's audiences, and only one unless the issuer allows more.
fn audience_rules(claims: &Map<String, Value>, rules: &IssuerRules) -> Result<(), VerifyError> {
    let auds: Vec<&str> = match claims.get("aud") {
        None => return Err(VerifyError::MissingClaim("aud")),
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().ok_or(VerifyError::ClaimType("aud")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(VerifyError::ClaimType("aud")),
    };
    if !auds.iter().any(|a| rules.audiences.iter().any(|m| m == a)) {
        return Err(VerifyError::AudienceMismatch);
    }
    if auds.len() > 1 && !rules.allow_multiple_audiences {
        return Err(VerifyError::MultipleAudiences(auds.len()));
    }
    Ok(())
}

/// The verified caller and what the exchange may grant it.
fn verified_token(
    token: &str,
    c: CheckedClaims,
    rules: &IssuerRules,
    source: Option<IpAddr>,
) -> Result<VerifiedToken, VerifyError> {
    let expires_at =
        OffsetDateTime::from_unix_timestamp(c.exp).map_err(|_| VerifyError::ClaimType("exp"))?;
    let posture = Posture {
        method: c.method,
        trust_domain: c.principal.trust_domain().to_string(),
        source,
        credential_not_after: expires_at,
        credential_fingerprint: crate::secret::fingerprint(token.as_bytes()),
        issuer: c.iss,
        claims: c.posture_claims,
    };
    Ok(VerifiedToken {
        caller: VerifiedCaller::new(c.principal, posture).with_single_use(c.single_use),
        expires_at,
        job: c.job,
        max_exchange_ttl: rules.max_exchange_ttl,
    })
}

#[cfg(test)]
#[path = "bearer_tests.rs"]
mod tests;
