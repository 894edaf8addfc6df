#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The whole flow against the real `mayfly` binary over real mTLS.

mod common;

use common::*;
use mayfly::pki::LeafSpec;
use serde_json::json;
use std::time::Duration;

struct Env {
    _dir: tempfile::TempDir,
    pki: Pki,
    server: Server,
    audit: std::path::PathBuf,
}

fn start() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    // These tests probe scope and input handling on purpose: no anomaly rules here
    // (tests/anomaly.rs covers them).
    let opts = ConfigOptions {
        extra: "[anomaly]\nrules = []".into(),
        ..Default::default()
    };
    let config = write_config(dir.path(), &pki, &opts);
    let server = Server::serve(&config);
    let audit = dir.path().join("audit.jsonl");
    Env {
        _dir: dir,
        pki,
        server,
        audit,
    }
}

impl Env {
    fn as_id(&self, name: &str, id: &str) -> reqwest::Client {
        self.pki.client_as(name, id)
    }
    fn anonymous(&self) -> reqwest::Client {
        client(&self.pki.bundle_a, None)
    }
    fn with_spec(&self, name: &str, ca: &mayfly::pki::Ca, spec: LeafSpec) -> reqwest::Client {
        client(
            &self.pki.bundle_a,
            Some(&self.pki.issue_with(ca, name, &spec)),
        )
    }
}

async fn declare(env: &Env, c: &reqwest::Client, ttl: &str) -> String {
    let (s, body) = post_json(c, &env.server.url("/v1/tasks"), task_body(ttl)).await;
    assert_eq!(s, 201, "{body}");
    body["task_id"].as_str().expect("task_id").to_string()
}

async fn mint(
    env: &Env,
    c: &reqwest::Client,
    task: &str,
    req: serde_json::Value,
) -> (u16, serde_json::Value) {
    post_json(
        c,
        &env.server.url(&format!("/v1/tasks/{task}/credentials")),
        req,
    )
    .await
}

#[tokio::test]
async fn full_flow_declare_mint_introspect_complete() {
    let env = start();
    let agent = env.as_id("agent", AGENT);
    let task = declare(&env, &agent, "30m").await;

    let (s, issued) = mint(
        &env,
        &agent,
        &task,
        json!({"provider": "jwt", "target": "https://api.example.com", "actions": ["issues:read"], "ttl": "5m"}),
    )
    .await;
    assert_eq!(s, 201, "{issued}");
    assert_eq!(issued["credential"]["token_type"], "Bearer");
    let token = issued["credential"]["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let lease = issued["lease_id"].as_str().expect("lease").to_string();

    // The token carries intent: task, purpose, audience, scope, jti = lease.
    let payload = token.split('.').nth(1).expect("payload");
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("b64"),
    )
    .expect("claims");
    assert_eq!(claims["sub"], AGENT);
    assert_eq!(claims["aud"], "https://api.example.com");
    assert_eq!(claims["scope"], "issues:read");
    assert_eq!(claims["jti"], lease.as_str());
    assert_eq!(claims["task_id"], task.as_str());
    assert_eq!(claims["purpose"], "summarise open issues");

    // The JWKS verifies it.
    let (s, jwks) = get(&env.anonymous(), &env.server.url("/.well-known/jwks.json")).await;
    assert_eq!(s, 200);
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["keys"][0].clone()).expect("jwk");
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("key");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["https://api.example.com"]);
    v.set_issuer(&["https://mayfly.test"]);
    jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).expect("token verifies with JWKS");

    let introspect_url = env.server.url("/v1/introspect");
    assert_eq!(
        introspect(&agent, &introspect_url, &token).await["active"],
        true
    );

    // The owner sees the task and its lease.
    let (s, view) = get(&agent, &env.server.url(&format!("/v1/tasks/{task}"))).await;
    assert_eq!(s, 200);
    assert_eq!(view["leases"][0]["state"], "active");

    let t0 = std::time::Instant::now();
    let (s, done) = post_json(
        &agent,
        &env.server.url(&format!("/v1/tasks/{task}/complete")),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["revoked"], 1);
    let inactive = introspect(&agent, &introspect_url, &token).await;
    let elapsed = t0.elapsed();
    assert_eq!(inactive["active"], false);
    println!("completion -> active:false in {elapsed:?}");

    // Completed tasks mint nothing.
    let (s, body) = mint(
        &env,
        &agent,
        &task,
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    assert_eq!((s, body["code"].as_str()), (409, Some("task_not_active")));

    // Every step is in the audit chain, and the chain verifies.
    let records = audit_records(&env.audit);
    let mint_rec = records
        .iter()
        .find(|r| r["action"] == "MintCredential" && r["decision"] == "allow")
        .expect("mint record");
    assert_eq!(mint_rec["lease_id"], lease.as_str());
    assert!(
        mint_rec["credential_fingerprint"]
            .as_str()
            .expect("fp")
            .starts_with("sha256:")
    );
    let revoked = records
        .iter()
        .find(|r| r["kind"] == "lease.revoked")
        .expect("revocation record");
    assert_eq!(revoked["lease_id"], lease.as_str());
    let raw = audit_text(&env.audit);
    assert!(
        !raw.contains(&token),
        "the token must never reach the audit trail"
    );
    let out = run_cli(&["audit", "verify", env.audit.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn each_x509_svid_rule_violation_is_rejected_with_its_own_code() {
    use rcgen::KeyUsagePurpose as K;
    let env = start();
    let url = env.server.url("/v1/tasks");
    let ca_a = &env.pki.ca_a;
    let rogue = mayfly::pki::Ca::generate("rogue", TD_A).expect("rogue ca");

    let mut two_sans = LeafSpec::svid(AGENT, 1);
    two_sans.uris.push(AGENT2.into());
    let mut ca_leaf = LeafSpec::svid(AGENT, 1);
    ca_leaf.is_ca = true;
    let mut expired = LeafSpec::svid(AGENT, 1);
    expired.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(3);
    expired.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let mut no_digital_signature = LeafSpec::svid(AGENT, 1);
    no_digital_signature.key_usages = vec![K::KeyEncipherment];
    let mut cert_sign = LeafSpec::svid(AGENT, 1);
    cert_sign.key_usages = vec![K::DigitalSignature, K::KeyCertSign];
    let mut no_uri = LeafSpec::svid(AGENT, 1);
    no_uri.uris.clear();
    no_uri.dns = vec!["agent.a.test".into()];
    let mut server_only = LeafSpec::svid(AGENT, 1);
    server_only.extended = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];

    let cases: Vec<(&str, reqwest::Client, &str)> = vec![
        (
            "two URI SANs",
            env.with_spec("two", ca_a, two_sans),
            "svid_uri_san_count",
        ),
        (
            "no URI SAN",
            env.with_spec("nouri", ca_a, no_uri),
            "svid_uri_san_count",
        ),
        (
            "CA leaf",
            env.with_spec("caleaf", ca_a, ca_leaf),
            "svid_leaf_is_ca",
        ),
        (
            "expired",
            env.with_spec("expired", ca_a, expired),
            "svid_expired",
        ),
        (
            "unknown trust domain",
            env.with_spec("other", ca_a, LeafSpec::svid("spiffe://c.test/agent/x", 1)),
            "svid_unknown_trust_domain",
        ),
        (
            "trust domain B signed by A's CA",
            env.with_spec("cross", ca_a, LeafSpec::svid("spiffe://b.test/agent/x", 1)),
            "svid_untrusted_chain",
        ),
        (
            "untrusted chain",
            env.with_spec("rogue", &rogue, LeafSpec::svid(AGENT, 1)),
            "svid_untrusted_chain",
        ),
        (
            "bad SPIFFE ID",
            env.with_spec(
                "badid",
                ca_a,
                LeafSpec::svid("spiffe://a.test/agent/../x", 1),
            ),
            "svid_invalid_spiffe_id",
        ),
        (
            "uppercase trust domain",
            env.with_spec("upper", ca_a, LeafSpec::svid("spiffe://A.test/agent", 1)),
            "svid_invalid_spiffe_id",
        ),
        (
            "no digitalSignature",
            env.with_spec("nods", ca_a, no_digital_signature),
            "svid_missing_digital_signature",
        ),
        (
            "keyCertSign on a leaf",
            env.with_spec("kcs", ca_a, cert_sign),
            "svid_forbidden_key_usage",
        ),
        (
            "server-only EKU",
            env.with_spec("eku", ca_a, server_only),
            "svid_wrong_extended_key_usage",
        ),
        (
            "no certificate",
            env.anonymous(),
            "client_certificate_required",
        ),
    ];
    for (what, c, code) in cases {
        let (s, body) = post_json(&c, &url, task_body("10m")).await;
        assert_eq!(s, 401, "{what}: {body}");
        assert_eq!(body["code"], code, "{what}: {body}");
    }
    // ... and a valid SVID from trust domain B is accepted by its own bundle.
    let b_agent = env.with_spec(
        "bagent",
        &env.pki.ca_b,
        LeafSpec::svid("spiffe://b.test/agent/x", 1),
    );
    let (s, body) = post_json(&b_agent, &url, task_body("10m")).await;
    assert_eq!(s, 201, "{body}");
    // Refusals are audited too.
    let records = audit_records(&env.audit);
    assert!(
        records
            .iter()
            .any(|r| r["code"] == "svid_leaf_is_ca" && r["decision"] == "deny")
    );
}

#[tokio::test]
async fn out_of_scope_over_ttl_and_foreign_requests_are_denied() {
    let env = start();
    let agent = env.as_id("agent", AGENT);
    let task = declare(&env, &agent, "10m").await;
    let cases = [
        (
            json!({"provider": "jwt", "target": "https://api.example.com", "actions": ["issues:delete"]}),
            403,
            "out_of_scope",
        ),
        (
            json!({"provider": "jwt", "target": "https://other.example.com"}),
            403,
            "out_of_scope",
        ),
        (
            json!({"provider": "jwt", "target": "https://api.example.com", "resources": ["repo/evil/x"]}),
            403,
            "out_of_scope",
        ),
        (
            json!({"provider": "jwt", "target": "https://api.example.com", "resources": ["repo/*"]}),
            403,
            "out_of_scope",
        ),
        (
            json!({"provider": "aws", "target": "https://api.example.com"}),
            403,
            "out_of_scope",
        ),
        (
            json!({"provider": "jwt", "target": "https://api.example.com", "ttl": "20m"}),
            400,
            "ttl_exceeds_task",
        ),
        (
            json!({"provider": "jwt", "target": "https://api.example.com", "ttl": "2h"}),
            400,
            "ttl_exceeds_limit",
        ),
        (
            json!({"provider": "jwt", "target": "https://api.example.com", "ttl": "5 minutes"}),
            400,
            "invalid_duration",
        ),
        (
            json!({"provider": "ftp", "target": "https://api.example.com"}),
            400,
            "unknown_provider",
        ),
    ];
    for (req, status, code) in cases {
        let (s, body) = mint(&env, &agent, &task, req.clone()).await;
        assert_eq!(
            (s, body["code"].as_str()),
            (status, Some(code)),
            "{req}: {body}"
        );
    }
    // Inside scope works, with a narrower resource.
    let (s, body) = mint(
        &env,
        &agent,
        &task,
        json!({"provider": "jwt", "target": "https://api.example.com", "resources": ["repo/acme/widgets"], "ttl": 60}),
    )
    .await;
    assert_eq!(s, 201, "{body}");

    // Another agent cannot use this task, nor read it.
    let other = env.as_id("agent2", AGENT2);
    let (s, body) = mint(
        &env,
        &other,
        &task,
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    assert_eq!((s, body["code"].as_str()), (403, Some("not_task_owner")));
    let (s, _) = get(&other, &env.server.url(&format!("/v1/tasks/{task}"))).await;
    assert_eq!(s, 403);

    // Policy: http:// targets are not permitted by the test policy.
    let mut body = task_body("10m");
    body["scope"][0]["target"] = json!("http://plain.example.com");
    let (s, resp) = post_json(&agent, &env.server.url("/v1/tasks"), body).await;
    assert_eq!((s, resp["code"].as_str()), (403, Some("policy_denied")));
    // Policy: an operator identity is not an agent.
    let op = env.as_id("op", OPERATOR);
    let (s, resp) = post_json(&op, &env.server.url("/v1/tasks"), task_body("10m")).await;
    assert_eq!((s, resp["code"].as_str()), (403, Some("policy_denied")));
}

#[tokio::test]
async fn hostile_bodies_get_specific_problem_codes() {
    let env = start();
    let agent = env.as_id("agent", AGENT);
    let url = env.server.url("/v1/tasks");
    let raw = |body: &'static str, ct: &'static str| {
        let agent = agent.clone();
        let url = url.clone();
        async move {
            let r = agent
                .post(&url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .expect("send");
            let status = r.status().as_u16();
            let ctype = r.headers()["content-type"]
                .to_str()
                .unwrap_or_default()
                .to_string();
            let body: serde_json::Value = r.json().await.expect("problem json");
            (status, ctype, body)
        }
    };
    let cases = [
        (raw("{\"purpose\": ", "application/json").await, 400, "malformed_json"),
        (raw(r#"{"purpose":"p",}"#, "application/json").await, 400, "malformed_json"),
        (raw("[1,2]", "application/json").await, 400, "invalid_field"),
        (raw(r#"{"purpose":"p","scope":[],"ttl":"1m","admin":true}"#, "application/json").await, 400, "unknown_field"),
        (raw(r#"{"purpose":"p","ttl":"1m"}"#, "application/json").await, 400, "invalid_field"),
        (raw(r#"{"purpose":"p","scope":[],"ttl":"1m"}"#, "application/json").await, 400, "invalid_scope"),
        (
            raw(r#"{"purpose":"p","scope":[{"provider":"jwt","target":"https://x","actions":["a"]}],"ttl":"-3s"}"#, "application/json").await,
            400,
            "invalid_duration",
        ),
        (
            raw(r#"{"purpose":"p","scope":[{"provider":"jwt","target":"https://x","actions":["a"]}],"ttl":1.5}"#, "application/json").await,
            400,
            "invalid_duration",
        ),
        (
            raw(r#"{"purpose":"","scope":[{"provider":"jwt","target":"https://x","actions":["a"]}],"ttl":"1m"}"#, "application/json").await,
            400,
            "invalid_purpose",
        ),
        (raw("purpose=x", "text/plain").await, 415, "unsupported_media_type"),
    ];
    for ((status, ctype, body), want_status, want_code) in cases {
        assert_eq!(ctype, "application/problem+json");
        assert_eq!(
            (status, body["code"].as_str()),
            (want_status, Some(want_code)),
            "{body}"
        );
        assert!(
            body["type"]
                .as_str()
                .is_some_and(|t| t.ends_with(want_code))
        );
    }
    // Oversized body.
    let big = format!(
        r#"{{"purpose":"{}","scope":[],"ttl":"1m"}}"#,
        "x".repeat(200_000)
    );
    let r = agent
        .post(&url)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 413);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["code"], "body_too_large");

    // Unknown and malformed ids.
    let (s, body) = get(
        &agent,
        &env.server
            .url("/v1/tasks/tsk_00000000000000000000000000000000"),
    )
    .await;
    assert_eq!((s, body["code"].as_str()), (404, Some("task_not_found")));
    let (s, body) = get(&agent, &env.server.url("/v1/tasks/..%2F..%2Fetc")).await;
    assert_eq!((s, body["code"].as_str()), (400, Some("invalid_id")));
    let (s, body) = get(&agent, &env.server.url("/v1/nope")).await;
    assert_eq!((s, body["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn operator_routes_refuse_agents_and_operator_revocation_kills_tokens() {
    let env = start();
    let agent = env.as_id("agent", AGENT);
    let op = env.as_id("op", OPERATOR);
    let task = declare(&env, &agent, "30m").await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let (s, b) = mint(
            &env,
            &agent,
            &task,
            json!({"provider": "jwt", "target": "https://api.example.com", "ttl": "5m"}),
        )
        .await;
        assert_eq!(s, 201);
        tokens.push((
            b["lease_id"].as_str().expect("lease").to_string(),
            b["credential"]["access_token"]
                .as_str()
                .expect("tok")
                .to_string(),
        ));
    }
    for path in [
        "/v1/leases",
        "/v1/tasks",
        &format!("/v1/leases/{}", tokens[0].0),
    ] {
        let (s, b) = get(&agent, &env.server.url(path)).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (403, Some("not_operator")),
            "{path}"
        );
    }
    let (s, b) = post_json(
        &agent,
        &env.server
            .url(&format!("/v1/leases/{}/revoke", tokens[0].0)),
        json!({"reason": "x"}),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (403, Some("not_operator")));

    let (s, page) = get(
        &op,
        &env.server
            .url(&format!("/v1/leases?task={task}&state=active&limit=2")),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().expect("items").len(), 2);
    let next = page["next"].as_str().expect("cursor");
    let (_, page2) = get(
        &op,
        &env.server.url(&format!(
            "/v1/leases?task={task}&state=active&limit=2&after={next}"
        )),
    )
    .await;
    assert_eq!(page2["items"].as_array().expect("items").len(), 1);
    let (s, b) = get(&op, &env.server.url("/v1/leases?state=bogus")).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_query")));

    let introspect_url = env.server.url("/v1/introspect");
    let (s, b) = post_json(
        &op,
        &env.server
            .url(&format!("/v1/leases/{}/revoke", tokens[0].0)),
        json!({"reason": "suspicious"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["state"], "revoked");
    assert_eq!(
        introspect(&agent, &introspect_url, &tokens[0].1).await["active"],
        false
    );
    assert_eq!(
        introspect(&agent, &introspect_url, &tokens[1].1).await["active"],
        true
    );
    // Idempotent.
    let (s, b) = post_json(
        &op,
        &env.server
            .url(&format!("/v1/leases/{}/revoke", tokens[0].0)),
        json!({"reason": "again"}),
    )
    .await;
    assert_eq!((s, b["state"].as_str()), (200, Some("revoked")));

    let (s, b) = post_json(
        &op,
        &env.server.url(&format!("/v1/tasks/{task}/revoke")),
        json!({"reason": "incident 42"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["revoked"], 2);
    for (_, t) in &tokens {
        assert_eq!(
            introspect(&agent, &introspect_url, t).await["active"],
            false
        );
    }
    let (_, view) = get(&op, &env.server.url(&format!("/v1/tasks/{task}"))).await;
    assert_eq!(view["state"], "revoked");
    assert_eq!(view["end_reason"], "incident 42");
    let (s, b) = post_json(
        &op,
        &env.server.url(&format!("/v1/tasks/{task}/revoke")),
        json!({"reason": ""}),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_reason")));
}

#[tokio::test]
async fn tampered_audit_logs_fail_verification_naming_the_line() {
    let env = start();
    let agent = env.as_id("agent", AGENT);
    for _ in 0..3 {
        declare(&env, &agent, "5m").await;
    }
    let text = audit_text(&env.audit);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 4);
    let dir = tempfile::tempdir().expect("tmp");
    let check = |name: &str, content: String, want_line: usize| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).expect("write");
        let out = run_cli(&["audit", "verify", p.to_str().expect("utf8")]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{name} must fail");
        assert!(err.contains(&format!("line {want_line}:")), "{name}: {err}");
    };
    let join = |ls: Vec<&str>| ls.join("\n") + "\n";
    let mut changed = lines.clone();
    let altered = changed[2].replace("DeclareTask", "ReadTask");
    changed[2] = &altered;
    check("changed", join(changed), 3);
    let mut deleted = lines.clone();
    deleted.remove(1);
    check("deleted", join(deleted), 2);
    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    check("swapped", join(swapped), 2);
    let ok = run_cli(&["audit", "verify", env.audit.to_str().expect("utf8")]);
    assert!(ok.status.success());
}

#[tokio::test]
async fn trust_bundles_are_reloaded_while_running_and_a_bad_file_keeps_the_last_good_set() {
    let env = start();
    let url = env.server.url("/v1/tasks");
    // Trust domain B rotates to a new CA: its SVIDs are refused until the bundle says so.
    let b2 = mayfly::pki::Ca::generate("CA B2", TD_B).expect("ca");
    let rotated = env.with_spec("b2", &b2, LeafSpec::svid("spiffe://b.test/agent/x", 1));
    let (s, body) = post_json(&rotated, &url, task_body("10m")).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("svid_untrusted_chain"))
    );

    let both = format!("{}{}", env.pki.ca_b.cert_pem(), b2.cert_pem());
    std::fs::write(&env.pki.bundle_b, both).expect("write bundle");
    let accepted = eventually(Duration::from_secs(10), || {
        let (pki_dir, url) = (env.pki.dir.clone(), url.clone());
        let ca = env.pki.bundle_a.clone();
        async move {
            // A new client, hence a new connection, verified against the bundles now in force.
            let c = client(
                &ca,
                Some(&Pair {
                    cert: pki_dir.join("b2.pem"),
                    key: pki_dir.join("b2-key.pem"),
                }),
            );
            let (s, _) = post_json(&c, &url, task_body("10m")).await;
            (s == 201).then_some(())
        }
    })
    .await;
    assert!(
        accepted.is_some(),
        "the rotated CA is trusted without a restart"
    );

    // A broken bundle file is refused; the last good set stays in force.
    std::fs::write(&env.pki.bundle_b, "not a certificate").expect("write");
    wait_for_metric(
        &env.server,
        &env.pki.bundle_a,
        "mayfly_trust_bundle_file_reloads_total",
        &[("outcome", "refused")],
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let again = client(
        &env.pki.bundle_a,
        Some(&Pair {
            cert: env.pki.dir.join("b2.pem"),
            key: env.pki.dir.join("b2-key.pem"),
        }),
    );
    let (s, body) = post_json(&again, &url, task_body("10m")).await;
    assert_eq!(s, 201, "{body}");
}

#[tokio::test]
async fn the_serving_certificate_is_reloaded_when_its_files_change() {
    let env = start();
    let health = env.server.url("/healthz");
    let trusting_b = client(&env.pki.bundle_b, None);
    assert!(
        trusting_b.get(&health).send().await.is_err(),
        "served by CA A's certificate"
    );
    // Rotate the broker's certificate to one from CA B (as a new SVID would arrive).
    let spec = LeafSpec::server(None, &["localhost"], &["127.0.0.1".parse().expect("ip")], 1);
    let issued = env.pki.ca_b.issue(&spec).expect("issue");
    std::fs::write(&env.pki.server.key, issued.key_pem.expose()).expect("key");
    std::fs::write(&env.pki.server.cert, &issued.cert_pem).expect("cert");
    let switched = eventually(Duration::from_secs(10), || {
        let (c, url) = (client(&env.pki.bundle_b, None), health.clone());
        async move {
            match c.get(&url).send().await {
                Ok(r) if r.status() == 200 => Some(()),
                other => {
                    eprintln!("not yet: {other:?}");
                    None
                }
            }
        }
    })
    .await;
    assert!(
        switched.is_some(),
        "new connections get the new certificate without a restart\n{}",
        env.server.logs()
    );
}
