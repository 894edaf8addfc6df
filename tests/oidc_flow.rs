#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! OIDC workload tokens against a real issuer (npm oauth2-mock-server on loopback) and
//! the real `mayfly` binary: RFC 8693 exchange for a GitHub-Actions-shaped token under a
//! Cedar policy that allows one repository and ref, bearer tokens on /v1 routes, and
//! JWKS rotation while the broker runs.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const AUD: &str = "https://mayfly.test";
const TARGET: &str = "https://deploy.example";
const COOLDOWN_SECS: u64 = 3;

struct Env {
    _dir: tempfile::TempDir,
    pki: Pki,
    server: Server,
    oidc: OidcIssuer,
    audit: std::path::PathBuf,
}

fn ci_policy(issuer: &str) -> String {
    let when = format!(
        r#"principal has issuer && principal.issuer == "{issuer}" &&
  context.posture.claims has repository && context.posture.claims.repository == "acme/app" &&
  context.posture.claims has ref && context.posture.claims.ref == "refs/heads/main" &&
  resource.provider == "jwt" && resource.uri == "{TARGET}""#
    );
    format!(
        "@id(\"ci-declare\")\npermit (principal, action == Mayfly::Action::\"DeclareTask\", resource)\nwhen {{ {when} }};\n\
         @id(\"ci-mint\")\npermit (principal, action == Mayfly::Action::\"MintCredential\", resource)\nwhen {{ {when} }};\n"
    )
}

fn start() -> Env {
    start_with(ci_policy)
}

fn start_with(policy: fn(&str) -> String) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let oidc = OidcIssuer::start();
    let extra = format!(
        r#"
[[oidc_issuers]]
issuer = "{iss}"
audiences = ["{AUD}"]
algorithms = ["ES256"]
typ = ["JWT"]
allow_insecure_http = true
jwks_ttl = "10m"
refetch_cooldown = "{COOLDOWN_SECS}s"
job_claims = ["run_id", "run_attempt"]
max_exchange_ttl = "30m"
# One loopback source plays both the attacker (forged tokens) and the CI job here.
[limits]
unauth_burst_per_source = 1000
"#,
        iss = oidc.issuer
    );
    let opts = ConfigOptions {
        extra,
        ..ConfigOptions::default()
    };
    let config = write_config(dir.path(), &pki, &opts);
    std::fs::write(dir.path().join("policies/ci.cedar"), policy(&oidc.issuer)).expect("policy");
    let server = Server::serve(&config);
    let audit = dir.path().join("audit.jsonl");
    Env {
        _dir: dir,
        pki,
        server,
        oidc,
        audit,
    }
}

fn github_claims(repository: &str, git_ref: &str) -> Value {
    json!({
        "aud": AUD,
        "sub": format!("repo:{repository}:ref:{git_ref}"),
        "repository": repository,
        "repository_id": "1234",
        "ref": git_ref,
        "workflow_ref": format!("{repository}/.github/workflows/deploy.yml@{git_ref}"),
        "environment": "production",
        "run_id": "987654",
        "run_attempt": "1",
        "actor": "octocat",
    })
}

async fn exchange(env: &Env, form: &[(&str, &str)]) -> (u16, Value, String) {
    let r = client(&env.pki.bundle_a, None)
        .post(env.server.url("/v1/token"))
        .form(form)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, r.json().await.unwrap_or(Value::Null), ctype)
}

fn exchange_form(token: &str) -> Vec<(&str, &str)> {
    vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", token),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", TARGET),
        ("scope", "deploy:write"),
    ]
}

#[tokio::test]
async fn a_github_actions_token_is_exchanged_for_a_jwt_credential_for_one_repository_and_ref() {
    let env = start();
    let token = env
        .oidc
        .mint(github_claims("acme/app", "refs/heads/main"))
        .await;

    let (s, body, ctype) = exchange(&env, &exchange_form(&token)).await;
    assert_eq!(s, 200, "{body}\n{}", env.server.logs());
    assert!(ctype.starts_with("application/json"), "{ctype}");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "deploy:write");
    assert!(body["expires_in"].as_i64().expect("expires_in") > 0);
    let access = jwt_payload(body["access_token"].as_str().expect("access_token"));
    let principal = format!("{}#repo:acme/app:ref:refs/heads/main", env.oidc.issuer);
    assert_eq!(access["sub"], principal.as_str());
    assert_eq!(access["aud"], TARGET);
    assert_eq!(access["iss"], "https://mayfly.test");
    assert_eq!(access["jti"], body["mayfly_lease_id"]);

    // The same job exchanging again reuses its implicit task.
    let (s, again, _) = exchange(&env, &exchange_form(&token)).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["mayfly_task_id"], body["mayfly_task_id"]);
    assert_ne!(again["mayfly_lease_id"], body["mayfly_lease_id"]);

    // Another repository, or another ref of the same one: denied by the policy.
    for (repo, git_ref) in [
        ("evil/app", "refs/heads/main"),
        ("acme/app", "refs/heads/feature"),
    ] {
        let other = env.oidc.mint(github_claims(repo, git_ref)).await;
        let (s, err, ctype) = exchange(&env, &exchange_form(&other)).await;
        assert_eq!(
            (s, err["error"].as_str()),
            (400, Some("invalid_target")),
            "{err}"
        );
        assert!(
            ctype.starts_with("application/json"),
            "not problem+json: {ctype}"
        );
    }

    // RFC 6749 §5.2 errors for malformed requests and bad subject tokens.
    let mut wrong_grant = exchange_form(&token);
    wrong_grant[0].1 = "client_credentials";
    let (s, err, _) = exchange(&env, &wrong_grant).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let (s, err, _) = exchange(&env, &exchange_form("not.a.jwt")).await;
    assert_eq!((s, err["error"].as_str()), (400, Some("invalid_grant")));
    let mut no_target = exchange_form(&token);
    no_target.retain(|(k, _)| *k != "resource");
    let (s, err, _) = exchange(&env, &no_target).await;
    assert_eq!((s, err["error"].as_str()), (400, Some("invalid_request")));
    let no_job = env
        .oidc
        .mint(json!({"aud": AUD, "sub": "repo:acme/app:ref:refs/heads/main", "repository": "acme/app", "ref": "refs/heads/main"}))
        .await;
    let (s, err, _) = exchange(&env, &exchange_form(&no_job)).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("unauthorized_client"))
    );

    // Every exchange is audited, with Mayfly's specific code beside the OAuth error.
    let records = audit_records(&env.audit);
    let token_records: Vec<&Value> = records
        .iter()
        .filter(|r| r["route"] == "/v1/token")
        .collect();
    assert_eq!(token_records.len(), 8, "{token_records:?}");
    assert!(
        token_records
            .iter()
            .any(|r| r["principal"] == principal.as_str() && r["status"] == 200)
    );
    assert!(token_records.iter().any(|r| r["code"] == "token_malformed"));
}

#[tokio::test]
async fn oidc_bearer_tokens_work_on_v1_routes_and_jwks_rotation_needs_no_restart() {
    let env = start();
    let anon = client(&env.pki.bundle_a, None);
    let tasks = env.server.url("/v1/tasks");
    let declare = |token: String| {
        let anon = anon.clone();
        let tasks = tasks.clone();
        async move {
            let r = anon
                .post(&tasks)
                .bearer_auth(token)
                .json(&json!({
                    "purpose": "deploy",
                    "scope": [{"provider": "jwt", "target": TARGET, "actions": ["deploy:write"]}],
                    "ttl": "10m"
                }))
                .send()
                .await
                .expect("send");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let claims = github_claims("acme/app", "refs/heads/main");
    let old_key_token = env.oidc.mint(claims.clone()).await;
    let (s, body) = declare(old_key_token.clone()).await;
    assert_eq!(s, 201, "{body}\n{}", env.server.logs());
    assert!(env.oidc.jwks_fetches().await >= 1);

    // A client certificate and a bearer token together: refused, never merged.
    let with_cert = env.pki.client_as("agent", AGENT);
    let r = with_cert
        .post(&tasks)
        .bearer_auth(&old_key_token)
        .json(&task_body("10m"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.json::<Value>().await.expect("json")["code"],
        "ambiguous_credentials"
    );

    // The issuer rotates; after the cooldown the new kid is fetched on first sight.
    tokio::time::sleep(Duration::from_millis(COOLDOWN_SECS * 1000 + 200)).await;
    let new_kid = env.oidc.rotate().await;
    let new_key_token = env.oidc.mint(claims.clone()).await;
    let header: Value = {
        use base64::Engine;
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(new_key_token.split('.').next().expect("h"))
                .expect("b64"),
        )
        .expect("json")
    };
    assert_eq!(header["kid"], new_kid.as_str());
    let (s, body) = declare(new_key_token.clone()).await;
    assert_eq!(s, 201, "token signed by the rotated-in key: {body}");

    // A flood of random kids: each is refused, and the issuer sees at most one JWKS
    // request per cooldown.
    let before = env.oidc.jwks_fetches().await;
    let started = Instant::now();
    let (_, rest) = new_key_token.split_once('.').expect("jws");
    for i in 0..40 {
        use base64::Engine;
        let h = json!({"alg": "ES256", "typ": "JWT", "kid": format!("random-{i}")});
        let forged = format!(
            "{}.{rest}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.to_string())
        );
        let (s, body) = declare(forged).await;
        assert_eq!((s, body["code"].as_str()), (401, Some("token_unknown_kid")));
    }
    let windows = started.elapsed().as_secs() / COOLDOWN_SECS + 1;
    let fetched = env.oidc.jwks_fetches().await - before;
    assert!(
        fetched <= windows,
        "{fetched} JWKS fetches for 40 random kids in {} windows",
        windows
    );

    // The issuer goes down: keys already held keep working.
    let still_valid = new_key_token;
    env.oidc.stop();
    let (s, body) = declare(still_valid).await;
    assert_eq!(
        s, 201,
        "cached keys must be served while the issuer is down: {body}"
    );
}

const HELD_TARGET: &str = "https://held.example";
const DEPLOY_WORKFLOW: &str = "acme/app/.github/workflows/deploy.yml@refs/heads/main";
const TESTS_WORKFLOW: &str = "acme/app/.github/workflows/tests.yml@refs/heads/main";

/// Only the deploy workflow may declare a task; minting is open to the issuer (one
/// target held for an operator's approval), so that every refusal below comes from the
/// task's binding or from `DeclareTask`, never from `MintCredential`.
fn deploy_only_policy(issuer: &str) -> String {
    format!(
        r#"@id("deploy-declare")
permit (principal, action == Mayfly::Action::"DeclareTask", resource)
when {{ principal has issuer && principal.issuer == "{issuer}" &&
  context.posture.claims has job_workflow_ref &&
  context.posture.claims.job_workflow_ref == "{DEPLOY_WORKFLOW}" &&
  resource.provider == "jwt" }};
@id("ci-mint")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when {{ principal has issuer && principal.issuer == "{issuer}" && resource.uri == "{TARGET}" }};
@id("ci-mint-held") @approval("required")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when {{ principal has issuer && principal.issuer == "{issuer}" && resource.uri == "{HELD_TARGET}" }};
"#
    )
}

/// One job of GitHub run 79: every job of a run shares `sub`, `run_id`, `run_attempt`.
fn run79_job(workflow: &str, environment: &str) -> Value {
    let mut c = github_claims("acme/app", "refs/heads/main");
    c["run_id"] = json!("79");
    c["job_workflow_ref"] = json!(workflow);
    c["environment"] = json!(environment);
    c
}

fn form_for<'a>(token: &'a str, target: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut f = exchange_form(token);
    for kv in &mut f {
        if kv.0 == "resource" {
            kv.1 = target;
        }
    }
    f
}

async fn bearer_call(
    env: &Env,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = client(&env.pki.bundle_a, None)
        .request(method, env.server.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("send");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// Issue #18: an implicit CI task is bound to the claims of the job that declared it,
/// and every use asks Cedar `DeclareTask` again for the current caller.
#[tokio::test]
async fn an_implicit_ci_task_serves_only_the_job_whose_claims_declared_it() {
    let env = start_with(deploy_only_policy);
    let tests_job = env.oidc.mint(run79_job(TESTS_WORKFLOW, "production")).await;
    let deploy_job = env
        .oidc
        .mint(run79_job(DEPLOY_WORKFLOW, "production"))
        .await;
    // Same sub, run id and workflow as the deploy job (the policy allows it), but other
    // claims: another job as far as Mayfly can tell.
    let sibling = env.oidc.mint(run79_job(DEPLOY_WORKFLOW, "staging")).await;

    // The tests job is refused before the deploy job declared its task…
    let (s, err, _) = exchange(&env, &exchange_form(&tests_job)).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("invalid_target")),
        "{err}"
    );
    assert!(err.get("access_token").is_none());

    let (s, deploy, _) = exchange(&env, &exchange_form(&deploy_job)).await;
    assert_eq!(s, 200, "{deploy}\n{}", env.server.logs());
    let task = deploy["mayfly_task_id"].as_str().expect("task").to_string();

    // …and after it: no credential under the deploy job's task.
    let (s, err, _) = exchange(&env, &exchange_form(&tests_job)).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("invalid_target")),
        "{err}"
    );
    assert!(err.get("access_token").is_none());

    // A fresh token of the deploy job (new iat/jti, same claims) finds the same task.
    let deploy_again = env
        .oidc
        .mint(run79_job(DEPLOY_WORKFLOW, "production"))
        .await;
    assert_ne!(deploy_again, deploy_job);
    let (s, again, _) = exchange(&env, &exchange_form(&deploy_again)).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["mayfly_task_id"], task.as_str());

    // The sibling is allowed to declare, so it gets a task of its own.
    let (s, own, _) = exchange(&env, &exchange_form(&sibling)).await;
    assert_eq!(s, 200, "{own}");
    assert_ne!(
        own["mayfly_task_id"],
        task.as_str(),
        "a job with other claims shares no task"
    );

    // Neither other token can request under, read, delegate or complete the task.
    let cred = json!({"provider": "jwt", "target": TARGET});
    for (who, token) in [("tests job", &tests_job), ("sibling", &sibling)] {
        let (s, b) = bearer_call(
            &env,
            reqwest::Method::POST,
            &format!("/v1/tasks/{task}/credentials"),
            token,
            Some(cred.clone()),
        )
        .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (403, Some("task_claims_differ")),
            "{who}: {b}"
        );
        let (s, b) = bearer_call(
            &env,
            reqwest::Method::GET,
            &format!("/v1/tasks/{task}"),
            token,
            None,
        )
        .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (403, Some("task_claims_differ")),
            "{who}: {b}"
        );
        let (s, b) = bearer_call(
            &env,
            reqwest::Method::POST,
            &format!("/v1/tasks/{task}/complete"),
            token,
            None,
        )
        .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (403, Some("task_claims_differ")),
            "{who}: {b}"
        );
    }
    // The deploy job itself still can.
    let (s, b) = bearer_call(
        &env,
        reqwest::Method::POST,
        &format!("/v1/tasks/{task}/credentials"),
        &deploy_job,
        Some(cred.clone()),
    )
    .await;
    assert_eq!(s, 201, "{b}");

    // Approvals held under the deploy job's task: visible and collectable by it alone.
    let (s, held, _) = exchange(&env, &form_for(&deploy_job, HELD_TARGET)).await;
    assert_eq!(
        (s, held["error"].as_str()),
        (400, Some("authorization_pending")),
        "{held}"
    );
    let desc = held["error_description"].as_str().expect("description");
    let approval = desc
        .split_whitespace()
        .find(|w| w.starts_with("apr_"))
        .expect("approval id")
        .to_string();
    let url = format!("/v1/approvals/{approval}");
    for token in [&tests_job, &sibling] {
        let (s, b) = bearer_call(&env, reqwest::Method::GET, &url, token, None).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (404, Some("approval_not_found")),
            "{b}"
        );
    }
    let operator = env.pki.client_as("operator", OPERATOR);
    let (s, b) = post_json(
        &operator,
        &env.server.url(&url),
        json!({"decision": "approve", "reason": "release"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    for token in [&tests_job, &sibling] {
        let (s, b) = bearer_call(&env, reqwest::Method::GET, &url, token, None).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (404, Some("approval_not_found")),
            "{b}"
        );
    }
    let (s, b) = bearer_call(&env, reqwest::Method::GET, &url, &deploy_job, None).await;
    assert_eq!(
        s, 201,
        "the refused callers did not use the approval up: {b}"
    );
    assert_eq!(b["credential"]["token_type"], "Bearer", "{b}");

    // Completing is the deploy job's to do.
    let (s, b) = bearer_call(
        &env,
        reqwest::Method::POST,
        &format!("/v1/tasks/{task}/complete"),
        &deploy_job,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
}
