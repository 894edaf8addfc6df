//! An ES256 JWT-SVID signing key and the JWTs it signs.

use serde_json::Value;

/// An ES256 JWT-SVID signing key with its JWK (`use: "jwt-svid"`).
pub struct JwtSvidKey {
    key: jsonwebtoken::EncodingKey,
    pub kid: String,
    pub jwk: Value,
}

impl JwtSvidKey {
    pub fn generate(kid: &str) -> Self {
        mayfly::install_crypto_provider();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
            .expect("encoding key");
        let mut jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES256)
                .expect("jwk"),
        )
        .expect("json");
        jwk["kid"] = kid.into();
        jwk["use"] = "jwt-svid".into();
        Self {
            key,
            kid: kid.to_string(),
            jwk,
        }
    }

    /// A JWT-SVID for `sub` with audience `aud` and a `jti`, valid for ten minutes.
    pub fn sign_jti(&self, sub: &str, aud: &str, jti: &str) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims =
            serde_json::json!({"sub": sub, "aud": [aud], "iat": now, "exp": now + 600, "jti": jti});
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }

    /// A JWT-SVID for `sub` with audience `aud`, valid for ten minutes.
    pub fn sign(&self, sub: &str, aud: &str) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims = serde_json::json!({"sub": sub, "aud": [aud], "iat": now, "exp": now + 600});
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }
}
