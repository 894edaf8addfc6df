//! What an `AssumeRole` call carries: the inline session policy cut to the grant, the
//! session length, and the `SourceIdentity` of the principal.

use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::time::Duration;

use super::MAX_SESSION_POLICY_CHARS;
use crate::identity::Principal;
use crate::lease::Lease;
use crate::provider::ProviderError;

/// The inline session policy for a grant, compact JSON. Refuses (never widens) when it
/// would exceed STS's limit, and refuses an empty resource list rather than `*`.
pub fn session_policy(
    actions: &BTreeSet<String>,
    resources: &BTreeSet<String>,
) -> Result<String, ProviderError> {
    for a in actions {
        let ok = a.split_once(':').is_some_and(|(svc, op)| {
            !svc.is_empty()
                && svc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !op.is_empty()
                && op.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'*')
        });
        if !ok {
            return Err(ProviderError::InvalidGrant(format!(
                "{a:?} is not an IAM action (service:Action)"
            )));
        }
    }
    if resources.is_empty() {
        return Err(ProviderError::InvalidGrant(
            "an aws grant must name its resources (ARNs, or \"*\" explicitly)".into(),
        ));
    }
    if let Some(r) = resources
        .iter()
        .find(|r| *r != "*" && !r.starts_with("arn:"))
    {
        return Err(ProviderError::InvalidGrant(format!(
            "resource {r:?} is not an ARN"
        )));
    }
    // Scope validation refuses these already; the policy is the last place a widened
    // grant could slip through, so check again where it is written.
    if let Some(r) = resources
        .iter()
        .find(|r| r.contains(crate::task::IAM_RESOURCE_METACHARS))
    {
        return Err(ProviderError::InvalidGrant(format!(
            "resource {r:?} holds an IAM wildcard or policy variable"
        )));
    }
    let doc = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": actions,
            "Resource": resources,
        }]
    })
    .to_string();
    if doc.len() > MAX_SESSION_POLICY_CHARS {
        return Err(ProviderError::PolicyTooLarge {
            what: "session policy",
            len: doc.len(),
            max: MAX_SESSION_POLICY_CHARS,
        });
    }
    Ok(doc)
}

/// `max(min, lease TTL)` (`min` is STS's 900 s floor outside tests), refused when above
/// the role's maximum.
pub fn session_secs(lease: &Lease, min: Duration, max: Duration) -> Result<u64, ProviderError> {
    let ttl = u64::try_from((lease.expires_at - lease.issued_at).whole_seconds()).unwrap_or(0);
    let secs = ttl.max(min.as_secs());
    if secs > max.as_secs() {
        return Err(ProviderError::InvalidGrant(format!(
            "lease TTL {ttl} s exceeds the role's maximum session of {} s",
            max.as_secs()
        )));
    }
    Ok(secs)
}

/// `SourceIdentity` (2–64 of `[A-Za-z0-9_+=,.@-]`) for a principal. A SPIFFE ID maps
/// one-to-one (`spiffe://td/a/b` → `td+a+b`, `+` never occurs in SPIFFE IDs) when it fits;
/// anything else is a readable prefix plus a digest of the whole principal.
pub fn source_identity(p: &Principal) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c);
    if let Principal::Spiffe(id) = p {
        let s = id
            .as_str()
            .trim_start_matches("spiffe://")
            .replace('/', "+");
        if (2..=64).contains(&s.len()) && s.chars().all(allowed) {
            return s;
        }
    }
    let full = p.as_str();
    let readable: String = full
        .trim_start_matches("https://")
        .trim_start_matches("spiffe://")
        .chars()
        .map(|c| if allowed(c) { c } else { '-' })
        .take(41)
        .collect();
    let digest = hex::encode(Sha256::digest(full.as_bytes()));
    format!("{readable},{}", &digest[..22])
}
