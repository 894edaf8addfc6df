#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Sender-constrained tokens end to end: the real `mayfly` binary mints tokens bound to
//! the caller's certificate (RFC 8705) or DPoP key (RFC 9449), and a real resource server
//! (tests/fixtures/resource_server/server.py: PyJWT + Python's TLS, on loopback with
//! optional client certificates) accepts each only from its owner. Also: DPoP proof
//! replay across two replicas on one Redis, RFC 8414 metadata, RFC 8707 resources.

mod common;

use common::*;
use mayfly::identity::dpop::{ProofKey, ProofRequest};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ISSUER: &str = "https://mayfly.test";

/// The resource server fixture, killed on drop.
struct ResourceServer {
    child: Child,
    port: u16,
}

impl ResourceServer {
    fn start(pki: &Pki, mayfly: &Server, audience: &str) -> Self {
        Self::start_for(pki, mayfly, audience, ISSUER)
    }

    /// A resource server trusting tokens of `issuer`.
    fn start_for(pki: &Pki, mayfly: &Server, audience: &str, issuer: &str) -> Self {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resource_server/server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--cert", pki.server.cert.to_str().expect("utf8")])
            .args(["--key", pki.server.key.to_str().expect("utf8")])
            .args(["--client-ca", pki.bundle_a.to_str().expect("utf8")])
            .args(["--jwks-url", &mayfly.url("/.well-known/jwks.json")])
            .args(["--jwks-ca", pki.bundle_a.to_str().expect("utf8")])
            .args(["--issuer", issuer, "--audience", audience])
            .arg("--require-binding")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 must be installed");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("resource server did not start; it needs `pip install PyJWT cryptography` (.ci/run does this)")
        });
        let port = line
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .expect("ready line");
        Self { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for ResourceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The RFC 8705 thumbprint of a certificate file, computed here independently.
fn thumbprint_of(cert: &Path) -> String {
    use base64::Engine;
    use sha2::Digest;
    let pem = std::fs::read(cert).expect("cert");
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&p.contents))
}

fn proof(key: &ProofKey, method: &str, url: &str, token: Option<&str>) -> String {
    key.proof(&ProofRequest {
        method: method.into(),
        url: url.into(),
        access_token: token.map(str::to_string),
        ..Default::default()
    })
    .expect("proof")
}

struct Env {
    _dir: tempfile::TempDir,
    pki: Pki,
    server: Server,
}

fn start(extra: &str) -> Env {
    start_with(extra, None)
}

/// A broker with `extra` config and, if given, one more policy file.
fn start_with(extra: &str, policy: Option<String>) -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        extra: extra.to_string(),
        ..Default::default()
    };
    let config = write_config(dir.path(), &pki, &opts);
    if let Some(p) = policy {
        std::fs::write(dir.path().join("policies/extra.cedar"), p).expect("policy");
    }
    let server = Server::serve(&config);
    Env {
        _dir: dir,
        pki,
        server,
    }
}

async fn declare(agent: &reqwest::Client, server: &Server, targets: &[&str]) -> String {
    let scope: Vec<Value> = targets
        .iter()
        .map(|t| json!({"provider": "jwt", "target": t, "actions": ["read"]}))
        .collect();
    let (s, task) = post_json(
        agent,
        &server.url("/v1/tasks"),
        json!({"purpose": "read the api", "scope": scope, "ttl": "10m"}),
    )
    .await;
    assert_eq!(s, 201, "{task}");
    task["task_id"].as_str().expect("id").to_string()
}

/// `POST /v1/tasks/{task}/credentials`, with a DPoP proof if given.
async fn credential(
    agent: &reqwest::Client,
    server: &Server,
    task: &str,
    body: Value,
    dpop: Option<&str>,
) -> (u16, Value) {
    let mut req = agent
        .post(server.url(&format!("/v1/tasks/{task}/credentials")))
        .json(&body);
    if let Some(p) = dpop {
        req = req.header("DPoP", p);
    }
    let r = req.send().await.expect("send");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn call_rs(c: &reqwest::Client, url: &str, auth: &str, dpop: Option<&str>) -> (u16, Value) {
    let mut req = c.get(url).header("authorization", auth);
    if let Some(p) = dpop {
        req = req.header("DPoP", p);
    }
    let r = req.send().await.expect("send");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_certificate_bound_token_works_only_with_the_certificate_it_was_minted_for() {
    let env = start("");
    let agent_pair = env.pki.svid("agent", AGENT);
    let agent = client(&env.pki.bundle_a, Some(&agent_pair));
    let rs = ResourceServer::start(&env.pki, &env.server, "https://rs.test/api");
    let task = declare(&agent, &env.server, &["https://rs.test/api"]).await;
    let (s, cred) = credential(
        &agent,
        &env.server,
        &task,
        json!({"provider": "jwt", "target": "https://rs.test/api"}),
        None,
    )
    .await;
    assert_eq!(s, 201, "{cred}");
    assert_eq!(cred["credential"]["token_type"], "Bearer");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    let x5t = thumbprint_of(&agent_pair.cert);
    assert_eq!(jwt_payload(token)["cnf"], json!({"x5t#S256": x5t}));

    // Introspection shows the binding.
    let info = introspect(&agent, &env.server.url("/v1/introspect"), token).await;
    assert_eq!(info["active"], true);
    assert_eq!(info["cnf"], json!({"x5t#S256": x5t}));
    assert_eq!(info["token_type"], "Bearer");

    let bearer = format!("Bearer {token}");
    let url = rs.url("/api");
    // The owner, presenting its certificate.
    let (s, body) = call_rs(&agent, &url, &bearer, None).await;
    assert_eq!(
        (s, body["binding"].as_str()),
        (200, Some("x5t#S256")),
        "{body}"
    );
    // Another agent with a valid certificate of the same trust domain.
    let other = env.pki.client_as("agent2", AGENT2);
    let (s, body) = call_rs(&other, &url, &bearer, None).await;
    assert_eq!(s, 401, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("not the one the token is bound to")),
        "{body}"
    );
    // No certificate at all.
    let anon = client(&env.pki.bundle_a, None);
    let (s, body) = call_rs(&anon, &url, &bearer, None).await;
    assert_eq!(s, 401, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("no client certificate")),
        "{body}"
    );
}

#[tokio::test]
async fn a_dpop_bound_token_works_only_with_a_fresh_proof_from_its_key() {
    let env = start("");
    let agent = env.pki.client_as("agent", AGENT);
    let rs = ResourceServer::start(&env.pki, &env.server, "https://rs.test/api");
    let task = declare(&agent, &env.server, &["https://rs.test/api"]).await;
    let key = ProofKey::generate(false).expect("key").0;
    let cred_url = format!("{ISSUER}/v1/tasks/{task}/credentials");
    let body = json!({"provider": "jwt", "target": "https://rs.test/api"});

    // Mayfly checks the proof: the wrong URL, then a good one, then its replay.
    let wrong = proof(&key, "POST", &format!("{ISSUER}/v1/token"), None);
    let (s, err) = credential(&agent, &env.server, &task, body.clone(), Some(&wrong)).await;
    assert_eq!(
        (s, err["code"].as_str()),
        (400, Some("dpop_proof_htu")),
        "{err}"
    );
    let good = proof(&key, "POST", &cred_url, None);
    // A request refused for what it asks (a target outside the task) gets nothing and
    // does not spend the proof: its jti is consumed only with a credential's lease.
    let outside = json!({"provider": "jwt", "target": "https://elsewhere.test/"});
    let (s, err) = credential(&agent, &env.server, &task, outside, Some(&good)).await;
    assert_eq!(
        (s, err["code"].as_str()),
        (403, Some("out_of_scope")),
        "{err}"
    );
    let (s, cred) = credential(&agent, &env.server, &task, body.clone(), Some(&good)).await;
    assert_eq!(s, 201, "{cred}");
    let (s, err) = credential(&agent, &env.server, &task, body.clone(), Some(&good)).await;
    assert_eq!(
        (s, err["code"].as_str()),
        (400, Some("dpop_proof_replayed")),
        "{err}"
    );
    // The replay minted nothing: the task holds the one lease of the first use.
    let view: Value = agent
        .get(env.server.url(&format!("/v1/tasks/{task}")))
        .send()
        .await
        .expect("task")
        .json()
        .await
        .expect("json");
    assert_eq!(view["leases"].as_array().map(Vec::len), Some(1), "{view}");
    // The replay is refused inside the commit that would have written its lease: its
    // record is the refusal, with no credential in it.
    let replays: Vec<Value> = audit_records(&env._dir.path().join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["code"] == "dpop_proof_replayed")
        .collect();
    assert_eq!(replays.len(), 1, "{replays:?}");
    assert_eq!(
        (&replays[0]["decision"], &replays[0]["status"]),
        (&json!("deny"), &json!(400))
    );
    assert!(
        replays[0]["credential_fingerprint"].is_null(),
        "{replays:?}"
    );

    assert_eq!(cred["credential"]["token_type"], "DPoP");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    let jkt = key.thumbprint();
    // DPoP wins over the caller's certificate: the client asked for it.
    assert_eq!(jwt_payload(token)["cnf"], json!({"jkt": jkt}));
    let info = introspect(&agent, &env.server.url("/v1/introspect"), token).await;
    assert_eq!(
        (&info["active"], &info["token_type"], &info["cnf"]),
        (&json!(true), &json!("DPoP"), &json!({"jkt": jkt}))
    );

    let url = rs.url("/api");
    let dpop_auth = format!("DPoP {token}");
    let anon = client(&env.pki.bundle_a, None);
    // Each refusal for its own reason (the fixture's error_description).
    let refused = |why: &'static str| {
        move |(s, body): (u16, Value)| {
            assert_eq!(s, 401, "{why}: {body}");
            assert!(
                body["error_description"]
                    .as_str()
                    .is_some_and(|d| d.contains(why)),
                "{why}: {body}"
            );
        }
    };
    // No proof, with either scheme.
    refused("exactly one DPoP proof required")(call_rs(&anon, &url, &dpop_auth, None).await);
    refused("wrong scheme")(call_rs(&anon, &url, &format!("Bearer {token}"), None).await);
    // A proof from another key.
    let thief = ProofKey::generate(false).expect("key").0;
    let p = proof(&thief, "GET", &url, Some(token));
    refused("not the key the token is bound to")(call_rs(&anon, &url, &dpop_auth, Some(&p)).await);
    // A proof for another URL, another method, another token.
    let p = proof(&key, "GET", &rs.url("/elsewhere"), Some(token));
    refused("htu does not match")(call_rs(&anon, &url, &dpop_auth, Some(&p)).await);
    let p = proof(&key, "POST", &url, Some(token));
    refused("htm does not match")(call_rs(&anon, &url, &dpop_auth, Some(&p)).await);
    let p = proof(&key, "GET", &url, Some("another-token"));
    refused("ath does not match")(call_rs(&anon, &url, &dpop_auth, Some(&p)).await);
    // An expired proof.
    let old = key
        .proof(&ProofRequest {
            method: "GET".into(),
            url: url.clone(),
            access_token: Some(token.into()),
            iat: Some(time::OffsetDateTime::now_utc().unix_timestamp() - 300),
            ..Default::default()
        })
        .expect("proof");
    refused("iat outside the window")(call_rs(&anon, &url, &dpop_auth, Some(&old)).await);

    // The owner's fresh proof works, once.
    let p = proof(&key, "GET", &url, Some(token));
    let (s, body) = call_rs(&anon, &url, &dpop_auth, Some(&p)).await;
    assert_eq!((s, body["binding"].as_str()), (200, Some("jkt")), "{body}");
    refused("proof replayed")(call_rs(&anon, &url, &dpop_auth, Some(&p)).await);
}

#[tokio::test]
async fn a_dpop_proof_used_on_one_replica_is_refused_by_another_on_the_same_redis() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        store: Some(redis_store(&redis.url(), "dpop")),
        node_id: "a".into(),
        audit: Some(dir.path().join("audit-a.jsonl")),
        ..Default::default()
    };
    let config_a = write_config(dir.path(), &pki, &opts);
    let text = std::fs::read_to_string(&config_a)
        .expect("config")
        .replace("node_id = \"a\"", "node_id = \"b\"")
        .replace("audit-a.jsonl", "audit-b.jsonl");
    let config_b = dir.path().join("mayfly-b.toml");
    std::fs::write(&config_b, text).expect("write");
    let a = Server::serve(&config_a);
    let b = Server::serve(&config_b);

    let agent = pki.client_as("agent", AGENT);
    let task = declare(&agent, &a, &["https://rs.test/api"]).await;
    let key = ProofKey::generate(false).expect("key").0;
    let p = proof(
        &key,
        "POST",
        &format!("{ISSUER}/v1/tasks/{task}/credentials"),
        None,
    );
    let body = json!({"provider": "jwt", "target": "https://rs.test/api"});
    let (s, cred) = credential(&agent, &a, &task, body.clone(), Some(&p)).await;
    assert_eq!(s, 201, "{cred}");
    let (s, err) = credential(&agent, &b, &task, body.clone(), Some(&p)).await;
    assert_eq!(
        (s, err["code"].as_str()),
        (400, Some("dpop_proof_replayed")),
        "{err}"
    );
    // A fresh proof from the same key works on the second replica.
    let p = proof(
        &key,
        "POST",
        &format!("{ISSUER}/v1/tasks/{task}/credentials"),
        None,
    );
    let (s, cred) = credential(&agent, &b, &task, body, Some(&p)).await;
    assert_eq!(s, 201, "{cred}");
}

#[tokio::test]
async fn the_authorization_server_metadata_has_the_fields_rfc_8414_requires() {
    let env = start("");
    let anon = client(&env.pki.bundle_a, None);
    let r = anon
        .get(env.server.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
    );
    let m: Value = r.json().await.expect("json");
    // §2: issuer is an https URL without query or fragment, and the one tokens carry.
    let issuer = m["issuer"].as_str().expect("issuer");
    let parsed = url::Url::parse(issuer).expect("issuer url");
    assert_eq!(parsed.scheme(), "https");
    assert!(parsed.query().is_none() && parsed.fragment().is_none());
    assert_eq!(issuer, ISSUER);
    // §2: REQUIRED response_types_supported; token_endpoint REQUIRED unless only the
    // implicit grant; authorization_endpoint only when a grant type uses it.
    assert!(m["response_types_supported"].is_array(), "{m}");
    let grants: Vec<&str> = m["grant_types_supported"]
        .as_array()
        .expect("grants")
        .iter()
        .map(|g| g.as_str().expect("grant"))
        .collect();
    assert_eq!(grants, ["urn:ietf:params:oauth:grant-type:token-exchange"]);
    if grants
        .iter()
        .any(|g| *g == "authorization_code" || *g == "implicit")
    {
        assert!(m["authorization_endpoint"].is_string());
    }
    for endpoint in ["token_endpoint", "introspection_endpoint", "jwks_uri"] {
        let u = m[endpoint].as_str().expect(endpoint);
        assert!(u.starts_with(&format!("{ISSUER}/")), "{endpoint}: {u}");
    }
    // RFC 9449 §5.1 and RFC 8705 §3.3.
    let algs = m["dpop_signing_alg_values_supported"]
        .as_array()
        .expect("dpop algs");
    assert!(!algs.is_empty());
    assert!(algs.iter().all(|a| {
        let a = a.as_str().expect("alg");
        a != "none" && !a.starts_with("HS")
    }));
    assert_eq!(m["tls_client_certificate_bound_access_tokens"], true);
    // The endpoints it names are the ones Mayfly serves.
    let (s, jwks) = get(&anon, &env.server.url("/.well-known/jwks.json")).await;
    assert_eq!(s, 200);
    assert!(jwks["keys"].is_array());
}

#[tokio::test]
async fn resource_indicators_become_the_audience_or_are_an_invalid_target() {
    let env = start("");
    let agent = env.pki.client_as("agent", AGENT);
    let (a, b) = ("https://a.test/mcp", "https://b.test/mcp");
    let task = declare(&agent, &env.server, &[a, b]).await;
    let req = |resource: Value| json!({"provider": "jwt", "target": a, "resource": resource});

    let (s, cred) = credential(&agent, &env.server, &task, req(json!([a, b])), None).await;
    assert_eq!(s, 201, "{cred}");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    assert_eq!(jwt_payload(token)["aud"], json!([a, b]));
    let info = introspect(&agent, &env.server.url("/v1/introspect"), token).await;
    assert_eq!(info["aud"], json!([a, b]));

    let (s, cred) = credential(&agent, &env.server, &task, req(json!(a)), None).await;
    assert_eq!(s, 201, "{cred}");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    assert_eq!(jwt_payload(token)["aud"], json!(a));

    for bad in [
        json!("https://a.test/mcp#frag"),
        json!("/relative/path"),
        json!([a, "not a uri"]),
        json!("https://c.test/not-in-scope"),
        json!([]),
        json!(7),
    ] {
        let (s, err) = credential(&agent, &env.server, &task, req(bad.clone()), None).await;
        assert_eq!(
            (s, err["code"].as_str()),
            (400, Some("invalid_target")),
            "{bad}: {err}"
        );
    }
}

#[tokio::test]
async fn exec_refetches_certificate_bound_tokens_when_the_svid_rotates() {
    let env = start("");
    let dir = env._dir.path().to_path_buf();
    let agent = env.pki.svid("agent", AGENT);
    let before = thumbprint_of(&agent.cert);
    let task = dir.join("task.toml");
    std::fs::write(
        &task,
        "purpose = \"rotate\"\nttl = \"10m\"\n[[scope]]\nprovider = \"jwt\"\ntarget = \"https://rs.test/api\"\nactions = [\"read\"]\n",
    )
    .expect("task file");
    let (ready, first, second) = (dir.join("ready"), dir.join("first"), dir.join("second"));
    let mode = dir.join("mode");
    // The command keeps the first token, says it is ready, and waits (up to 30 s) for
    // the file to hold another one.
    let script = format!(
        "t=\"$MAYFLY_CREDENTIALS_DIR/MAYFLY_TOKEN\"; stat -c %a \"$t\" > {mode:?}; cp \"$t\" {first:?}; touch {ready:?}; \
         i=0; while cmp -s \"$t\" {first:?} && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
         cp \"$t\" {second:?}"
    );
    let creds = dir.join("creds");
    let vars = vec![
        ("MAYFLY_ADDR", env.server.url("")),
        ("MAYFLY_CERT", agent.cert.display().to_string()),
        ("MAYFLY_KEY", agent.key.display().to_string()),
        ("MAYFLY_CA", env.pki.bundle_a.display().to_string()),
    ];
    let argv: Vec<String> = [
        "exec",
        "--task",
        task.to_str().expect("utf8"),
        "--refresh-dir",
        creds.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        &script,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_cli_env(&args, &vars)
    });
    eventually(Duration::from_secs(20), || async {
        ready.exists().then_some(())
    })
    .await
    .expect("the command started with its token");
    // SPIRE-style rotation: a new SVID for the same identity, written in place.
    let rotated = env.pki.svid("agent", AGENT);
    let after = thumbprint_of(&rotated.cert);
    assert_ne!(before, after);
    let out = run.await.expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = |p: &Path| std::fs::read_to_string(p).expect("token file");
    let (t1, t2) = (token(&first), token(&second));
    assert_ne!(t1, t2, "the token was refetched");
    assert_eq!(jwt_payload(&t1)["cnf"], json!({"x5t#S256": before}));
    assert_eq!(jwt_payload(&t2)["cnf"], json!({"x5t#S256": after}));
    // The files were private while CMD ran, and are gone once the task has ended.
    assert_eq!(std::fs::read_to_string(&mode).expect("mode").trim(), "600");
    assert!(!creds.join("MAYFLY_TOKEN").exists());
    assert!(!creds.join("MAYFLY_TASK_ID").exists());
}

/// The RFC 8693 exchange with a DPoP proof and several RFC 8707 resources, for a CI job
/// with an OIDC token from a real issuer (npm oauth2-mock-server).
#[tokio::test]
async fn token_exchange_with_a_dpop_proof_mints_a_dpop_token_for_every_resource() {
    let oidc = OidcIssuer::start();
    let extra = format!(
        r#"
[[oidc_issuers]]
issuer = "{iss}"
audiences = ["{ISSUER}"]
algorithms = ["ES256"]
typ = ["JWT"]
allow_insecure_http = true
job_claims = ["run_id"]
max_exchange_ttl = "30m"

[providers.jwt.targets."https://strict.test/mcp"]
binding = "required"
"#,
        iss = oidc.issuer
    );
    let when = format!(
        "principal has issuer && principal.issuer == \"{}\" && resource.provider == \"jwt\"",
        oidc.issuer
    );
    let policy = format!(
        "permit (principal, action == Mayfly::Action::\"DeclareTask\", resource) when {{ {when} }};\n\
         permit (principal, action == Mayfly::Action::\"MintCredential\", resource) when {{ {when} }};\n"
    );
    let env = start_with(&extra, Some(policy));
    let anon = client(&env.pki.bundle_a, None);
    let (a, b) = ("https://a.test/mcp", "https://b.test/mcp");
    let key = ProofKey::generate(true).expect("key").0;
    let token_url = format!("{ISSUER}/v1/token");
    let exchange = |subject: String, resources: Vec<&'static str>, dpop: Option<String>| {
        let anon = anon.clone();
        let url = env.server.url("/v1/token");
        async move {
            let mut form = vec![
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
                ),
                ("subject_token", subject),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:jwt".to_string(),
                ),
                ("scope", "read".to_string()),
            ];
            form.extend(resources.into_iter().map(|r| ("resource", r.to_string())));
            let mut req = anon.post(url).form(&form);
            if let Some(p) = dpop {
                req = req.header("DPoP", p);
            }
            let r = req.send().await.expect("send");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let subject =
        |run: &str| oidc.mint(json!({"aud": ISSUER, "sub": "repo:acme/app", "run_id": run}));

    // A proof for another URL is refused as RFC 9449 says.
    let wrong = proof(&key, "POST", &format!("{ISSUER}/v1/introspect"), None);
    let (s, err) = exchange(subject("1").await, vec![a], Some(wrong)).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "{err}"
    );
    // A resource with a fragment is an invalid target.
    let (s, err) = exchange(subject("1").await, vec!["https://a.test/mcp#x"], None).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("invalid_target")),
        "{err}"
    );

    let p = proof(&key, "POST", &token_url, None);
    let (s, body) = exchange(subject("2").await, vec![a, b], Some(p)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["token_type"], "DPoP", "{body}");
    let token = body["access_token"].as_str().expect("token");
    let claims = jwt_payload(token);
    assert_eq!(claims["cnf"], json!({"jkt": key.thumbprint()}));
    assert_eq!(claims["aud"], json!([a, b]));
    let agent = env.pki.client_as("agent", AGENT);
    let info = introspect(&agent, &env.server.url("/v1/introspect"), token).await;
    assert_eq!(
        (&info["token_type"], &info["cnf"]),
        (&json!("DPoP"), &json!({"jkt": key.thumbprint()}))
    );

    // A target that requires binding refuses a bearer caller without a proof...
    let (s, err) = exchange(subject("3").await, vec!["https://strict.test/mcp"], None).await;
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "{err}"
    );
    // ...and without one a bearer caller gets a plain bearer token elsewhere.
    let (s, body) = exchange(subject("4").await, vec![a], None).await;
    assert_eq!(
        (s, body["token_type"].as_str()),
        (200, Some("Bearer")),
        "{body}"
    );
    assert!(jwt_payload(body["access_token"].as_str().expect("token"))["cnf"].is_null());

    // The same CI identity as a bearer caller on the task routes: its proof must carry
    // the hash of the Authorization token (ath).
    let bearer = subject("5").await;
    let r = anon
        .post(env.server.url("/v1/tasks"))
        .bearer_auth(&bearer)
        .json(&json!({"purpose": "p", "scope": [{"provider": "jwt", "target": a, "actions": ["read"]}], "ttl": "10m"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 201);
    let task: Value = r.json().await.expect("json");
    let task = task["task_id"].as_str().expect("id");
    let path = format!("/v1/tasks/{task}/credentials");
    let mint = |p: String| {
        anon.post(env.server.url(&path))
            .bearer_auth(&bearer)
            .header("DPoP", p)
            .json(&json!({"provider": "jwt", "target": a}))
            .send()
    };
    let url = format!("{ISSUER}{path}");
    let r = mint(proof(&key, "POST", &url, None)).await.expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let err: Value = r.json().await.expect("json");
    assert_eq!(err["code"], "dpop_proof_ath", "{err}");
    let r = mint(proof(&key, "POST", &url, Some(&bearer)))
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 201);
    let cred: Value = r.json().await.expect("json");
    assert_eq!(cred["credential"]["token_type"], "DPoP", "{cred}");
}

#[tokio::test]
async fn a_target_with_binding_off_gets_plain_bearer_tokens_even_over_mtls() {
    let env = start("[providers.jwt.targets.\"https://legacy.test/api\"]\nbinding = \"off\"\n");
    let agent = env.pki.client_as("agent", AGENT);
    let task = declare(&agent, &env.server, &["https://legacy.test/api"]).await;
    let body = json!({"provider": "jwt", "target": "https://legacy.test/api"});
    let (s, cred) = credential(&agent, &env.server, &task, body, None).await;
    assert_eq!(s, 201, "{cred}");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    assert!(jwt_payload(token)["cnf"].is_null());
    let info = introspect(&agent, &env.server.url("/v1/introspect"), token).await;
    assert_eq!(
        (&info["active"], &info["cnf"]),
        (&json!(true), &Value::Null)
    );
}

#[tokio::test]
async fn with_server_nonces_on_a_proof_needs_the_nonce_the_server_announced() {
    let secret_dir = tempfile::tempdir().expect("tmp");
    let secret = secret_dir.path().join("nonce.key");
    std::fs::write(&secret, [42u8; 32]).expect("secret");
    let env = start(&format!("[dpop]\nnonce_secret_file = {secret:?}\n"));
    let agent = env.pki.client_as("agent", AGENT);
    let task = declare(&agent, &env.server, &["https://rs.test/api"]).await;
    let key = ProofKey::generate(false).expect("key").0;
    let path = format!("/v1/tasks/{task}/credentials");
    let url = format!("{ISSUER}{path}");
    let send = |p: String| {
        agent
            .post(env.server.url(&path))
            .header("DPoP", p)
            .json(&json!({"provider": "jwt", "target": "https://rs.test/api"}))
            .send()
    };
    let r = send(proof(&key, "POST", &url, None)).await.expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let nonce = r
        .headers()
        .get("dpop-nonce")
        .and_then(|v| v.to_str().ok())
        .expect("a DPoP-Nonce header")
        .to_string();
    let err: Value = r.json().await.expect("json");
    assert_eq!(err["code"], "use_dpop_nonce", "{err}");
    let with_nonce = key
        .proof(&ProofRequest {
            method: "POST".into(),
            url: url.clone(),
            nonce: Some(nonce),
            ..Default::default()
        })
        .expect("proof");
    let r = send(with_nonce).await.expect("send");
    assert_eq!(r.status().as_u16(), 201);
    assert!(r.headers().contains_key("dpop-nonce"));
}

/// The MCP authorization discovery of docs/mcp-authorization.md, followed by a client:
/// 401 → the resource's RFC 9728 metadata → its authorization server (Mayfly) → Mayfly's
/// RFC 8414 metadata fetched from the issuer URL → a token for the resource → 200.
#[tokio::test]
async fn a_client_follows_the_mcp_servers_protected_resource_metadata_to_mayfly() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    // The broker is reachable under its issuer name: its certificate names the host and
    // the issuer carries the port it listens on.
    let spec = mayfly::pki::LeafSpec::server(
        None,
        &["localhost", "mayfly.test"],
        &["127.0.0.1".parse().expect("ip")],
        30,
    );
    pki.issue_with(&pki.ca_a, "server", &spec);
    let port = free_port();
    let issuer = format!("https://mayfly.test:{port}");
    let text = std::fs::read_to_string(write_config(dir.path(), &pki, &ConfigOptions::default()))
        .expect("config")
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace(
            "issuer = \"https://mayfly.test\"",
            &format!("issuer = \"{issuer}\""),
        );
    let config = dir.path().join("mayfly-mcp.toml");
    std::fs::write(&config, text).expect("config");
    let server = Server::serve(&config);
    let resource = "https://mcp.test/";
    let rs = ResourceServer::start_for(&pki, &server, resource, &issuer);

    let agent_pair = pki.svid("agent", AGENT);
    let agent = {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.bundle_a).expect("ca"))
            .expect("ca pem");
        let mut pem = std::fs::read(&agent_pair.cert).expect("cert");
        pem.extend(std::fs::read(&agent_pair.key).expect("key"));
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .resolve("mayfly.test", server.addr)
            .build()
            .expect("client")
    };

    // 1. Without a token the MCP server answers 401 and names its metadata.
    let r = agent.get(rs.url("/tools")).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let challenge = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .expect("challenge")
        .to_string();
    let metadata_url = challenge
        .split("resource_metadata=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("resource_metadata parameter");
    // 2. RFC 9728 §2: `resource` is REQUIRED; `authorization_servers` names Mayfly.
    let (s, prm) = get(&agent, metadata_url).await;
    assert_eq!(s, 200);
    assert_eq!(prm["resource"], resource, "{prm}");
    let as_issuer = prm["authorization_servers"][0]
        .as_str()
        .expect("authorization server");
    assert_eq!(as_issuer, issuer);
    // 3. RFC 8414 §3: the metadata at the issuer's well-known URL, whose `issuer` is
    // exactly the issuer it was fetched for (§3.3).
    let (s, asm) = get(
        &agent,
        &format!("{as_issuer}/.well-known/oauth-authorization-server"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(asm["issuer"], as_issuer);
    assert_eq!(asm["tls_client_certificate_bound_access_tokens"], true);
    let (s, jwks) = get(&agent, asm["jwks_uri"].as_str().expect("jwks_uri")).await;
    assert_eq!((s, jwks["keys"].is_array()), (200, true));
    // 4. A token for exactly that resource, bound to the agent's certificate.
    let task = declare(&agent, &server, &[resource]).await;
    let (s, cred) = credential(
        &agent,
        &server,
        &task,
        json!({"provider": "jwt", "target": resource, "resource": resource}),
        None,
    )
    .await;
    assert_eq!(s, 201, "{cred}");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    assert_eq!(jwt_payload(token)["aud"], resource);
    // 5. The MCP server accepts it from the agent.
    let (s, body) = call_rs(&agent, &rs.url("/tools"), &format!("Bearer {token}"), None).await;
    assert_eq!(
        (s, body["binding"].as_str()),
        (200, Some("x5t#S256")),
        "{body}"
    );
}

/// `mayfly dpop` as a shell script would use it: keygen, thumbprint, proof.
#[tokio::test]
async fn the_dpop_cli_makes_keys_and_proofs_the_broker_accepts() {
    let env = start("");
    let key = env._dir.path().join("dpop.pem");
    let path = key.to_str().expect("utf8");
    let out = run_cli(&["dpop", "keygen", "--out", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jkt = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // An existing key is never overwritten.
    let again = run_cli(&["dpop", "keygen", "--out", path]);
    assert!(!again.status.success());
    let out = run_cli(&["dpop", "thumbprint", "--key", path]);
    assert_eq!(String::from_utf8(out.stdout).expect("utf8").trim(), jkt);

    let agent = env.pki.client_as("agent", AGENT);
    let task = declare(&agent, &env.server, &["https://rs.test/api"]).await;
    let url = format!("{ISSUER}/v1/tasks/{task}/credentials");
    let out = run_cli(&[
        "dpop", "proof", "--key", path, "--method", "POST", "--url", &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    let body = json!({"provider": "jwt", "target": "https://rs.test/api"});
    let (s, cred) = credential(&agent, &env.server, &task, body, Some(&p)).await;
    assert_eq!(s, 201, "{cred}");
    let token = cred["credential"]["access_token"].as_str().expect("token");
    assert_eq!(jwt_payload(token)["cnf"], json!({"jkt": jkt}));

    for bad in [
        vec!["--method", "post", "--url", url.as_str()],
        vec!["--method", "POST", "--url", "/v1/token"],
    ] {
        let mut args = vec!["dpop", "proof", "--key", path];
        args.extend(bad);
        let out = run_cli(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("mayfly dpop:"));
    }
}
