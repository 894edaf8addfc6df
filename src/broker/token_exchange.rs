//! `POST /v1/token` (RFC 8693) as one broker operation: verify the subject token (a CI
//! job's OIDC token or a JWT-SVID), check the DPoP proof sent with it, find or declare
//! the job's implicit task (Cedar `DeclareTask`), then issue through the ordinary
//! `request_credential` (Cedar `MintCredential`, sign, durable `active` lease).
//!
//! The subject token is the caller's only proof: the edge resolves no transport caller
//! for this route, and the audit record names the token's principal.

use std::net::IpAddr;
use std::time::Duration;
use time::OffsetDateTime;

use super::{Broker, BrokerError, Outcome, claims_binding, job_task_id};
use crate::audit::AuditScope;
use crate::identity::OnceKey;
use crate::identity::VerifiedCaller;
use crate::identity::VerifyError;
use crate::identity::bearer::{BearerVerifier, VerifiedToken};
use crate::identity::dpop::{DpopError, ProofContext, VerifiedProof};
use crate::lease::StoreError;
use crate::task::{
    CredentialRequest, Grant, ProviderKind, RawGrant, Scope, ScopeError, Task, TaskRequest,
};

/// A token exchange whose form parameters are checked (RFC 8693, RFC 8707) and whose
/// subject token is not yet verified.
pub struct TokenExchange {
    pub subject_token: String,
    /// The peer address: the caller's `source_ip` posture.
    pub source: Option<IpAddr>,
    /// The `resource` / `audience`: the grant's target.
    pub target: String,
    /// RFC 8707 resources (validated URIs): the implicit task holds a grant for each,
    /// and the token's `aud` covers them all.
    pub resources: Vec<String>,
    /// The `scope`: the grant's actions (at least one).
    pub actions: Vec<String>,
    pub proof: PresentedProof,
}

/// A request's `DPoP` header (RFC 9449) as presented, not yet checked.
pub struct PresentedProof {
    /// No proof, the one proof, or why the header cannot be a proof (several, not
    /// ASCII). An unreadable header is refused only where a proof would be checked, so
    /// the exchange judges the subject token first.
    pub header: Result<Option<String>, DpopError>,
    /// The HTTP method, as sent.
    pub method: &'static str,
    /// The request path; the proof must name Mayfly's public URL for it.
    pub path: String,
    /// The bearer token the request carries in `Authorization`, if any (`ath`).
    pub access_token: Option<String>,
}

/// Why a token exchange was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    SubjectToken(#[from] VerifyError),
    #[error(transparent)]
    Dpop(#[from] DpopError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<ScopeError> for ExchangeError {
    fn from(e: ScopeError) -> Self {
        Self::Broker(e.into())
    }
}

impl Broker {
    /// `POST /v1/token`: the subject token becomes a `jwt` credential for `target`. The
    /// implicit task is keyed by the job's claims and the targets, so a job declares it
    /// once and a retry (after an approval, say) reuses it; its life is bounded by config
    /// and by the subject token's `exp`.
    pub async fn token_exchange(
        &self,
        bearer: &BearerVerifier,
        req: TokenExchange,
        ev: &AuditScope,
    ) -> Result<Outcome, ExchangeError> {
        let subject = verify_subject(bearer, &req.subject_token, req.source, ev).await?;
        // After the subject token: an unauthenticated request never writes a jti.
        let proven = self.prove(req.proof)?;
        let job = subject.job.unwrap_or_default();
        if job.is_empty() {
            return Err(BrokerError::NoJobClaims.into());
        }
        // Several resources make one task: its key names them all (a URI has no space).
        let mut targets = vec![req.target.clone()];
        targets.extend(req.resources.into_iter().filter(|r| *r != req.target));
        let ttl = self.implicit_task_ttl(subject.expires_at, subject.max_exchange_ttl);
        let implicit = implicit_task_request(&job, &targets, &req.actions, ttl);
        let caller = subject.caller;
        let task = self.job_task(&caller, &job, &targets, implicit, ev).await?;
        let creq = CredentialRequest {
            provider: ProviderKind::Jwt,
            target: req.target,
            actions: Some(req.actions.into_iter().collect()),
            resources: None,
            ttl: None,
            resource: targets,
            dpop_jkt: proven.as_ref().map(|p| p.0.jkt.clone()),
            dpop_once: proven.map(|p| p.1),
        };
        Ok(self.request_credential(&caller, &task.id, creq, ev).await?)
    }

    /// Checks a presented DPoP proof against this request: the key it proves and its
    /// `jti` still to be consumed, or `None` when the request carries no proof. The `jti`
    /// is consumed with the lease of the credential the request gets
    /// (`LeaseStore::put_new_once`): a refused request never burns it, a replay mints
    /// nothing, and an accepted proof costs no store write of its own.
    pub fn prove(&self, p: PresentedProof) -> Result<Option<(VerifiedProof, OnceKey)>, DpopError> {
        let Some(proof) = p.header? else {
            return Ok(None);
        };
        let url = format!("{}{}", self.jwt.issuer(), p.path);
        let ctx = ProofContext {
            method: p.method,
            url: &url,
            access_token: p.access_token.as_deref(),
            now: OffsetDateTime::now_utc(),
        };
        Ok(Some(self.dpop.check_unspent(&proof, ctx)?))
    }

    /// An implicit task lives until the subject token expires (at least a second), and
    /// no longer than the issuer's `max_exchange_ttl` or `limits.max_task_ttl`; whole
    /// seconds.
    fn implicit_task_ttl(&self, subject_expires_at: OffsetDateTime, max: Duration) -> Duration {
        let left = (subject_expires_at - OffsetDateTime::now_utc()).max(time::Duration::SECOND);
        let ttl = Duration::try_from(left)
            .unwrap_or(Duration::from_secs(1))
            .min(max)
            .min(self.limits.max_task_ttl);
        Duration::from_secs(ttl.as_secs().max(1))
    }

    /// The job's implicit task: the one its id names, or declared now from `implicit`.
    /// An existing task is re-authorized (binding and `DeclareTask`) by
    /// `request_credential`, like every other use of it.
    async fn job_task(
        &self,
        caller: &VerifiedCaller,
        job: &[String],
        targets: &[String],
        implicit: Result<TaskRequest, ScopeError>,
        ev: &AuditScope,
    ) -> Result<Task, ExchangeError> {
        let binding = claims_binding(caller);
        let key = targets.join(" ");
        let id = job_task_id(&self.ci_task_key, caller.principal(), job, &key, &binding)?;
        if let Some(t) = self.store.task(&id).await.map_err(BrokerError::from)? {
            return Ok(t);
        }
        let declared = self
            .declare_task_as(caller, implicit?, id.clone(), Some(binding), ev)
            .await;
        match declared {
            Ok(t) => Ok(t),
            // A concurrent exchange for the same job declared it first.
            Err(BrokerError::Store(StoreError::AlreadyExists(_))) => {
                Ok(self.load_task(&id).await?)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Verifies the subject token and names its principal in the audit record (the token's
/// fingerprint is recorded first, so a refused token is traceable too).
async fn verify_subject(
    bearer: &BearerVerifier,
    token: &str,
    source: Option<IpAddr>,
    ev: &AuditScope,
) -> Result<VerifiedToken, VerifyError> {
    ev.set(|e| e.credential_fingerprint = Some(crate::secret::fingerprint(token.as_bytes())));
    let verified = bearer
        .verify(token, source, OffsetDateTime::now_utc())
        .await?;
    let caller = &verified.caller;
    ev.set(|e| {
        e.principal = Some(caller.principal().to_string());
        e.auth_method = Some(caller.method().as_str());
        e.credential_not_after = Some(crate::api_time(verified.expires_at));
    });
    Ok(verified)
}

/// The declaration of a job's implicit task: one `jwt` grant of `actions` per target.
/// The job's claims and the form's targets and actions are the caller's text, so they
/// are validated like any declared task's.
fn implicit_task_request(
    job: &[String],
    targets: &[String],
    actions: &[String],
    ttl: Duration,
) -> Result<TaskRequest, ScopeError> {
    let job = job.join("/");
    let purpose = format!("CI job {job}");
    crate::task::validate_purpose(&purpose)?;
    let labels = [
        ("mayfly.exchange".to_string(), "rfc8693".to_string()),
        ("ci.job".to_string(), job.chars().take(64).collect()),
    ]
    .into_iter()
    .collect();
    crate::task::validate_labels(&labels)?;
    let grants = targets
        .iter()
        .map(|t| {
            Grant::try_from(RawGrant {
                provider: ProviderKind::Jwt.as_str().to_string(),
                target: t.clone(),
                actions: actions.to_vec(),
                resources: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TaskRequest {
        purpose,
        scope: Scope::new(grants)?,
        ttl,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn an_implicit_task_holds_one_jwt_grant_per_target_and_names_its_job() {
        let targets = job(&["https://a.example", "https://b.example"]);
        let req = implicit_task_request(
            &job(&["4242", "1"]),
            &targets,
            &job(&["read"]),
            Duration::from_secs(60),
        )
        .expect("a plain job declares");
        assert_eq!(req.purpose, "CI job 4242/1");
        assert_eq!(req.labels.get("ci.job").map(String::as_str), Some("4242/1"));
        assert_eq!(
            req.labels.get("mayfly.exchange").map(String::as_str),
            Some("rfc8693")
        );
        let grants = req.scope.grants();
        assert_eq!(grants.len(), 2);
        assert!(grants.iter().all(|g| g.provider == ProviderKind::Jwt));
        assert_eq!(req.ttl, Duration::from_secs(60));
    }

    #[test]
    fn a_job_claim_with_a_control_character_is_an_invalid_purpose() {
        let err = implicit_task_request(
            &job(&["run\n1"]),
            &job(&["https://a.example"]),
            &job(&["read"]),
            Duration::from_secs(60),
        )
        .expect_err("control characters are refused");
        assert!(matches!(err, ScopeError::Purpose));
    }

    #[test]
    fn an_action_that_is_not_a_token_is_an_invalid_scope() {
        let err = implicit_task_request(
            &job(&["1"]),
            &job(&["https://a.example"]),
            &job(&["read\"write"]),
            Duration::from_secs(60),
        )
        .expect_err("a quote is no action");
        assert!(matches!(
            err,
            ScopeError::Item {
                field: "actions",
                ..
            }
        ));
    }
}
