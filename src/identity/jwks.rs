//! Verification keys for bearer tokens: a JWKS from a file (a SPIFFE JWT bundle or any
//! JWKS), from a URL (a JWKS endpoint or a SPIFFE bundle endpoint), or found through
//! OIDC discovery. One cache per issuer / trust domain:
//!
//! - keys are reused for `ttl`, then refreshed; a failed refresh keeps serving the keys
//!   already held (an issuer outage must not lock every CI job out);
//! - an unknown `kid` triggers at most one refetch per `cooldown`, so a flood of tokens
//!   with random `kid`s cannot turn Mayfly into an amplifier against the issuer;
//! - at most `max_keys` keys are kept, and a JWKS document above `MAX_JWKS_BYTES` is
//!   refused;
//! - keys pushed by the SPIFFE Workload API replace the set as they arrive and are never
//!   fetched on demand;
//! - keys only ever come from these configured sources — never from a token's
//!   `jku`/`x5u`/`jwk`/`x5c` headers;
//! - no lock is held across a fetch: one fetch runs at a time, and while it runs every
//!   verification goes on with the keys already held (only a lookup that has no usable
//!   key yet — the first load, an unknown `kid` — waits for it).

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::strict_json;

/// Largest JWKS / discovery document accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Where a key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySourceSpec {
    /// A JWKS (or SPIFFE bundle) file, re-read when its `ttl` lapses.
    File(PathBuf),
    /// A JWKS URL (or SPIFFE bundle endpoint; web-PKI authenticated).
    Url(String),
    /// `{issuer}/.well-known/openid-configuration` → `jwks_uri`.
    Discovery { issuer: String },
    /// Pushed by the SPIFFE Workload API stream (`KeyCache::replace_keys`); never fetched.
    Pushed,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub ttl: Duration,
    pub cooldown: Duration,
    pub max_keys: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("cannot fetch keys: {0}")]
    Fetch(String),
    #[error("key set is invalid: {0}")]
    Invalid(String),
}

/// One usable verification key.
#[derive(Clone)]
pub struct VerificationKey {
    pub kid: Option<String>,
    /// The `alg` the JWK pins, if any.
    pub alg: Option<KeyAlgorithm>,
    pub key: DecodingKey,
}

/// What a key lookup found.
pub enum Lookup {
    Found(VerificationKey),
    /// No key with this `kid` (after a refetch, if the cooldown allowed one).
    UnknownKid,
    /// The token named no `kid` and the set holds more than one key.
    Ambiguous,
    /// No key set could ever be loaded.
    Unavailable(KeysError),
}

struct State {
    keys: Option<Arc<Vec<VerificationKey>>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    jwks_uri: Option<String>,
    fetches: u64,
}

/// A cached key set.
pub struct KeyCache {
    source: KeySourceSpec,
    settings: CacheSettings,
    /// Only `jwt-svid` keys of a SPIFFE bundle (and keys without `use`) are taken.
    spiffe_bundle: bool,
    http: reqwest::Client,
    /// Held only for short, synchronous reads and updates, never across an await.
    state: std::sync::Mutex<State>,
    /// Held by the one fetch in flight.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("source", &self.source)
            .finish()
    }
}

/// Parses a JWKS document into verification keys.
pub fn parse_jwks(
    bytes: &[u8],
    spiffe_bundle: bool,
    max_keys: usize,
) -> Result<Vec<VerificationKey>, KeysError> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(KeysError::Invalid(format!(
            "document exceeds {MAX_JWKS_BYTES} bytes"
        )));
    }
    let doc = strict_json::parse(bytes).map_err(|e| KeysError::Invalid(format!("{e:?}")))?;
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| KeysError::Invalid("no \"keys\" array".into()))?;
    let mut out = Vec::new();
    for raw in keys {
        if spiffe_bundle
            && raw
                .get("use")
                .and_then(|u| u.as_str())
                .is_some_and(|u| u != "jwt-svid")
        {
            continue; // x509-svid roots of the same bundle
        }
        let mut raw = raw.clone();
        if spiffe_bundle && let Some(obj) = raw.as_object_mut() {
            // "jwt-svid" is not a registered `use`; it has been filtered on above.
            obj.remove("use");
        }
        // A key Mayfly cannot use (an unsupported kty or curve) is skipped, not fatal:
        // issuers publish keys for other consumers too.
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        if out.len() == max_keys {
            tracing::warn!(
                max_keys,
                "key set holds more keys than allowed; extra keys ignored"
            );
            break;
        }
        out.push(VerificationKey {
            kid: jwk.common.key_id.clone(),
            alg: jwk.common.key_algorithm,
            key,
        });
    }
    if out.is_empty() {
        return Err(KeysError::Invalid("no usable signing key".into()));
    }
    Ok(out)
}

/// Why a bounded GET failed.
pub(crate) enum FetchError {
    /// The body exceeds the limit (announced or actually sent).
    TooLarge,
    Http(String),
}

/// GET `url` and read at most `limit` bytes of a 2xx body: a hostile server cannot make
/// Mayfly buffer more, with or without a `Content-Length`.
pub(crate) async fn get_limited(
    http: &reqwest::Client,
    url: &str,
    limit: usize,
) -> Result<Vec<u8>, FetchError> {
    let fetch = |e: reqwest::Error| FetchError::Http(crate::net::error_chain(&e));
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(fetch)?
        .error_for_status()
        .map_err(fetch)?;
    crate::net::read_limited(resp, limit)
        .await
        .map_err(|e| match e {
            crate::net::LimitedRead::TooLarge => FetchError::TooLarge,
            crate::net::LimitedRead::Http(e) => fetch(e),
        })
}

fn pick(keys: &[VerificationKey], kid: Option<&str>) -> Option<Lookup> {
    match kid {
        Some(k) => keys
            .iter()
            .find(|v| v.kid.as_deref() == Some(k))
            .map(|v| Lookup::Found(v.clone())),
        None if keys.len() == 1 => keys.first().map(|v| Lookup::Found(v.clone())),
        None => Some(Lookup::Ambiguous),
    }
}

impl KeyCache {
    pub fn new(
        source: KeySourceSpec,
        settings: CacheSettings,
        spiffe_bundle: bool,
        http: reqwest::Client,
    ) -> Self {
        Self {
            source,
            settings,
            spiffe_bundle,
            http,
            state: std::sync::Mutex::new(State {
                keys: None,
                fetched_at: None,
                last_attempt: None,
                jwks_uri: None,
                fetches: 0,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the small state half-updated in a
        // way that weakens a check: keys are replaced whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times the source was read (tests and metrics).
    pub async fn fetch_count(&self) -> u64 {
        self.state().fetches
    }

    async fn get_bytes(&self, url: &str) -> Result<Vec<u8>, KeysError> {
        get_limited(&self.http, url, MAX_JWKS_BYTES)
            .await
            .map_err(|e| match e {
                FetchError::TooLarge => KeysError::Invalid(format!("{url} is too large")),
                FetchError::Http(e) => KeysError::Fetch(e),
            })
    }

    /// Puts a key set received from the Workload API in force.
    pub async fn replace_keys(&self, keys: Vec<VerificationKey>) {
        let mut st = self.state();
        st.keys = Some(Arc::new(keys));
        st.fetched_at = Some(Instant::now());
        st.fetches += 1;
    }

    /// Drops every key (the Workload API no longer lists the trust domain): tokens are
    /// refused with `KeysUnavailable` until a new set arrives. Returns whether any key
    /// was held.
    pub async fn clear_keys(&self) -> bool {
        let mut st = self.state();
        st.fetched_at = None;
        st.keys.take().is_some()
    }

    /// Reads the source. Called with `fetching` held and `state` not held.
    async fn fetch(&self) -> Result<Vec<VerificationKey>, KeysError> {
        let jwks_uri = {
            let mut st = self.state();
            st.fetches += 1;
            st.last_attempt = Some(Instant::now());
            st.jwks_uri.clone()
        };
        metrics::counter!("mayfly_jwks_fetches_total").increment(1);
        let bytes = match &self.source {
            KeySourceSpec::File(p) => tokio::fs::read(p)
                .await
                .map_err(|e| KeysError::Fetch(format!("{}: {e}", p.display())))?,
            KeySourceSpec::Url(u) => self.get_bytes(u).await?,
            KeySourceSpec::Pushed => {
                return Err(KeysError::Fetch(
                    "no JWT bundle received from the SPIFFE Workload API".into(),
                ));
            }
            KeySourceSpec::Discovery { issuer } => {
                let uri = match jwks_uri {
                    Some(u) => u,
                    None => {
                        let url = format!("{issuer}/.well-known/openid-configuration");
                        let doc = strict_json::parse(&self.get_bytes(&url).await?)
                            .map_err(|e| KeysError::Invalid(format!("discovery: {e:?}")))?;
                        if doc.get("issuer").and_then(|i| i.as_str()) != Some(issuer.as_str()) {
                            return Err(KeysError::Invalid(
                                "discovery document names another issuer".into(),
                            ));
                        }
                        let uri = doc
                            .get("jwks_uri")
                            .and_then(|u| u.as_str())
                            .ok_or_else(|| KeysError::Invalid("discovery: no jwks_uri".into()))?
                            .to_string();
                        self.state().jwks_uri = Some(uri.clone());
                        uri
                    }
                };
                self.get_bytes(&uri).await?
            }
        };
        parse_jwks(&bytes, self.spiffe_bundle, self.settings.max_keys)
    }

    /// Fetches and puts the result in force. Called with `fetching` held.
    async fn refresh(&self) -> Result<(), KeysError> {
        match self.fetch().await {
            Ok(keys) => {
                let mut st = self.state();
                st.keys = Some(Arc::new(keys));
                st.fetched_at = Some(Instant::now());
                Ok(())
            }
            Err(e) => {
                tracing::warn!(source = ?self.source, error = %e, "key refresh failed; serving cached keys");
                Err(e)
            }
        }
    }

    fn cooled(&self, st: &State, now: Instant) -> bool {
        st.last_attempt
            .is_none_or(|t| now.duration_since(t) >= self.settings.cooldown)
    }

    /// The key for `kid`, refreshing as the cache rules allow.
    pub async fn lookup(&self, kid: Option<&str>) -> Lookup {
        if self.source == KeySourceSpec::Pushed {
            let st = self.state();
            return match &st.keys {
                Some(keys) => pick(keys, kid).unwrap_or(Lookup::UnknownKid),
                None => Lookup::Unavailable(KeysError::Fetch(
                    "no JWT bundle received from the SPIFFE Workload API".into(),
                )),
            };
        }
        let (keys, due) = {
            let st = self.state();
            let now = Instant::now();
            let stale = st
                .fetched_at
                .is_none_or(|t| now.duration_since(t) >= self.settings.ttl);
            (
                st.keys.clone(),
                stale && (st.keys.is_none() || self.cooled(&st, now)),
            )
        };
        let keys = match keys {
            // Stale but usable: refresh only if no fetch is in flight, and in any case
            // answer with the keys held (a slow issuer delays nobody).
            Some(keys) => {
                if due && let Ok(_fetching) = self.fetching.try_lock() {
                    let _ = self.refresh().await;
                    self.state().keys.clone().unwrap_or(keys)
                } else {
                    keys
                }
            }
            // Nothing to verify with yet: wait for the fetch in flight, or make one.
            None => {
                let _fetching = self.fetching.lock().await;
                let held = self.state().keys.clone();
                match held {
                    Some(k) => k,
                    None => {
                        if let Err(e) = self.refresh().await {
                            return Lookup::Unavailable(e);
                        }
                        match self.state().keys.clone() {
                            Some(k) => k,
                            None => {
                                return Lookup::Unavailable(KeysError::Fetch(
                                    "no key set loaded yet".into(),
                                ));
                            }
                        }
                    }
                }
            }
        };
        if let Some(found) = pick(&keys, kid) {
            return found;
        }
        // Unknown kid: the issuer may have rotated. Wait for a fetch in flight (it may
        // bring the key), else refetch at most once per cooldown.
        let _fetching = self.fetching.lock().await;
        let (held, cooled) = {
            let st = self.state();
            (st.keys.clone(), self.cooled(&st, Instant::now()))
        };
        if let Some(keys) = &held
            && let Some(found) = pick(keys, kid)
        {
            return found;
        }
        if cooled
            && self.refresh().await.is_ok()
            && let Some(keys) = self.state().keys.clone()
            && let Some(found) = pick(&keys, kid)
        {
            return found;
        }
        Lookup::UnknownKid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_jwk(kid: &str) -> serde_json::Value {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let enc =
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("enc");
        let mut jwk = serde_json::to_value(
            Jwk::from_encoding_key(&enc, jsonwebtoken::Algorithm::ES256).expect("jwk"),
        )
        .expect("json");
        jwk["kid"] = kid.into();
        jwk
    }

    #[test]
    fn a_spiffe_bundle_yields_only_its_jwt_svid_keys() {
        crate::install_crypto_provider();
        let mut x509 = ec_jwk("x");
        x509["use"] = "x509-svid".into();
        let mut jwt = ec_jwk("j");
        jwt["use"] = "jwt-svid".into();
        let doc = serde_json::json!({"keys": [x509, jwt], "spiffe_sequence": 1});
        let keys = parse_jwks(doc.to_string().as_bytes(), true, 8).expect("keys");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("j"));
    }

    #[test]
    fn a_key_set_is_bounded() {
        crate::install_crypto_provider();
        let doc = serde_json::json!({"keys": [ec_jwk("a"), ec_jwk("b"), ec_jwk("c")]});
        let keys = parse_jwks(doc.to_string().as_bytes(), false, 2).expect("keys");
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn a_key_set_with_duplicate_members_is_refused() {
        let text = br#"{"keys":[],"keys":[]}"#;
        assert!(matches!(
            parse_jwks(text, false, 2),
            Err(KeysError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn unknown_kids_refetch_at_most_once_per_cooldown() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("jwks.json");
        let doc = serde_json::json!({"keys": [ec_jwk("k1")]});
        std::fs::write(&path, doc.to_string()).expect("write");
        let cache = KeyCache::new(
            KeySourceSpec::File(path),
            CacheSettings {
                ttl: Duration::from_secs(3600),
                cooldown: Duration::from_secs(3600),
                max_keys: 8,
            },
            false,
            reqwest::Client::new(),
        );
        assert!(matches!(cache.lookup(Some("k1")).await, Lookup::Found(_)));
        assert_eq!(cache.fetch_count().await, 1);
        for i in 0..100 {
            assert!(matches!(
                cache.lookup(Some(&format!("random-{i}"))).await,
                Lookup::UnknownKid
            ));
        }
        // The first load started the cooldown: no refetch for any of the 100.
        assert_eq!(cache.fetch_count().await, 1);
    }

    #[tokio::test]
    async fn cached_keys_are_served_when_the_source_disappears() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("jwks.json");
        std::fs::write(
            &path,
            serde_json::json!({"keys": [ec_jwk("k1")]}).to_string(),
        )
        .expect("write");
        let cache = KeyCache::new(
            KeySourceSpec::File(path.clone()),
            CacheSettings {
                ttl: Duration::ZERO,
                cooldown: Duration::ZERO,
                max_keys: 8,
            },
            false,
            reqwest::Client::new(),
        );
        assert!(matches!(cache.lookup(Some("k1")).await, Lookup::Found(_)));
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(cache.lookup(Some("k1")).await, Lookup::Found(_)));
        assert!(cache.fetch_count().await >= 2);
    }

    /// An HTTP server that answers the first request with `jwks` and then accepts
    /// connections without ever answering (a stalled issuer).
    async fn stalling_issuer(jwks: String) -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            let mut first = true;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if first {
                    first = false;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{jwks}",
                        jwks.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                } else {
                    held.push(s);
                }
            }
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_stalled_refresh_does_not_hold_up_lookups_with_cached_keys() {
        crate::install_crypto_provider();
        let doc = serde_json::json!({"keys": [ec_jwk("k1")]}).to_string();
        let (url, server) = stalling_issuer(doc).await;
        let cache = Arc::new(KeyCache::new(
            KeySourceSpec::Url(url),
            CacheSettings {
                ttl: Duration::ZERO,
                cooldown: Duration::ZERO,
                max_keys: 8,
            },
            false,
            reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        ));
        assert!(matches!(cache.lookup(Some("k1")).await, Lookup::Found(_)));
        // The keys are stale at once (ttl 0): the next lookup starts a refresh that the
        // issuer never answers.
        let stuck = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.lookup(Some("k1")).await })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while cache.fetch_count().await < 2 {
            assert!(Instant::now() < deadline, "the refresh never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // While it hangs, verifications go on with the cached key, promptly.
        for _ in 0..20 {
            let found = tokio::time::timeout(Duration::from_secs(1), cache.lookup(Some("k1")))
                .await
                .expect("not blocked behind the stalled fetch");
            assert!(matches!(found, Lookup::Found(_)));
        }
        assert_eq!(cache.fetch_count().await, 2, "one fetch at a time");
        stuck.abort();
        server.abort();
    }
}
