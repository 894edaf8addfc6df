#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The `vault` provider against a real OpenBao dev server: token grants cut to policies,
//! dynamic PKI secrets with real Vault leases, revocation with the task, upstream
//! failures, the rate limit, and a crash between mint and activation.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const VAULT_POLICY: &str = r#"
@id("agents-vault-declare")
permit (principal, action == Mayfly::Action::"DeclareTask", resource)
when { principal.path like "/agent/*" && resource.provider == "vault" };

@id("agents-vault-mint")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { principal.path like "/agent/*" && resource.provider == "vault" };
"#;

/// Mayfly's own Vault policy: exactly what the provider needs.
const MAYFLY_VAULT_POLICY: &str = r#"
path "auth/token/create/mayfly-agent" { capabilities = ["update"] }
path "auth/token/renew-accessor" { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "pki/issue/agent" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"#;

/// Sets up OpenBao: a KV secret the agent may read and one it may not, the `app-read`
/// policy, a token role, a PKI mount issuing leased certificates, and Mayfly's own token
/// (written to `token_file`).
async fn provision(bao: &Bao, token_file: &Path) {
    bao.root(
        "PUT",
        "sys/policies/acl/app-read",
        Some(json!({"policy": "path \"secret/data/app/*\" { capabilities = [\"read\"] }"})),
    )
    .await;
    bao.root(
        "PUT",
        "sys/policies/acl/mayfly",
        Some(json!({"policy": MAYFLY_VAULT_POLICY})),
    )
    .await;
    bao.root(
        "POST",
        "secret/data/app/config",
        Some(json!({"data": {"db": "app-db"}})),
    )
    .await;
    bao.root(
        "POST",
        "secret/data/other/config",
        Some(json!({"data": {"db": "other-db"}})),
    )
    .await;
    bao.root(
        "POST",
        "auth/token/roles/mayfly-agent",
        Some(json!({"allowed_policies": ["app-read", "admin"], "orphan": true, "renewable": true})),
    )
    .await;
    bao.root("POST", "sys/mounts/pki", Some(json!({"type": "pki"})))
        .await;
    bao.root(
        "POST",
        "sys/mounts/pki/tune",
        Some(json!({"max_lease_ttl": "24h"})),
    )
    .await;
    bao.root(
        "POST",
        "pki/root/generate/internal",
        Some(json!({"common_name": "test root", "ttl": "24h"})),
    )
    .await;
    bao.root(
        "POST",
        "pki/roles/agent",
        Some(json!({
            "allowed_domains": ["agents.example.org"],
            "allow_subdomains": true,
            "generate_lease": true,
            "max_ttl": "1h",
        })),
    )
    .await;
    let t = bao
        .root(
            "POST",
            "auth/token/create",
            Some(json!({"policies": ["mayfly"], "no_default_policy": true, "ttl": "1h"})),
        )
        .await;
    std::fs::write(
        token_file,
        t["auth"]["client_token"].as_str().expect("token"),
    )
    .expect("write");
}

fn vault_config(addr: &str, token_file: &Path, extra: &str) -> String {
    format!(
        r#"
[limits]
pending_timeout = "3s"
principal_rate_share = 1.0
[anomaly]
rules = []
[providers.vault]
address = "{addr}"
token_file = {token_file:?}
allow_insecure_http = true
timeout = "3s"
{extra}
[providers.vault.targets.app]
kind = "token"
token_role = "mayfly-agent"
allowed_policies = ["app-read"]
[providers.vault.targets.certs]
kind = "dynamic"
path = "pki/issue/agent"
method = "POST"
ttl_param = "ttl"
resource_param = "common_name"
max_ttl = "1h"
[providers.vault.targets.forbidden]
kind = "dynamic"
path = "pki/issue/other"
method = "POST"
max_ttl = "1h"
"#
    )
}

struct Env {
    dir: tempfile::TempDir,
    pki: Pki,
    bao: Bao,
    server: Server,
}

async fn start(extra: &str) -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let bao = Bao::start();
    let token_file = dir.path().join("vault-token");
    provision(&bao, &token_file).await;
    let opts = ConfigOptions {
        extra: vault_config(&bao.addr, &token_file, extra),
        ..Default::default()
    };
    let config = write_config(dir.path(), &pki, &opts);
    std::fs::write(dir.path().join("policies/vault.cedar"), VAULT_POLICY).expect("policy");
    let server = Server::serve(&config);
    Env {
        dir,
        pki,
        bao,
        server,
    }
}

impl Env {
    fn agent(&self) -> reqwest::Client {
        self.pki.client_as("agent", AGENT)
    }
    fn operator(&self) -> reqwest::Client {
        self.pki.client_as("operator", OPERATOR)
    }
    async fn declare(&self, scope: Value) -> String {
        let (s, b) = post_json(
            &self.agent(),
            &self.server.url("/v1/tasks"),
            json!({"purpose": "rotate the app's database password", "scope": scope, "ttl": "10m"}),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        b["task_id"].as_str().expect("task").to_string()
    }
    async fn mint(&self, task: &str, body: Value) -> (u16, Value) {
        post_json(
            &self.agent(),
            &self.server.url(&format!("/v1/tasks/{task}/credentials")),
            body,
        )
        .await
    }
    async fn leases(&self, task: &str) -> Vec<Value> {
        let (s, b) = get(
            &self.operator(),
            &self.server.url(&format!("/v1/leases?task={task}")),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        b["items"].as_array().expect("items").clone()
    }
}

fn scope() -> Value {
    json!([
        {"provider": "vault", "target": "app", "actions": ["app-read", "admin"]},
        {"provider": "vault", "target": "certs", "actions": ["read"], "resources": ["agent-1.agents.example.org"]},
        {"provider": "vault", "target": "forbidden", "actions": ["read"]},
    ])
}

#[tokio::test]
async fn token_grant_reads_only_its_policy_and_dies_with_the_task() {
    let env = start("").await;
    let task = env.declare(scope()).await;

    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "vault", "target": "app", "actions": ["app-read"], "ttl": "2m"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let token = b["credential"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    assert!(b["credential"]["accessor"].is_string(), "{b}");
    assert!(
        b["credential"]["policies"]
            .as_array()
            .expect("policies")
            .contains(&json!("app-read")),
        "{b}"
    );
    let lease_id = b["lease_id"].as_str().expect("lease").to_string();

    // Reads what its policy allows, nothing else.
    let (s, v) = env
        .bao
        .call(&token, "GET", "secret/data/app/config", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["data"]["db"], "app-db");
    let (s, _) = env
        .bao
        .call(&token, "GET", "secret/data/other/config", None)
        .await;
    assert_eq!(s, 403);

    // Intent in the credential: task, lease and principal in the token's metadata.
    let (s, me) = env
        .bao
        .call(&token, "GET", "auth/token/lookup-self", None)
        .await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["data"]["meta"]["mayfly_task"], task.as_str());
    assert_eq!(me["data"]["meta"]["mayfly_lease"], lease_id.as_str());
    assert_eq!(me["data"]["meta"]["mayfly_principal"], AGENT);

    // Created with a TTL no longer than the pending timeout (3 s), extended to the lease
    // once active: it outlives the pending timeout.
    assert!(me["data"]["ttl"].as_u64().expect("ttl") > 60, "{me}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (s, _) = env
        .bao
        .call(&token, "GET", "secret/data/app/config", None)
        .await;
    assert_eq!(
        s, 200,
        "the token must live past the pending timeout once active"
    );

    // A policy in the task's scope but outside the target's allow-list: refused.
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "vault", "target": "app", "actions": ["admin"]}),
        )
        .await;
    assert_eq!(s, 403, "{b}");
    assert_eq!(b["code"], "provider_not_allowed");

    // Dynamic secret: a leased PKI certificate for exactly the granted name.
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "vault", "target": "certs", "ttl": "5m"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let vault_lease = b["credential"]["vault_lease_id"]
        .as_str()
        .expect("vault lease")
        .to_string();
    assert!(vault_lease.starts_with("pki/issue/agent/"), "{vault_lease}");
    let cert = b["credential"]["data"]["certificate"]
        .as_str()
        .expect("cert");
    assert!(cert.contains("BEGIN CERTIFICATE"));
    let (s, l) = env
        .bao
        .call(
            "root",
            "PUT",
            "sys/leases/lookup",
            Some(json!({"lease_id": vault_lease})),
        )
        .await;
    assert_eq!(s, 200, "{l}");
    let ttl = l["data"]["ttl"].as_u64().expect("ttl");
    assert!(ttl <= 300, "Vault's lease follows the lease TTL: {ttl}");

    // Completing the task revokes both at Vault.
    let (s, b) = post_json(
        &env.agent(),
        &env.server.url(&format!("/v1/tasks/{task}/complete")),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = env
        .bao
        .call(&token, "GET", "secret/data/app/config", None)
        .await;
    assert_eq!(s, 403, "the token must be dead after the task completes");
    let (s, _) = env
        .bao
        .call(
            "root",
            "PUT",
            "sys/leases/lookup",
            Some(json!({"lease_id": vault_lease})),
        )
        .await;
    assert_eq!(s, 400, "the PKI lease must be revoked at Vault");
    for l in env.leases(&task).await {
        assert_eq!(l["state"], "revoked", "{l}");
        assert!(l["dies_at"].is_null(), "vault revocation is immediate: {l}");
    }

    // Secrets never reach the audit trail.
    let audit = audit_text(&env.dir.path().join("audit.jsonl"));
    assert!(!audit.contains(&token));
    assert!(!audit.contains("BEGIN CERTIFICATE"));
    assert!(!audit.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn upstream_failures_map_to_specific_errors_and_leave_no_active_lease() {
    let mut env = start("").await;
    let task = env.declare(scope()).await;

    // Mayfly's token may not use pki/issue/other: Vault's 403 → 502 with its reason.
    let (s, b) = env
        .mint(&task, json!({"provider": "vault", "target": "forbidden"}))
        .await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["code"], "upstream_denied");
    assert!(
        b["detail"]
            .as_str()
            .expect("detail")
            .contains("permission denied"),
        "{b}"
    );

    // A grant the target cannot express: 400.
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "vault", "target": "certs", "resources": []}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["code"], "invalid_provider_grant");

    // Vault gone: 503, and nothing stays active.
    env.bao.stop();
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "vault", "target": "app", "actions": ["app-read"]}),
        )
        .await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["code"], "provider_unavailable");
    for l in env.leases(&task).await {
        assert_ne!(l["state"], "active", "{l}");
        assert_ne!(l["state"], "pending", "{l}");
    }
}

#[tokio::test]
async fn over_the_rate_limit_is_429_with_retry_after_and_writes_nothing() {
    let env = start("rate_limit_per_second = 0.2\nrate_limit_burst = 2").await;
    let task = env.declare(scope()).await;
    let body = json!({"provider": "vault", "target": "app", "actions": ["app-read"]});
    for _ in 0..2 {
        let (s, b) = env.mint(&task, body.clone()).await;
        assert_eq!(s, 201, "{b}");
    }
    let r = env
        .agent()
        .post(env.server.url(&format!("/v1/tasks/{task}/credentials")))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=5).contains(&retry), "{retry}");
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["code"], "rate_limited");
    assert_eq!(
        env.leases(&task).await.len(),
        2,
        "a refused request writes no lease"
    );
}

/// A crash after Vault minted the token but before the lease became active: the token
/// was created with a TTL of the pending timeout, so it dies on its own, and the reaper
/// reports the lease as revoked with that death time.
#[tokio::test]
async fn token_minted_before_a_crash_dies_within_the_pending_timeout() {
    use mayfly::audit::{AuditEvent, AuditScope};
    use mayfly::broker::{BrokerError, FaultHook, FaultPoint};
    use mayfly::config::Config;
    use mayfly::task::{CredentialRequest, RawCredentialRequest, RawTaskRequest, TaskRequest};

    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let bao = Bao::start();
    let token_file = dir.path().join("vault-token");
    provision(&bao, &token_file).await;
    let opts = ConfigOptions {
        extra: vault_config(&bao.addr, &token_file, ""),
        ..Default::default()
    };
    let path = write_config(dir.path(), &pki, &opts);
    std::fs::write(dir.path().join("policies/vault.cedar"), VAULT_POLICY).expect("policy");
    let config = Config::load(&path).expect("config");
    let hook: FaultHook = std::sync::Arc::new(|p, _| p == FaultPoint::AfterMint);
    let app = mayfly::app::App::build_with_faults(&config, Some(hook))
        .await
        .expect("build");

    let caller = verified(&pki, &pki.svid("agent", AGENT));
    let ev = AuditScope::new(AuditEvent::new("test"));
    let raw: RawTaskRequest =
        serde_json::from_value(json!({"purpose": "p", "scope": scope(), "ttl": "10m"}))
            .expect("raw");
    let task = app
        .broker
        .declare_task(&caller, TaskRequest::try_from(raw).expect("valid"), &ev)
        .await
        .expect("declare");
    let raw: RawCredentialRequest = serde_json::from_value(
        json!({"provider": "vault", "target": "app", "actions": ["app-read"], "ttl": "5m"}),
    )
    .expect("raw");
    match app
        .broker
        .request_credential(
            &caller,
            &task.id,
            CredentialRequest::try_from(raw).expect("valid"),
            &ev,
        )
        .await
    {
        Err(BrokerError::InjectedCrash(FaultPoint::AfterMint)) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("expected the injected crash"),
    }

    // Vault holds a token for the lease Mayfly never activated.
    let leases = app.store.task_leases(&task.id).await.expect("leases");
    assert_eq!(leases.len(), 1);
    let lease = &leases[0];
    assert_eq!(lease.state, mayfly::lease::LeaseState::Pending);
    let accessors = bao.root("LIST", "auth/token/accessors", None).await;
    let mut found = None;
    for a in accessors["data"]["keys"].as_array().expect("keys") {
        let v = bao
            .root(
                "POST",
                "auth/token/lookup-accessor",
                Some(json!({"accessor": a})),
            )
            .await;
        if v["data"]["meta"]["mayfly_lease"] == lease.id.as_str() {
            found = Some((a.as_str().expect("accessor").to_string(), v));
        }
    }
    let (accessor, v) = found.expect("the crashed mint's token exists at Vault");
    let ttl = v["data"]["ttl"].as_u64().expect("ttl");
    assert!(
        ttl <= 3,
        "created with the pending timeout as TTL, got {ttl}"
    );

    // It dies on its own (Vault's clock: its TTL is the pending timeout, checked above)...
    let gone = eventually(Duration::from_secs(10), || async {
        let (s, _) = bao
            .call(
                "root",
                "POST",
                "auth/token/lookup-accessor",
                Some(json!({"accessor": accessor})),
            )
            .await;
        (s != 200).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the orphaned token must have expired");

    // ...and the reaper, run as of past the pending timeout, ends the stale pending lease
    // saying when it died.
    app.revoker
        .reap_once(lease.issued_at + Duration::from_secs(4))
        .await
        .expect("reap");
    let l = app
        .store
        .lease(&lease.id)
        .await
        .expect("load")
        .expect("lease");
    assert_eq!(l.state, mayfly::lease::LeaseState::Revoked, "{l:?}");
    let dies = l.dies_at.expect("dies_at");
    assert!(
        dies <= lease.issued_at + Duration::from_secs(3 + 3 + 1),
        "{dies}"
    );
}

#[tokio::test]
async fn approle_login_and_token_file_rotation() {
    let env = start("").await;
    // Rotate Mayfly's token file to a fresh token: picked up without restart.
    let token_file = env.dir.path().join("vault-token");
    let old = std::fs::read_to_string(&token_file).expect("old");
    let t = env
        .bao
        .root(
            "POST",
            "auth/token/create",
            Some(json!({"policies": ["mayfly"], "no_default_policy": true, "ttl": "1h"})),
        )
        .await;
    std::fs::write(&token_file, t["auth"]["client_token"].as_str().expect("t")).expect("write");
    env.bao
        .root(
            "POST",
            "auth/token/revoke",
            Some(json!({"token": old.trim()})),
        )
        .await;
    let task = env.declare(scope()).await;
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "vault", "target": "app", "actions": ["app-read"]}),
        )
        .await;
    assert_eq!(s, 201, "the rotated token file must be re-read: {b}");

    // AppRole: a second broker logs in with role_id + secret_id.
    env.bao
        .root("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
        .await;
    env.bao
        .root(
            "POST",
            "auth/approle/role/mayfly",
            Some(json!({"token_policies": ["mayfly"], "token_ttl": "1h"})),
        )
        .await;
    let role_id = env
        .bao
        .root("GET", "auth/approle/role/mayfly/role-id", None)
        .await["data"]["role_id"]
        .as_str()
        .expect("role id")
        .to_string();
    let secret_id = env
        .bao
        .root("POST", "auth/approle/role/mayfly/secret-id", None)
        .await["data"]["secret_id"]
        .as_str()
        .expect("secret id")
        .to_string();
    let dir2 = tempfile::tempdir().expect("tmp");
    let pki2 = Pki::new(dir2.path());
    std::fs::write(dir2.path().join("secret-id"), secret_id).expect("write");
    let extra = vault_config(&env.bao.addr, &token_file, "").replace(
        &format!("token_file = {token_file:?}"),
        &format!(
            "approle = {{ role_id = \"{role_id}\", secret_id_file = {:?} }}",
            dir2.path().join("secret-id")
        ),
    );
    let config = write_config(
        dir2.path(),
        &pki2,
        &ConfigOptions {
            extra,
            ..Default::default()
        },
    );
    std::fs::write(dir2.path().join("policies/vault.cedar"), VAULT_POLICY).expect("policy");
    let server2 = Server::serve(&config);
    let agent2 = pki2.client_as("agent", AGENT);
    let (s, b) = post_json(
        &agent2,
        &server2.url("/v1/tasks"),
        json!({"purpose": "p", "scope": scope(), "ttl": "10m"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let task2 = b["task_id"].as_str().expect("task");
    let (s, b) = post_json(
        &agent2,
        &server2.url(&format!("/v1/tasks/{task2}/credentials")),
        json!({"provider": "vault", "target": "app", "actions": ["app-read"]}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
}

/// `mayfly exec` hands a Vault token to the command as VAULT_TOKEN and revokes it after.
#[tokio::test]
async fn exec_puts_vault_token_in_the_environment_and_revokes_it_after() {
    let env = start("").await;
    let agent = env.pki.svid("agent-exec", AGENT);
    let task_file = env.dir.path().join("task.toml");
    std::fs::write(
        &task_file,
        "purpose = \"read app config\"\nttl = \"10m\"\n[[scope]]\nprovider = \"vault\"\ntarget = \"app\"\nactions = [\"app-read\"]\n",
    )
    .expect("task file");
    let seen = env.dir.path().join("seen-token");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["exec", "--task", task_file.to_str().expect("utf8")])
        .args(["--addr", &env.server.url("")])
        .args(["--cert", agent.cert.to_str().expect("utf8")])
        .args(["--key", agent.key.to_str().expect("utf8")])
        .args(["--ca", env.pki.bundle_a.to_str().expect("utf8")])
        .args([
            "--",
            "sh",
            "-c",
            "printf %s \"$VAULT_TOKEN\" > \"$1\"",
            "sh",
        ])
        .arg(&seen)
        .output()
        .expect("run mayfly exec");
    assert!(
        out.status.success(),
        "exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(&seen).expect("token written by the command");
    assert!(!token.is_empty());
    // Completed on exit: the token no longer works.
    let (s, _) = env
        .bao
        .call(&token, "GET", "secret/data/app/config", None)
        .await;
    assert_eq!(
        s, 403,
        "the exec'd task's token must be revoked after the command"
    );
}
