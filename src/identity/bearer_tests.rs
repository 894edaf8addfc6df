//! The attack suite: every hostile token is refused with its own `VerifyError`; valid
//! tokens of each issuer kind are accepted. Keys and tokens are minted here.
#![allow(clippy::expect_used, reason = "tests: set-up failures abort loudly")]

use super::*;
use crate::identity::jwks::{CacheSettings, KeySourceSpec};
use jsonwebtoken::EncodingKey;
use jsonwebtoken::jwk::Jwk;
use serde_json::json;

const OIDC: &str = "https://ci.example";
const ONCE: &str = "https://once.example";
const AUD: &str = "https://mayfly.test";

struct Fx {
    _dir: tempfile::TempDir,
    es: EncodingKey,
    es_pub_pem: String,
    rsa: EncodingKey,
    attacker: EncodingKey,
    verifier: BearerVerifier,
}

fn jwk_of(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut v = serde_json::to_value(Jwk::from_encoding_key(key, alg).expect("jwk")).expect("json");
    v["kid"] = kid.into();
    v
}

fn rules(typ: Option<Vec<String>>, single_use: bool, multi: bool) -> IssuerRules {
    IssuerRules {
        audiences: vec![AUD.into()],
        allow_multiple_audiences: multi,
        algorithms: vec![Algorithm::ES256, Algorithm::RS256],
        typ,
        leeway: Duration::from_secs(30),
        single_use,
        job_claims: vec!["run_id".into(), "run_attempt".into()],
        max_exchange_ttl: Duration::from_secs(3600),
    }
}

fn fx() -> Fx {
    crate::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let es_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("es");
    let es = EncodingKey::from_ec_pem(es_kp.serialize_pem().as_bytes()).expect("es pem");
    let rsa_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa");
    let rsa = EncodingKey::from_rsa_pem(rsa_kp.serialize_pem().as_bytes()).expect("rsa pem");
    let att_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("att");
    let attacker = EncodingKey::from_ec_pem(att_kp.serialize_pem().as_bytes()).expect("att pem");
    let jwks = json!({"keys": [jwk_of(&es, Algorithm::ES256, "es1"), jwk_of(&rsa, Algorithm::RS256, "rs1")]});
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).expect("write");
    let mut svid_key = jwk_of(&es, Algorithm::ES256, "es1");
    svid_key["use"] = "jwt-svid".into();
    let bundle = dir.path().join("bundle.json");
    std::fs::write(&bundle, json!({"keys": [svid_key]}).to_string()).expect("write");
    let cache = |p: &std::path::Path, spiffe| {
        Arc::new(KeyCache::new(
            KeySourceSpec::File(p.to_path_buf()),
            CacheSettings {
                ttl: Duration::from_secs(300),
                cooldown: Duration::from_secs(30),
                max_keys: 16,
            },
            spiffe,
            reqwest::Client::new(),
        ))
    };
    let mut verifier = BearerVerifier::new(4096);
    verifier.add_oidc_issuer(
        OIDC,
        TrustedIssuer {
            rules: rules(Some(vec!["JWT".into()]), false, true),
            keys: cache(&path, false),
        },
    );
    verifier.add_oidc_issuer(
        ONCE,
        TrustedIssuer {
            rules: rules(None, true, true),
            keys: cache(&path, false),
        },
    );
    verifier.add_trust_domain(
        "a.test",
        TrustedIssuer {
            rules: rules(None, false, false),
            keys: cache(&bundle, true),
        },
    );
    Fx {
        _dir: dir,
        es,
        es_pub_pem: es_kp.public_key_pem(),
        rsa,
        attacker,
        verifier,
    }
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn enc(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

/// Signs raw header and claims texts (so tests can write duplicates and odd JSON).
fn sign_raw(header: &str, claims: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let msg = format!("{}.{}", enc(header.as_bytes()), enc(claims.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).expect("sign");
    format!("{msg}.{sig}")
}

fn sign(header: Value, claims: Value, key: &EncodingKey, alg: Algorithm) -> String {
    sign_raw(&header.to_string(), &claims.to_string(), key, alg)
}

fn gh_claims() -> Value {
    json!({
        "iss": OIDC, "aud": AUD, "sub": "repo:acme/app:ref:refs/heads/main",
        "exp": now() + 300, "iat": now(), "nbf": now() - 5,
        "repository": "acme/app", "ref": "refs/heads/main", "run_id": "42", "run_attempt": "1",
        "environment": "prod", "jti": "j-1",
    })
}

fn es_header() -> Value {
    json!({"alg": "ES256", "kid": "es1", "typ": "JWT"})
}

fn with(mut v: Value, k: &str, val: Value) -> Value {
    v[k] = val;
    v
}

fn without(mut v: Value, k: &str) -> Value {
    v.as_object_mut().expect("object").remove(k);
    v
}

fn svid_claims(aud: Value) -> Value {
    json!({"sub": "spiffe://a.test/ci/job", "aud": aud, "exp": now() + 300})
}

async fn check(f: &Fx, token: &str) -> Result<VerifiedToken, VerifyError> {
    f.verifier
        .verify(token, None, OffsetDateTime::now_utc())
        .await
}

#[tokio::test]
async fn valid_tokens_of_each_issuer_kind_are_accepted() {
    let f = fx();
    let t = check(&f, &sign(es_header(), gh_claims(), &f.es, Algorithm::ES256))
        .await
        .expect("ES256 OIDC token");
    assert_eq!(
        t.caller.principal().as_str(),
        "https://ci.example#repo:acme/app:ref:refs/heads/main"
    );
    assert_eq!(t.caller.method(), AuthMethod::Oidc);
    assert_eq!(t.caller.posture().claims["repository"], "acme/app");
    assert_eq!(t.job, Some(vec!["42".to_string(), "1".to_string()]));

    let rs = json!({"alg": "RS256", "kid": "rs1", "typ": "JWT"});
    check(&f, &sign(rs, gh_claims(), &f.rsa, Algorithm::RS256))
        .await
        .expect("RS256 OIDC token");

    let svid = sign(
        json!({"alg": "ES256", "kid": "es1", "typ": "JWT"}),
        svid_claims(json!(AUD)),
        &f.es,
        Algorithm::ES256,
    );
    let t = check(&f, &svid).await.expect("JWT-SVID");
    assert_eq!(t.caller.principal().as_str(), "spiffe://a.test/ci/job");
    assert_eq!(t.caller.method(), AuthMethod::JwtSvid);

    let k8s = json!({
        "iss": OIDC, "aud": [AUD, "https://kubernetes.default.svc"],
        "sub": "system:serviceaccount:ci:builder", "exp": now() + 300,
        "kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "builder"}, "pod": {"name": "b-1"}},
    });
    let t = check(&f, &sign(es_header(), k8s, &f.es, Algorithm::ES256))
        .await
        .expect("Kubernetes token");
    assert_eq!(t.caller.posture().claims["namespace"], "ci");
    assert_eq!(t.caller.posture().claims["service_account"], "builder");
    assert_eq!(t.caller.posture().claims["pod"], "b-1");
}

type Expect = fn(&VerifyError) -> bool;

#[tokio::test]
async fn every_attack_is_refused_with_its_own_error() {
    let f = fx();
    let es = |h: Value, c: Value| sign(h, c, &f.es, Algorithm::ES256);
    let good = es(es_header(), gh_claims());
    let (h64, p64) = {
        let mut it = good.split('.');
        (
            it.next().expect("h").to_string(),
            it.next().expect("p").to_string(),
        )
    };
    let hs_with_public_key = sign(
        json!({"alg": "HS256", "kid": "es1", "typ": "JWT"}),
        gh_claims(),
        &EncodingKey::from_secret(f.es_pub_pem.as_bytes()),
        Algorithm::HS256,
    );
    let attacker_jwk = jwk_of(&f.attacker, Algorithm::ES256, "evil");
    let by_attacker = |extra: (&str, Value)| {
        sign(
            with(es_header(), extra.0, extra.1),
            gh_claims(),
            &f.attacker,
            Algorithm::ES256,
        )
    };
    let once = with(gh_claims(), "iss", json!(ONCE));

    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "alg none",
            format!("{}.{}.", enc(br#"{"alg":"none","typ":"JWT"}"#), p64),
            |e| matches!(e, VerifyError::TokenMalformed(_) | VerifyError::AlgNone),
        ),
        (
            "alg none with a signature",
            format!("{}.{}.AAAA", enc(br#"{"alg":"none","typ":"JWT"}"#), p64),
            |e| matches!(e, VerifyError::AlgNone),
        ),
        (
            "HS256 signed with the issuer's public key",
            hs_with_public_key,
            |e| matches!(e, VerifyError::AlgSymmetric(a) if a == "HS256"),
        ),
        (
            "alg not on the issuer's list",
            sign(
                json!({"alg": "ES384", "kid": "es1", "typ": "JWT"}),
                gh_claims(),
                &f.es,
                Algorithm::ES256,
            ),
            |e| matches!(e, VerifyError::AlgNotAllowed(a) if a == "ES384"),
        ),
        (
            "unknown kid",
            es(with(es_header(), "kid", json!("nope")), gh_claims()),
            |e| matches!(e, VerifyError::UnknownKid(k) if k == "nope"),
        ),
        (
            "jku pointing at an attacker",
            by_attacker(("jku", json!("https://evil.example/jwks"))),
            |e| matches!(e, VerifyError::EmbeddedKeyHeader("jku")),
        ),
        (
            "x5u pointing at an attacker",
            by_attacker(("x5u", json!("https://evil.example/cert"))),
            |e| matches!(e, VerifyError::EmbeddedKeyHeader("x5u")),
        ),
        (
            "embedded attacker jwk",
            by_attacker(("jwk", attacker_jwk)),
            |e| matches!(e, VerifyError::EmbeddedKeyHeader("jwk")),
        ),
        (
            "attacker x5c chain",
            by_attacker(("x5c", json!(["MIIB"]))),
            |e| matches!(e, VerifyError::EmbeddedKeyHeader("x5c")),
        ),
        (
            "unknown crit",
            es(
                with(
                    with(es_header(), "crit", json!(["exp-ext"])),
                    "exp-ext",
                    json!(1),
                ),
                gh_claims(),
            ),
            |e| matches!(e, VerifyError::UnsupportedCrit(_)),
        ),
        (
            "wrong typ",
            es(with(es_header(), "typ", json!("at+jwt")), gh_claims()),
            |e| matches!(e, VerifyError::TypMismatch(t) if t == "at+jwt"),
        ),
        (
            "wrong iss",
            es(
                es_header(),
                with(gh_claims(), "iss", json!("https://evil.example")),
            ),
            |e| matches!(e, VerifyError::UnknownIssuer(i) if i == "https://evil.example"),
        ),
        (
            "missing iss",
            es(es_header(), without(gh_claims(), "iss")),
            |e| matches!(e, VerifyError::MissingClaim("iss")),
        ),
        (
            "wrong aud",
            es(
                es_header(),
                with(gh_claims(), "aud", json!("https://other")),
            ),
            |e| matches!(e, VerifyError::AudienceMismatch),
        ),
        (
            "missing aud",
            es(es_header(), without(gh_claims(), "aud")),
            |e| matches!(e, VerifyError::MissingClaim("aud")),
        ),
        (
            "missing exp",
            es(es_header(), without(gh_claims(), "exp")),
            |e| matches!(e, VerifyError::MissingClaim("exp")),
        ),
        (
            "expired beyond leeway",
            es(es_header(), with(gh_claims(), "exp", json!(now() - 31))),
            |e| matches!(e, VerifyError::TokenExpired),
        ),
        (
            "future nbf",
            es(es_header(), with(gh_claims(), "nbf", json!(now() + 600))),
            |e| matches!(e, VerifyError::TokenNotYetValid),
        ),
        (
            "iat in the future",
            es(es_header(), with(gh_claims(), "iat", json!(now() + 600))),
            |e| matches!(e, VerifyError::IssuedInFuture),
        ),
        (
            "exp of the wrong type",
            es(es_header(), with(gh_claims(), "exp", json!("tomorrow"))),
            |e| matches!(e, VerifyError::ClaimType("exp")),
        ),
        (
            "bad signature (claims changed after signing)",
            format!(
                "{h64}.{}.{}",
                enc(with(gh_claims(), "repository", json!("evil/app"))
                    .to_string()
                    .as_bytes()),
                good.rsplit('.').next().expect("sig")
            ),
            |e| matches!(e, VerifyError::BadSignature),
        ),
        (
            "signed by an attacker key under the issuer's kid",
            sign(es_header(), gh_claims(), &f.attacker, Algorithm::ES256),
            |e| matches!(e, VerifyError::BadSignature),
        ),
        (
            "RSA key used for an ES256 token",
            sign(
                json!({"alg": "ES256", "kid": "rs1", "typ": "JWT"}),
                gh_claims(),
                &f.es,
                Algorithm::ES256,
            ),
            |e| matches!(e, VerifyError::KeyAlgMismatch),
        ),
        ("truncated token", good[..good.len() / 2].to_string(), |e| {
            matches!(
                e,
                VerifyError::TokenMalformed(_) | VerifyError::JsonMalformed { .. }
            )
        }),
        ("two segments", format!("{h64}.{p64}"), |e| {
            matches!(e, VerifyError::TokenMalformed(_))
        }),
        ("four segments", format!("{good}.x"), |e| {
            matches!(e, VerifyError::TokenMalformed(_))
        }),
        ("non-base64 segment", format!("{h64}.{p64}!.sig"), |e| {
            matches!(e, VerifyError::TokenMalformed(_))
        }),
        (
            "non-JSON claims",
            sign_raw(
                &es_header().to_string(),
                "not json",
                &f.es,
                Algorithm::ES256,
            ),
            |e| matches!(e, VerifyError::JsonMalformed { part: "claims", .. }),
        ),
        (
            "non-JSON header",
            format!("{}.{p64}.sig", enc(b"{alg")),
            |e| matches!(e, VerifyError::JsonMalformed { part: "header", .. }),
        ),
        (
            "duplicate claim",
            sign_raw(
                &es_header().to_string(),
                &format!(
                    r#"{{"iss":"{OIDC}","aud":"{AUD}","sub":"repo:acme/app:ref:refs/heads/main","exp":{},"repository":"acme/app","repository":"evil/app"}}"#,
                    now() + 300
                ),
                &f.es,
                Algorithm::ES256,
            ),
            |e| matches!(e, VerifyError::DuplicateMember { part: "claims", name } if name == "repository"),
        ),
        (
            "duplicate header member",
            sign_raw(
                r#"{"alg":"ES256","kid":"es1","typ":"JWT","alg":"HS256"}"#,
                &gh_claims().to_string(),
                &f.es,
                Algorithm::ES256,
            ),
            |e| matches!(e, VerifyError::DuplicateMember { part: "header", name } if name == "alg"),
        ),
        (
            "oversized token",
            es(
                es_header(),
                with(gh_claims(), "pad", json!("x".repeat(5000))),
            ),
            |e| matches!(e, VerifyError::TokenTooLarge(4096)),
        ),
        (
            "single-use token without jti",
            es(es_header(), without(once.clone(), "jti")),
            |e| matches!(e, VerifyError::MissingClaim("jti")),
        ),
        (
            "multi-audience JWT-SVID",
            es(
                json!({"alg": "ES256", "kid": "es1"}),
                svid_claims(json!([AUD, "https://other"])),
            ),
            |e| matches!(e, VerifyError::MultipleAudiences(2)),
        ),
        (
            "JWT-SVID without kid",
            es(json!({"alg": "ES256"}), svid_claims(json!(AUD))),
            |e| matches!(e, VerifyError::MissingKid),
        ),
        (
            "JWT-SVID of an unknown trust domain",
            es(
                json!({"alg": "ES256", "kid": "es1"}),
                with(svid_claims(json!(AUD)), "sub", json!("spiffe://b.test/x")),
            ),
            |e| matches!(e, VerifyError::UnknownTrustDomain(t) if t == "b.test"),
        ),
        (
            "JWT-SVID with an invalid SPIFFE ID",
            es(
                json!({"alg": "ES256", "kid": "es1"}),
                with(
                    svid_claims(json!(AUD)),
                    "sub",
                    json!("spiffe://a.test/../x"),
                ),
            ),
            |e| matches!(e, VerifyError::InvalidSpiffeId(_)),
        ),
    ];
    let mut failures = Vec::new();
    for (name, token, expect) in &cases {
        match check(&f, token).await {
            Err(e) if expect(&e) => {}
            other => failures.push(format!("{name}: got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_single_use_token_carries_its_jti_unspent_for_the_broker_to_consume() {
    let f = fx();
    let es = |h: Value, c: Value| sign(h, c, &f.es, Algorithm::ES256);
    let token = es(es_header(), with(gh_claims(), "iss", json!(ONCE)));
    // Verification alone consumes nothing: both presentations verify, each with the jti
    // the broker consumes in the shared store after authorization.
    for _ in 0..2 {
        let t = check(&f, &token).await.expect("verified");
        let su = t.caller.single_use().expect("single-use");
        assert_eq!(su.key, format!("jti:bearer:{ONCE}:j-1"));
        assert!(!su.is_spent());
        assert_eq!(
            su.until.unix_timestamp(),
            t.expires_at.unix_timestamp() + 30
        );
    }
    let reusable = check(&f, &es(es_header(), gh_claims())).await.expect("ok");
    assert!(reusable.caller.single_use().is_none());
}

#[tokio::test]
async fn a_refused_single_use_token_does_not_burn_its_jti() {
    let f = fx();
    let once = with(gh_claims(), "iss", json!(ONCE));
    let wrong_aud = sign(
        es_header(),
        with(once.clone(), "aud", json!("https://other")),
        &f.es,
        Algorithm::ES256,
    );
    assert!(matches!(
        check(&f, &wrong_aud).await,
        Err(VerifyError::AudienceMismatch)
    ));
    check(&f, &sign(es_header(), once, &f.es, Algorithm::ES256))
        .await
        .expect("the jti is still unused");
}

#[test]
fn symmetric_and_none_algorithms_cannot_be_configured() {
    assert_eq!(
        parse_algorithm("HS256"),
        Err("HS256 is symmetric; never accepted".to_string())
    );
    assert_eq!(
        parse_algorithm("none"),
        Err("\"none\" is never accepted".to_string())
    );
    assert_eq!(parse_algorithm("PS256"), Ok(Algorithm::PS256));
}
