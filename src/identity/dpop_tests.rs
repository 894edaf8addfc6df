use super::*;
use crate::lease::embedded::EmbeddedStore;

const URL: &str = "https://mayfly.test/v1/token";

struct Fixture {
    _dir: tempfile::TempDir,
    verifier: DpopVerifier,
    store: EmbeddedStore,
    key: ProofKey,
}

impl Fixture {
    /// What the broker does with a proof: every check, then its `jti` consumed in the
    /// store (there, together with the lease).
    async fn verify(&self, proof: &str, c: ProofContext<'_>) -> Result<VerifiedProof, DpopError> {
        use crate::lease::LeaseStore;
        let (verified, once) = self.verifier.check_unspent(proof, c)?;
        match self.store.insert_once(&once.key, once.until).await {
            Ok(true) => Ok(verified),
            Ok(false) => Err(DpopError::Replayed),
            Err(e) => panic!("store: {e}"),
        }
    }
}

fn fixture(cfg: DpopConfig) -> Fixture {
    crate::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
    let (key, _) = ProofKey::generate(false).expect("key");
    Fixture {
        _dir: dir,
        verifier: DpopVerifier::new(cfg),
        store,
        key,
    }
}

fn req() -> ProofRequest {
    ProofRequest {
        method: "POST".into(),
        url: URL.into(),
        ..Default::default()
    }
}

fn ctx(now: OffsetDateTime) -> ProofContext<'static> {
    ProofContext {
        method: "POST",
        url: URL,
        access_token: None,
        now,
    }
}

/// Re-signs nothing: swaps the header or claims of a proof for tests of the checks that
/// come before the signature (the signature no longer matters there).
fn with_header(proof: &str, header: Value) -> String {
    let mut parts: Vec<String> = proof.split('.').map(String::from).collect();
    parts[0] = URL_SAFE_NO_PAD.encode(header.to_string());
    parts.join(".")
}

fn header_of(proof: &str) -> Value {
    let h = proof.split('.').next().expect("header");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).expect("b64")).expect("json")
}

#[tokio::test]
async fn a_valid_proof_yields_its_key_thumbprint_once() {
    let f = fixture(DpopConfig::default());
    let now = OffsetDateTime::now_utc();
    let proof = f.key.proof(&req()).expect("proof");
    let ok = f.verify(&proof, ctx(now)).await.expect("valid");
    assert_eq!(ok.jkt, f.key.thumbprint());
    assert_eq!(f.verify(&proof, ctx(now)).await, Err(DpopError::Replayed));
}

#[tokio::test]
async fn a_proof_for_another_method_or_url_is_refused_and_its_jti_stays_unused() {
    let f = fixture(DpopConfig::default());
    let now = OffsetDateTime::now_utc();
    let proof = f.key.proof(&req()).expect("proof");
    let mut c = ctx(now);
    c.method = "GET";
    assert_eq!(f.verify(&proof, c).await, Err(DpopError::Htm));
    let mut c = ctx(now);
    c.url = "https://mayfly.test/v1/tasks/x/credentials";
    assert_eq!(f.verify(&proof, c).await, Err(DpopError::Htu));
    let mut c = ctx(now);
    c.url = "https://evil.test/v1/token";
    assert_eq!(f.verify(&proof, c).await, Err(DpopError::Htu));
    // Refusals did not burn the jti: the proof still works where it belongs.
    assert!(f.verify(&proof, ctx(now)).await.is_ok());
}

#[tokio::test]
async fn htu_is_compared_after_normalisation_without_query_or_fragment() {
    let f = fixture(DpopConfig::default());
    let now = OffsetDateTime::now_utc();
    for url in [
        "HTTPS://Mayfly.TEST:443/v1/token",
        "https://mayfly.test/v1/./token?x=1",
        "https://mayfly.test/v1/token#frag",
    ] {
        let mut r = req();
        r.url = url.into();
        let proof = f.key.proof(&r).expect("proof");
        assert!(
            f.verify(&proof, ctx(now)).await.is_ok(),
            "{url} is the same URL"
        );
    }
    let mut r = req();
    r.url = "https://mayfly.test:8443/v1/token".into();
    let proof = f.key.proof(&r).expect("proof");
    assert_eq!(f.verify(&proof, ctx(now)).await, Err(DpopError::Htu));
}

#[tokio::test]
async fn proofs_outside_the_iat_window_are_refused() {
    let f = fixture(DpopConfig::default());
    let now = OffsetDateTime::now_utc();
    let mut r = req();
    r.iat = Some(now.unix_timestamp() - 61);
    let old = f.key.proof(&r).expect("proof");
    assert_eq!(f.verify(&old, ctx(now)).await, Err(DpopError::Expired));
    r.iat = Some(now.unix_timestamp() + 30);
    let future = f.key.proof(&r).expect("proof");
    assert_eq!(f.verify(&future, ctx(now)).await, Err(DpopError::Future));
}

#[tokio::test]
async fn the_header_rules_each_have_their_error() {
    let f = fixture(DpopConfig::default());
    let now = OffsetDateTime::now_utc();
    let proof = f.key.proof(&req()).expect("proof");
    let h = header_of(&proof);

    let mut bad = h.clone();
    bad["typ"] = "JWT".into();
    assert_eq!(
        f.verify(&with_header(&proof, bad), ctx(now)).await,
        Err(DpopError::Typ)
    );
    for alg in ["none", "HS256", "ES512"] {
        let mut bad = h.clone();
        bad["alg"] = alg.into();
        assert_eq!(
            f.verify(&with_header(&proof, bad), ctx(now)).await,
            Err(DpopError::Alg(alg.into()))
        );
    }
    let mut bad = h.clone();
    bad["jwk"]["d"] = "c2VjcmV0".into();
    assert_eq!(
        f.verify(&with_header(&proof, bad), ctx(now)).await,
        Err(DpopError::PrivateKey("d".into()))
    );
    let mut bad = h.clone();
    bad["alg"] = "EdDSA".into();
    assert!(matches!(
        f.verify(&with_header(&proof, bad), ctx(now)).await,
        Err(DpopError::Jwk(_))
    ));
    let mut bad = h.clone();
    bad.as_object_mut().expect("obj").remove("jwk");
    assert!(matches!(
        f.verify(&with_header(&proof, bad), ctx(now)).await,
        Err(DpopError::Jwk(_))
    ));
    let mut bad = h.clone();
    bad["jku"] = "https://evil.test/jwks".into();
    assert_eq!(
        f.verify(&with_header(&proof, bad), ctx(now)).await,
        Err(DpopError::Header("jku"))
    );
    // Another key's jwk: the signature no longer verifies.
    let (other, _) = ProofKey::generate(false).expect("key");
    let mut bad = h.clone();
    bad["jwk"] = other.jwk().clone();
    assert_eq!(
        f.verify(&with_header(&proof, bad), ctx(now)).await,
        Err(DpopError::Signature)
    );
    assert_eq!(
        f.verify("a.b", ctx(now)).await,
        Err(DpopError::Malformed("a JWS has three segments"))
    );
}

#[tokio::test]
async fn ath_must_hash_the_presented_access_token() {
    let f = fixture(DpopConfig::default());
    let now = OffsetDateTime::now_utc();
    let mut c = ctx(now);
    c.access_token = Some("the-token");
    let without = f.key.proof(&req()).expect("proof");
    assert_eq!(f.verify(&without, c).await, Err(DpopError::Ath));
    let mut r = req();
    r.access_token = Some("another-token".into());
    let wrong = f.key.proof(&r).expect("proof");
    assert_eq!(f.verify(&wrong, c).await, Err(DpopError::Ath));
    r.access_token = Some("the-token".into());
    let right = f.key.proof(&r).expect("proof");
    assert!(f.verify(&right, c).await.is_ok());
}

#[tokio::test]
async fn a_required_nonce_must_be_one_the_server_issued() {
    let key = NonceKey::new(&[7u8; 32], Duration::from_secs(60)).expect("nonce key");
    let f = fixture(DpopConfig {
        nonce: Some(key),
        ..Default::default()
    });
    let now = OffsetDateTime::now_utc();
    let none = f.key.proof(&req()).expect("proof");
    assert_eq!(f.verify(&none, ctx(now)).await, Err(DpopError::UseNonce));
    let mut r = req();
    r.nonce = Some("forged".into());
    let forged = f.key.proof(&r).expect("proof");
    assert_eq!(f.verify(&forged, ctx(now)).await, Err(DpopError::UseNonce));
    let other = NonceKey::new(&[8u8; 32], Duration::from_secs(60)).expect("key");
    r.nonce = Some(other.current(now));
    let foreign = f.key.proof(&r).expect("proof");
    assert_eq!(f.verify(&foreign, ctx(now)).await, Err(DpopError::UseNonce));
    r.nonce = f.verifier.nonce(now);
    let good = f.key.proof(&r).expect("proof");
    assert!(f.verify(&good, ctx(now)).await.is_ok());
    // Two windows later the nonce is stale.
    r.jti = None;
    let stale = f.key.proof(&r).expect("proof");
    let later = now + Duration::from_secs(121);
    let mut c = ctx(later);
    c.now = later;
    assert!(matches!(
        f.verify(&stale, c).await,
        Err(DpopError::UseNonce | DpopError::Expired)
    ));
}

#[test]
fn the_rfc_7638_example_thumbprint_is_reproduced() {
    // RFC 7638 §3.1.
    let jwk = serde_json::json!({
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    });
    let Value::Object(m) = jwk else {
        panic!("object")
    };
    assert_eq!(
        jwk_thumbprint(&m).expect("thumbprint"),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
}

#[tokio::test]
async fn an_eddsa_key_proves_too() {
    let f = fixture(DpopConfig::default());
    let (key, pem) = ProofKey::generate(true).expect("key");
    let again = ProofKey::from_pem(pem.expose()).expect("load");
    assert_eq!(key.thumbprint(), again.thumbprint());
    let proof = key.proof(&req()).expect("proof");
    let ok = f
        .verify(&proof, ctx(OffsetDateTime::now_utc()))
        .await
        .expect("valid");
    assert_eq!(ok.jkt, key.thumbprint());
}
