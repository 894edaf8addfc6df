//! Bearer tokens (JWS compact, header and claims) as `Authorization: Bearer` and
//! `subject_token` carry them, through the real verifier configured like a deployment
//! (an OIDC issuer with a JWKS file), and Mayfly's own access tokens through
//! introspection's verifier. First byte: 0 = the rest is a raw token; 1 = the rest is a
//! claims object, signed with the issuer's key (reaches every claim rule past the
//! signature); 2 = the rest is an access-token claims object signed by Mayfly's key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::bearer::BearerVerifier;
use mayfly::provider::jwt::{AccessClaims, JwtIssuer, SigningAlg, SigningKey};
use std::sync::{Arc, LazyLock};
use time::OffsetDateTime;

const ISSUER: &str = "https://issuer.fuzz";

struct Fixture {
    _dir: tempfile::TempDir,
    oidc_key: SigningKey,
    bearer: BearerVerifier,
    mayfly: JwtIssuer,
    rt: tokio::runtime::Runtime,
}

static FX: LazyLock<Fixture> = LazyLock::new(|| {
    mayfly::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let (oidc_key, _) = SigningKey::generate(SigningAlg::ES256).expect("key");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({"keys": [oidc_key.jwk()]}).to_string(),
    )
    .expect("write jwks");
    let config = format!(
        r#"
[tls]
cert_file = "unused.pem"
key_file = "unused-key.pem"
[[trust_domains]]
name = "fuzz.test"
bundle_file = "unused-bundle.pem"
[[oidc_issuers]]
issuer = "{ISSUER}"
audiences = ["https://mayfly.fuzz"]
jwks_file = {jwks:?}
algorithms = ["ES256"]
job_claims = ["run_id", "run_attempt"]
[providers.jwt]
issuer = "https://mayfly.fuzz"
signing_key_file = "unused-jwt-key.pem"
"#
    );
    let config = mayfly::config::Config::from_toml(&config, std::path::Path::new("fuzz.toml"))
        .expect("fixture config");
    let bundles = Arc::new(mayfly::identity::LiveBundles::load(&[]).expect("no bundles"));
    let bearer = mayfly::app::bearer_verifier(&config, &bundles).expect("verifier");
    let (access_key, _) = SigningKey::generate(SigningAlg::ES256).expect("key");
    Fixture {
        _dir: dir,
        oidc_key,
        bearer,
        mayfly: JwtIssuer::new("https://mayfly.fuzz".into(), access_key),
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
    }
});

fuzz_target!(|data: &[u8]| {
    let fx = &*FX;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // 2027-06-01: inside the seeds' iat/exp, so runs are reproducible.
    let now = OffsetDateTime::from_unix_timestamp(1_811_808_000).expect("time");
    match mode % 3 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else {
                return;
            };
            let _ = fx.rt.block_on(fx.bearer.verify(token, None, now));
            let _ = fx.mayfly.verify(token);
        }
        1 => {
            let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
                return;
            };
            let Ok(token) = fx.oidc_key.sign_json(&claims, "JWT") else {
                return;
            };
            if let Ok(v) = fx.rt.block_on(fx.bearer.verify(&token, None, now)) {
                assert_eq!(v.caller.principal().issuer(), Some(ISSUER));
                assert_eq!(claims["iss"], ISSUER);
            }
        }
        _ => {
            let Ok(claims) = serde_json::from_slice::<AccessClaims>(rest) else {
                return;
            };
            let Ok(token) = fx.mayfly.sign(&claims) else {
                return;
            };
            if let Ok(back) = fx.mayfly.verify(&token) {
                // The token carries the claims' JSON: compare with that JSON read back.
                // serde_json's float parsing is not exact, so a float inside `act` may
                // change on its first trip through text (1.8118080001e37 ->
                // 1.8118080001000001e37); once written and read, it stays.
                let carried: AccessClaims =
                    serde_json::from_slice(&serde_json::to_vec(&claims).expect("encode"))
                        .expect("decode");
                assert_eq!(back, carried);
            }
        }
    }
});
