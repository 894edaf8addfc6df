//! The `vault` provider: HashiCorp Vault or OpenBao tokens and dynamic secrets.
//!
//! Two kinds of target, chosen in config:
//! - **token**: a token created through a configured token role. The grant's `actions`
//!   are the Vault policies it carries, each from the target's allow-list. Its metadata
//!   names the task, the lease and the principal.
//! - **dynamic**: a read of a configured path (`database/creds/ROLE`, `pki/issue/ROLE`…).
//!   Vault's lease id is kept and revoked through `sys/leases/revoke`.
//!
//! Crash safety for tokens: the token is created with a TTL no longer than the pending
//! timeout and an `explicit_max_ttl` at the lease's end; only once the lease is durably
//! `active` (with the accessor as its handle) is the TTL extended to the lease's end. A
//! crash anywhere before that leaves a token nobody has seen that dies within the pending
//! timeout, which is what the reaper reports for such a lease (`ExpiresOnly`).
//!
//! A small client over `reqwest` rather than `vaultrs`: vaultrs 0.8 has no
//! `sys/leases/revoke`, drops the `lease_id` of reads at arbitrary paths, and offers no
//! bound on response size.

mod config;

pub use config::{RawAppRole, RawVault, RawVaultTarget, VaultAuth, VaultConfig, VaultTarget};

use async_trait::async_trait;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use time::OffsetDateTime;

use super::http::{client, read_capped, reason, unreachable};
use super::{CredentialProvider, MintRequest, Minted, ProviderError, RateLimit, Revocation};
use crate::lease::Lease;
use crate::secret::{Secret, fingerprint};
use crate::task::ProviderKind;

/// Largest Vault response Mayfly reads (a PKI bundle with its chain fits easily).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// How much of the AppRole token's TTL may pass before Mayfly logs in again.
const RELOGIN_FRACTION: f64 = 0.66;

// ---------------------------------------------------------------------------------------
// Client

#[derive(Default)]
struct AuthState {
    token: Option<Secret<String>>,
    /// Token file: (mtime, length) when read.
    stamp: Option<(SystemTime, u64)>,
    /// AppRole: log in again after this instant.
    relogin_at: Option<Instant>,
}

pub struct VaultProvider {
    cfg: VaultConfig,
    http: reqwest::Client,
    auth: tokio::sync::Mutex<AuthState>,
}

#[derive(Deserialize)]
struct AuthBlock {
    client_token: String,
    accessor: String,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    lease_duration: u64,
}

#[derive(Deserialize, Default)]
struct VaultResponse {
    #[serde(default)]
    lease_id: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    auth: Option<AuthBlock>,
}

fn read_file(p: &Path) -> Result<String, ProviderError> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| ProviderError::Unavailable(format!("vault credentials {}: {e}", p.display())))
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl VaultProvider {
    pub fn new(cfg: VaultConfig) -> Result<Self, String> {
        let http = client(cfg.timeout, cfg.ca_file.as_deref())?;
        if let VaultAuth::TokenFile(f) = &cfg.auth {
            // Fail at start-up on a missing file, not at the first request.
            read_file(f).map_err(|e| e.to_string())?;
        }
        Ok(Self {
            cfg,
            http,
            auth: tokio::sync::Mutex::new(AuthState::default()),
        })
    }

    pub fn rate(&self) -> Option<RateLimit> {
        self.cfg.rate
    }

    /// Mayfly's current Vault token: the token file as it is now, or an AppRole login.
    async fn token(&self) -> Result<Secret<String>, ProviderError> {
        let mut st = self.auth.lock().await;
        match &self.cfg.auth {
            VaultAuth::TokenFile(f) => {
                let now = stamp(f);
                if st.token.is_none() || now != st.stamp || now.is_none() {
                    let t = read_file(f)?;
                    if t.is_empty() {
                        return Err(ProviderError::Unavailable(format!(
                            "vault token file {} is empty",
                            f.display()
                        )));
                    }
                    st.token = Some(Secret::new(t));
                    st.stamp = now;
                }
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let fresh = st.relogin_at.is_some_and(|t| Instant::now() < t);
                if st.token.is_none() || !fresh {
                    let secret_id = Secret::new(read_file(secret_id_file)?);
                    let body = json!({"role_id": role_id, "secret_id": secret_id.expose()});
                    let resp = self
                        .send(
                            Method::POST,
                            &format!("auth/{mount}/login"),
                            None,
                            Some(&body),
                        )
                        .await?;
                    let auth = resp.auth.ok_or_else(|| {
                        ProviderError::Unavailable("vault approle login returned no token".into())
                    })?;
                    let ttl = Duration::from_secs(auth.lease_duration.max(1));
                    st.relogin_at = Some(Instant::now() + ttl.mul_f64(RELOGIN_FRACTION));
                    st.token = Some(Secret::new(auth.client_token));
                }
            }
        }
        st.token
            .clone()
            .ok_or_else(|| ProviderError::Unavailable("no vault token".into()))
    }

    /// Forgets the AppRole token (after a 403) so the next call logs in again.
    async fn forget_token(&self) {
        if matches!(self.cfg.auth, VaultAuth::AppRole { .. }) {
            let mut st = self.auth.lock().await;
            st.token = None;
            st.relogin_at = None;
        }
    }

    /// One request to `{address}/v1/{path}`. Maps transport failures and 5xx to
    /// `Unavailable`, 403 to `Denied`, other 4xx to `Rejected`, with Vault's reason.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&Secret<String>>,
        body: Option<&Value>,
    ) -> Result<VaultResponse, ProviderError> {
        let url = format!("{}/v1/{path}", self.cfg.address);
        let mut req = self.http.request(method, &url);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t.expose());
        }
        if let Some(ns) = &self.cfg.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let what = format!("vault {path}");
        let resp = req.send().await.map_err(|e| unreachable(&what, &e))?;
        let status = resp.status();
        let bytes = read_capped(&what, resp, MAX_RESPONSE_BYTES).await?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(VaultResponse::default());
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                ProviderError::Unavailable(format!("{what}: unreadable response: {e}"))
            });
        }
        let errors = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("errors").cloned())
            .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
            .map(|e| e.join("; "))
            .unwrap_or_default();
        let why = reason(&format!("{what}: HTTP {}: {errors}", status.as_u16()));
        Err(match status.as_u16() {
            403 => ProviderError::Denied(why),
            400..=499 if status.as_u16() != 429 => ProviderError::Rejected(why),
            _ => ProviderError::Unavailable(why),
        })
    }

    /// An authenticated call; with AppRole, a 403 (token expired or revoked under us)
    /// logs in again once.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<VaultResponse, ProviderError> {
        let token = self.token().await?;
        match self.send(method.clone(), path, Some(&token), body).await {
            Err(ProviderError::Denied(_)) if matches!(self.cfg.auth, VaultAuth::AppRole { .. }) => {
                self.forget_token().await;
                let token = self.token().await?;
                self.send(method, path, Some(&token), body).await
            }
            other => other,
        }
    }

    fn target(&self, lease: &Lease) -> Result<&VaultTarget, ProviderError> {
        self.cfg.targets.get(&lease.target).ok_or_else(|| {
            ProviderError::NotAllowed(format!("no vault target {:?} is configured", lease.target))
        })
    }

    async fn mint_token(
        &self,
        req: &MintRequest<'_>,
        role: &str,
        allowed: &BTreeSet<String>,
    ) -> Result<Minted, ProviderError> {
        let lease = req.lease;
        if let Some(p) = lease.actions.iter().find(|p| !allowed.contains(*p)) {
            return Err(ProviderError::NotAllowed(format!(
                "vault policy {p:?} is not in the allow-list of target {:?}",
                lease.target
            )));
        }
        if !lease.resources.is_empty() {
            return Err(ProviderError::InvalidGrant(
                "a vault token grant names policies in `actions` and takes no resources".into(),
            ));
        }
        let total = secs_until(lease.expires_at);
        let first = total.min(self.cfg.pending_ttl.as_secs().max(1));
        let body = json!({
            "policies": lease.actions,
            "meta": {
                "mayfly_task": lease.task_id.as_str(),
                "mayfly_lease": lease.id.as_str(),
                "mayfly_principal": req.caller.principal().to_string(),
            },
            "display_name": lease.id.as_str(),
            "ttl": format!("{first}s"),
            "explicit_max_ttl": format!("{total}s"),
            "renewable": true,
        });
        let resp = self
            .call(
                Method::POST,
                &format!("auth/token/create/{role}"),
                Some(&body),
            )
            .await?;
        let auth = resp.auth.ok_or_else(|| {
            ProviderError::Unavailable("vault token create returned no token".into())
        })?;
        let policies: Vec<&String> = auth.policies.iter().filter(|p| *p != "default").collect();
        if let Some(extra) = policies.iter().find(|p| !lease.actions.contains(**p)) {
            // The role attached a policy the grant did not ask for: never hand it out.
            let why = format!("token role {role:?} attached policy {extra:?} beyond the grant");
            return Err(match self.revoke_accessor(&auth.accessor).await {
                Ok(()) => ProviderError::Rejected(why),
                // Still alive upstream: the lease must go through revocation.
                Err(e) => ProviderError::Mint(format!("{why}; revoking it failed: {e}")),
            });
        }
        Ok(Minted {
            fingerprint: fingerprint(auth.client_token.as_bytes()),
            credential: Secret::new(json!({
                "token": auth.client_token,
                "accessor": auth.accessor,
                "policies": auth.policies,
            })),
            handle: Some(json!({
                "kind": "token",
                "accessor": auth.accessor,
                "extend_to": if first < total { Some(lease.expires_at.unix_timestamp()) } else { None },
            })),
        })
    }

    async fn mint_dynamic(
        &self,
        req: &MintRequest<'_>,
        target: &VaultTarget,
    ) -> Result<Minted, ProviderError> {
        let VaultTarget::Dynamic {
            path,
            post,
            params,
            ttl_param,
            resource_param,
            ..
        } = target
        else {
            return Err(ProviderError::Mint("not a dynamic target".into()));
        };
        let lease = req.lease;
        if lease.actions.len() != 1 || !lease.actions.contains("read") {
            return Err(ProviderError::InvalidGrant(
                "a vault dynamic-secret grant has exactly the action \"read\"".into(),
            ));
        }
        let resp = if *post {
            let body = dynamic_body(
                lease,
                params,
                ttl_param.as_deref(),
                resource_param.as_deref(),
            )?;
            self.call(Method::POST, path, Some(&Value::Object(body)))
                .await?
        } else {
            if !lease.resources.is_empty() {
                return Err(ProviderError::InvalidGrant(
                    "this target takes no resources".into(),
                ));
            }
            self.call(Method::GET, path, None).await?
        };
        let data = resp.data.unwrap_or(Value::Null);
        if resp.lease_id.is_empty() {
            // Minted but not revocable: refuse to hand it out (the lease is revoked and
            // reports when the secret expires by itself).
            return Err(ProviderError::Mint(format!(
                "vault {path} returned no lease id, so Mayfly could not revoke it \
                 (for pki, set generate_lease=true on the role)"
            )));
        }
        let vault_expires = OffsetDateTime::now_utc() + Duration::from_secs(resp.lease_duration);
        let fp = fingerprint(data.to_string().as_bytes());
        Ok(Minted {
            fingerprint: fp,
            credential: Secret::new(json!({"data": data, "vault_lease_id": resp.lease_id})),
            handle: Some(json!({
                "kind": "dynamic",
                "vault_lease_id": resp.lease_id,
                "vault_expires_at": vault_expires.unix_timestamp(),
            })),
        })
    }

    async fn revoke_accessor(&self, accessor: &str) -> Result<(), ProviderError> {
        match self
            .call(
                Method::POST,
                "auth/token/revoke-accessor",
                Some(&json!({"accessor": accessor})),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Already revoked or expired: the token is gone, which is the goal.
            Err(ProviderError::Rejected(r)) if r.contains("invalid accessor") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn secs_until(t: OffsetDateTime) -> u64 {
    u64::try_from((t - OffsetDateTime::now_utc()).whole_seconds())
        .unwrap_or(0)
        .max(1)
}

fn handle_str<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease.handle.as_ref()?.get(key)?.as_str()
}

fn handle_i64(lease: &Lease, key: &str) -> Option<i64> {
    lease.handle.as_ref()?.get(key)?.as_i64()
}

/// The POST body of a dynamic target: its fixed params, plus the lease's TTL and its one
/// resource under the names the target configures.
fn dynamic_body(
    lease: &Lease,
    params: &Map<String, Value>,
    ttl_param: Option<&str>,
    resource_param: Option<&str>,
) -> Result<Map<String, Value>, ProviderError> {
    let mut body = params.clone();
    if let Some(p) = ttl_param {
        body.insert(
            p.to_string(),
            json!(format!("{}s", secs_until(lease.expires_at))),
        );
    }
    match (resource_param, lease.resources.len()) {
        (Some(p), 1) => {
            let r = lease
                .resources
                .iter()
                .next()
                .map(String::as_str)
                .unwrap_or("");
            if r.ends_with('*') {
                return Err(ProviderError::InvalidGrant(format!(
                    "resource {r:?} is a pattern; {p} needs one concrete value"
                )));
            }
            body.insert(p.to_string(), json!(r));
        }
        (Some(p), _) => {
            return Err(ProviderError::InvalidGrant(format!(
                "this target takes exactly one resource (its {p})"
            )));
        }
        (None, 0) => {}
        (None, _) => {
            return Err(ProviderError::InvalidGrant(
                "this target takes no resources".into(),
            ));
        }
    }
    Ok(body)
}

#[async_trait]
impl CredentialProvider for VaultProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Vault
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        match self.target(req.lease)? {
            VaultTarget::Token {
                role,
                allowed_policies,
            } => self.mint_token(&req, role, allowed_policies).await,
            t @ VaultTarget::Dynamic { .. } => self.mint_dynamic(&req, t).await,
        }
    }

    async fn activated(&self, lease: &Lease) -> Result<(), ProviderError> {
        let (Some(accessor), Some(to)) = (
            handle_str(lease, "accessor"),
            handle_i64(lease, "extend_to"),
        ) else {
            return Ok(());
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let increment = u64::try_from(to - now).unwrap_or(0).max(1);
        let resp = self
            .call(
                Method::POST,
                "auth/token/renew-accessor",
                Some(&json!({"accessor": accessor, "increment": format!("{increment}s")})),
            )
            .await?;
        let got = resp.auth.map(|a| a.lease_duration).unwrap_or(0);
        // Vault caps the TTL by the role's and mount's maximum: a token that would die
        // well before its lease is a configuration error, not a credential to hand out.
        if got + 5 < increment {
            return Err(ProviderError::Rejected(format!(
                "vault granted the token {got} s of the lease's {increment} s \
                 (token role or mount max_ttl is below limits.max_lease_ttl)"
            )));
        }
        Ok(())
    }

    async fn revoke(&self, lease: &Lease) -> Result<Revocation, ProviderError> {
        let target = self.target(lease)?;
        match (target, handle_str(lease, "kind")) {
            (_, Some("token")) => {
                let accessor = handle_str(lease, "accessor")
                    .ok_or_else(|| ProviderError::Revoke("handle lacks the accessor".into()))?;
                self.revoke_accessor(accessor).await?;
                Ok(Revocation::Revoked)
            }
            (_, Some("dynamic")) => {
                let id = handle_str(lease, "vault_lease_id").ok_or_else(|| {
                    ProviderError::Revoke("handle lacks the vault lease id".into())
                })?;
                self.call(
                    Method::PUT,
                    "sys/leases/revoke",
                    Some(&json!({"lease_id": id})),
                )
                .await?;
                Ok(Revocation::Revoked)
            }
            // Never activated (a crash or a failed mint): whatever Vault may have
            // minted is unknown to Mayfly and dies by its own TTL.
            (VaultTarget::Token { .. }, _) => Ok(Revocation::ExpiresOnly {
                at: lease.issued_at + self.cfg.pending_ttl + self.cfg.timeout,
            }),
            (VaultTarget::Dynamic { max_ttl, .. }, _) => Ok(Revocation::ExpiresOnly {
                at: lease.issued_at + *max_ttl + self.cfg.timeout,
            }),
        }
    }

    fn outlives_lease(&self, lease: &Lease) -> bool {
        match handle_str(lease, "kind") {
            // Renewable (so Mayfly can extend it once active), and OpenBao does not hold
            // a role token's renewals to its explicit_max_ttl: its holder could keep it
            // past the lease. Revoke it at the lease's end.
            Some("token") => true,
            _ => handle_i64(lease, "vault_expires_at")
                .is_some_and(|t| t > lease.expires_at.unix_timestamp() + 2),
        }
    }

    async fn ready(&self) -> Result<(), ProviderError> {
        // Authenticated: proves the address, the TLS trust and Mayfly's own token.
        self.call(Method::GET, "auth/token/lookup-self", None)
            .await
            .map(|_| ())
    }
}
