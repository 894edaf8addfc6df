//! The token surface: RFC 7662 introspection of the JWTs Mayfly signs, the keys and
//! algorithms it publishes, and RFC 9449 DPoP proofs checked against its public URL.

use time::OffsetDateTime;

use super::{Broker, BrokerError};
use crate::action::Action;
use crate::audit::AuditScope;
use crate::task::{LeaseId, ProviderKind, TaskState};

/// RFC 7662 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Introspection {
    Inactive,
    Active {
        claims: Box<crate::provider::jwt::AccessClaims>,
    },
}

impl Broker {
    /// Mayfly's issuer: its public base URL, the `iss` of every JWT it signs.
    pub fn issuer(&self) -> &str {
        self.jwt.issuer()
    }

    /// The JWKS document of the keys Mayfly signs with.
    pub fn jwks(&self) -> serde_json::Value {
        self.jwt.jwks()
    }

    /// The JWS algorithms of those keys, as discovery documents list them.
    pub fn signing_algorithms(&self) -> Vec<&'static str> {
        self.jwt.algorithms()
    }

    /// The server nonce to announce (`DPoP-Nonce`) at `now`, when nonces are required.
    pub fn dpop_nonce(&self, now: OffsetDateTime) -> Option<String> {
        self.dpop.nonce(now)
    }

    /// `POST /v1/introspect` (RFC 7662): active only while the token's lease is active,
    /// unexpired and its task is active.
    pub async fn introspect(
        &self,
        token: &str,
        ev: &AuditScope,
    ) -> Result<Introspection, BrokerError> {
        ev.set(|e| {
            e.action = Some(Action::Introspect);
            e.credential_fingerprint = Some(crate::secret::fingerprint(token.as_bytes()));
        });
        let Ok(claims) = self.jwt.verify(token) else {
            return Ok(Introspection::Inactive);
        };
        let Ok(lease_id) = claims.jti.parse::<LeaseId>() else {
            return Ok(Introspection::Inactive);
        };
        ev.set(|e| e.lease_id = Some(lease_id.to_string()));
        let now = OffsetDateTime::now_utc();
        let Some(lease) = self.store.lease(&lease_id).await? else {
            return Ok(Introspection::Inactive);
        };
        let live = lease.is_live(now)
            && lease.provider == ProviderKind::Jwt
            && claims.holder() == Some(lease.principal.as_str())
            && now.unix_timestamp() < claims.exp;
        if !live {
            return Ok(Introspection::Inactive);
        }
        let task = self.load_task(&lease.task_id).await?;
        if task.state_at(now) != TaskState::Active {
            return Ok(Introspection::Inactive);
        }
        ev.set(|e| {
            e.subject = Some(claims.sub.clone());
            e.act = claims.act.clone();
        });
        Ok(Introspection::Active {
            claims: Box::new(claims),
        })
    }
}
