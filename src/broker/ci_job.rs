//! The implicit task of a CI job (RFC 8693 token exchange, `token_exchange`): its keyed
//! id and the claims binding it is declared under.

use super::BrokerError;
use crate::identity::{Principal, VerifiedCaller};
use crate::task::TaskId;

/// The fingerprint an implicit CI task is bound to: the caller's principal and every
/// fact about its credential that Cedar can read as `context.posture` and keeps from
/// one token of a job to the next — method, trust domain, issuer and the whole
/// `posture.claims` record (all of `bearer::POSTURE_CLAIMS` the token carries). Not a
/// digest of the claims one policy happens to read: policies are reloaded while tasks
/// live, so every claim any policy could read is bound. Left out: the per-token claims
/// (`iat`, `exp`, `jti`; a retried job gets a fresh token) and the per-request facts
/// (`source_ip`, `credential_remaining_seconds`), which `DeclareTask` judges again
/// on every use instead.
pub fn claims_binding(caller: &VerifiedCaller) -> String {
    use sha2::{Digest, Sha256};
    let p = caller.posture();
    let doc = serde_json::json!({
        "v": 1,
        "principal": caller.principal().as_str(),
        "method": p.method.as_str(),
        "trust_domain": p.trust_domain,
        "issuer": p.issuer,
        "claims": p.claims,
    });
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(doc.to_string().as_bytes()))
    )
}

/// The implicit task of a CI job: the same job, claims and target always map to the same
/// task id, so a retried exchange reuses it instead of declaring another. The id is an
/// HMAC under a broker secret (`key`), so nobody can compute it from the job's public
/// claims; a job whose claims differ maps to another id. Never a random id instead: a
/// retry would then declare a second task for the same job.
pub fn job_task_id(
    key: &[u8; 32],
    owner: &Principal,
    job: &[String],
    target: &str,
    binding: &str,
) -> Result<TaskId, BrokerError> {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    let mut h = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|e| BrokerError::JobTaskId(e.to_string()))?;
    // Length-prefixed parts: no two different inputs share an encoding.
    let mut part = |b: &[u8]| {
        h.update(&(b.len() as u64).to_be_bytes());
        h.update(b);
    };
    part(b"mayfly ci job v2");
    part(owner.as_str().as_bytes());
    part(&(job.len() as u64).to_be_bytes());
    for j in job {
        part(j.as_bytes());
    }
    part(target.as_bytes());
    part(binding.as_bytes());
    let digest = h.finalize().into_bytes();
    let mut bits = [0u8; 16];
    bits.copy_from_slice(&digest[..16]);
    Ok(TaskId::from_bits(bits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AuthMethod, Posture};
    use time::OffsetDateTime;

    fn ci_caller(token_fp: &str, workflow: &str) -> VerifiedCaller {
        let principal =
            Principal::parse("https://token.actions.example#repo:acme/app:ref:refs/heads/main")
                .expect("principal");
        let claims = [
            ("run_id", "79"),
            ("run_attempt", "1"),
            ("job_workflow_ref", workflow),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        VerifiedCaller::for_tests(
            principal,
            Posture {
                method: AuthMethod::Oidc,
                trust_domain: String::new(),
                source: None,
                credential_not_after: OffsetDateTime::UNIX_EPOCH,
                credential_fingerprint: token_fp.to_string(),
                issuer: Some("https://token.actions.example".into()),
                claims,
            },
        )
    }

    /// The binding covers the claims Cedar reads, not the token: a fresh token of the
    /// same job binds the same, another job of the run (same `sub`) does not.
    #[test]
    fn the_claims_binding_follows_the_claims_not_the_token() {
        let deploy = ci_caller("sha256:aa", "deploy.yml");
        let deploy_fresh_token = ci_caller("sha256:bb", "deploy.yml");
        let tests = ci_caller("sha256:aa", "tests.yml");
        assert_eq!(claims_binding(&deploy), claims_binding(&deploy_fresh_token));
        assert_ne!(claims_binding(&deploy), claims_binding(&tests));
    }

    /// Implicit task ids are keyed: stable for one key and one job, different under
    /// another key (nobody without the key computes them) and for other claims.
    #[test]
    fn implicit_task_ids_need_the_key_and_follow_the_binding() {
        let caller = ci_caller("sha256:aa", "deploy.yml");
        let job = vec!["79".to_string(), "1".to_string()];
        let b = claims_binding(&caller);
        let id = |key: [u8; 32], binding: &str| {
            job_task_id(&key, caller.principal(), &job, "https://t", binding).expect("task id")
        };
        assert_eq!(id([1; 32], &b), id([1; 32], &b));
        assert_ne!(id([1; 32], &b), id([2; 32], &b));
        assert_ne!(id([1; 32], &b), id([1; 32], "sha256:other"));
        // Part boundaries are length-prefixed: moving bytes between parts changes the id.
        let split = |a: &str, b: &str| {
            job_task_id(
                &[1; 32],
                caller.principal(),
                &[a.into(), b.into()],
                "t",
                "x",
            )
            .expect("task id")
        };
        assert_ne!(split("7", "91"), split("79", "1"));
        assert!(id([1; 32], &b).as_str().parse::<TaskId>().is_ok());
    }
}
