#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Security controls hold across replicas and restarts: three real `mayfly` replicas on
//! one real Redis (requests round-robin, SIGKILL restarts), and one embedded node
//! restarted: single-use tokens, anomaly windows, risk and deny flags.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

const AUD: &str = "https://mayfly.test";
const PROD: &str = "https://prod.example.com";
const RISK_POLICY: &str = r#"@id("no-minting-at-high-risk")
forbid (principal, action == Mayfly::Action::"MintCredential", resource)
when { context.risk >= 80 };

@id("prod-needs-approval") @approval("required")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { resource.uri == "https://prod.example.com" };
"#;

/// A config for one replica in `dir`: shared JWT signing key and JWT-SVID bundle in
/// `shared`, single-use JWT-SVIDs of trust domain A, the risk policy.
fn replica_config(
    shared: &Path,
    dir: &Path,
    pki: &Pki,
    store: Option<String>,
    n: usize,
    extra: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let opts = ConfigOptions {
        store,
        node_id: format!("replica-{n}"),
        extra: format!(
            "[[jwt_svid]]\ntrust_domain = \"{TD_A}\"\nbundle_file = {:?}\naudiences = [\"{AUD}\"]\nsingle_use = true\n{extra}",
            shared.join("jwt-bundle.json")
        ),
        ..Default::default()
    };
    let config = write_config(dir, pki, &opts);
    std::fs::write(dir.join("policies/risk.cedar"), RISK_POLICY).expect("policy");
    // Replicas share one JWT key (the shared config in a real deployment).
    let text = std::fs::read_to_string(&config).expect("read").replace(
        &format!("{:?}", dir.join("jwt-key.pem")),
        &format!("{:?}", shared.join("jwt-key.pem")),
    );
    std::fs::write(&config, text).expect("write");
    config
}

fn svid_key(shared: &Path) -> JwtSvidKey {
    let key = JwtSvidKey::generate("k1");
    std::fs::write(
        shared.join("jwt-bundle.json"),
        spiffe_bundle_doc(&[], &[&key.jwk], 1, 60),
    )
    .expect("bundle");
    key
}

async fn declare_bearer(url: &str, ca: &Path, token: &str) -> (u16, Value) {
    let r = client(ca, None)
        .post(format!("{url}/v1/tasks"))
        .bearer_auth(token)
        .json(&task_body("10m"))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn mint(agent: &reqwest::Client, url: &str, task: &str, target: &str) -> (u16, Value) {
    post_json(
        agent,
        &format!("{url}/v1/tasks/{task}/credentials"),
        json!({"provider": "jwt", "target": target}),
    )
    .await
}

async fn declare(agent: &reqwest::Client, url: &str) -> String {
    let (s, b) = post_json(agent, &format!("{url}/v1/tasks"), task_body("10m")).await;
    assert_eq!(s, 201, "{b}");
    b["task_id"].as_str().expect("id").to_string()
}

struct Cluster {
    configs: Vec<PathBuf>,
    replicas: Vec<Server>,
}

impl Cluster {
    fn url(&self, i: usize) -> String {
        self.replicas[i % self.replicas.len()].url("")
    }
    /// SIGKILLs replica `i` and starts it again on the same config.
    fn restart(&mut self, i: usize) {
        let old = self.replicas.remove(i);
        old.kill();
        self.replicas.insert(i, Server::serve(&self.configs[i]));
    }
    fn kill_all_and_restart(&mut self) {
        for r in self.replicas.drain(..) {
            r.kill();
        }
        for c in &self.configs {
            self.replicas.push(Server::serve(c));
        }
    }
}

fn cluster(tmp: &Path, pki: &Pki, redis: Option<&RedisServer>, n: usize) -> Cluster {
    cluster_with(tmp, pki, redis, n, "", &[])
}

fn cluster_with(
    tmp: &Path,
    pki: &Pki,
    redis: Option<&RedisServer>,
    n: usize,
    extra: &str,
    policies: &[(&str, String)],
) -> Cluster {
    let configs: Vec<PathBuf> = (0..n)
        .map(|i| {
            let store = redis.map(|r| redis_store(&r.url(), "shared"));
            let dir = tmp.join(format!("r{i}"));
            let config = replica_config(tmp, &dir, pki, store, i, extra);
            for (name, text) in policies {
                std::fs::write(dir.join("policies").join(name), text).expect("policy");
            }
            config
        })
        .collect();
    let replicas = configs.iter().map(|c| Server::serve(c)).collect();
    Cluster { configs, replicas }
}

/// The single-use part: refused on every second presentation, on any replica and
/// after a restart; a refused (unauthorized) token never burns or stores its jti.
async fn single_use_is_refused_everywhere(c: &mut Cluster, pki: &Pki, key: &JwtSvidKey) {
    let ca = pki.bundle_a.clone();
    let token = key.sign_jti(AGENT, AUD, "jti-1");
    let (s, b) = declare_bearer(&c.url(0), &ca, &token).await;
    assert_eq!(s, 201, "first presentation: {b}");
    for i in [1, 2, 0, 1, 2] {
        let (s, b) = declare_bearer(&c.url(i), &ca, &token).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (401, Some("token_replayed")),
            "replica {i}"
        );
    }
    let last = c.replicas.len() - 1;
    c.restart(last);
    let (s, b) = declare_bearer(&c.url(last), &ca, &token).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (401, Some("token_replayed")),
        "after restart"
    );

    // A well-signed token of a subject the policy refuses: refused each time for what
    // it is, never as a replay, since nothing was consumed. Then distinct such tokens
    // spread over the replicas (the flood of the issue, scaled down: each one writes no
    // `jti`, which the caller counts in the store).
    let evil = key.sign_jti("spiffe://a.test/evil/x", AUD, "jti-evil");
    for i in 0..3 {
        let (s, b) = declare_bearer(&c.url(i), &ca, &evil).await;
        assert_eq!((s, b["code"].as_str()), (403, Some("policy_denied")), "{b}");
    }
    for n in 0..60 {
        let evil = key.sign_jti("spiffe://a.test/evil/x", AUD, &format!("jti-evil-{n}"));
        let (s, b) = declare_bearer(&c.url(n % c.replicas.len()), &ca, &evil).await;
        assert_eq!((s, b["code"].as_str()), (403, Some("policy_denied")), "{b}");
    }
    // An authorized single-use token is accepted once after all that.
    let fresh = key.sign_jti(AGENT, AUD, "jti-2");
    assert_eq!(declare_bearer(&c.url(1), &ca, &fresh).await.0, 201);
}

/// Out-of-scope probes alternating across replicas revoke the task; a fresh task does
/// not reset the principal's count.
async fn probes_across_replicas_revoke_the_task(c: &Cluster, agent: &reqwest::Client) {
    let task = declare(agent, &c.url(0)).await;
    for i in 0..4 {
        let (s, b) = mint(agent, &c.url(i), &task, "https://elsewhere.example.com").await;
        assert!(s == 403 || s == 409, "probe {i}: {s} {b}");
    }
    let (_, view) = get(agent, &format!("{}/v1/tasks/{task}", c.url(1))).await;
    assert_eq!(view["state"], "revoked", "{view}");
    assert_eq!(view["end_reason"], "anomaly: rule out-of-scope");

    // Two probes on one task, the third on a fresh one: the principal's window fires.
    let a = declare(agent, &c.url(0)).await;
    let b = declare(agent, &c.url(1)).await;
    mint(agent, &c.url(2), &a, "https://elsewhere.example.com").await;
    mint(agent, &c.url(0), &a, "https://elsewhere.example.com").await;
    mint(agent, &c.url(1), &b, "https://elsewhere.example.com").await;
    let (_, view) = get(agent, &format!("{}/v1/tasks/{b}", c.url(2))).await;
    assert_eq!(view["state"], "revoked", "fresh task revoked: {view}");
}

/// Three medium signals on one replica push the principal's risk to 90: every replica
/// refuses to mint within a second.
async fn a_risk_signal_on_one_replica_blocks_all(c: &Cluster, pki: &Pki) -> String {
    let agent2 = pki.client_as("agent2", AGENT2);
    let op = pki.client_as("op", OPERATOR);
    let task = declare(&agent2, &c.url(0)).await;
    assert_eq!(
        mint(&agent2, &c.url(1), &task, "https://api.example.com")
            .await
            .0,
        201
    );
    for _ in 0..3 {
        let (s, b) = post_json(
            &op,
            &format!("{}/v1/signals", c.url(0)),
            json!({"principal": AGENT2, "kind": "edr", "severity": "medium"}),
        )
        .await;
        assert_eq!(s, 202, "{b}");
    }
    let started = std::time::Instant::now();
    for i in 0..c.replicas.len() {
        let blocked = eventually(Duration::from_secs(1), || {
            let (agent2, url, task) = (agent2.clone(), c.url(i), task.clone());
            async move {
                let (s, b) = mint(&agent2, &url, &task, "https://api.example.com").await;
                (s == 403 && b["code"] == "policy_denied").then_some(())
            }
        })
        .await;
        assert!(blocked.is_some(), "replica {i} still mints");
    }
    println!(
        "risk signal blocked minting on all replicas after {:?}",
        started.elapsed()
    );
    task
}

#[tokio::test]
async fn three_replicas_on_one_redis_share_single_use_tokens_windows_and_risk() {
    let redis = RedisServer::start(&[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let key = svid_key(tmp.path());
    let mut c = cluster(tmp.path(), &pki, Some(&redis), 3);
    single_use_is_refused_everywhere(&mut c, &pki, &key).await;
    // Nothing of the refused tokens reached the store: only the two consumed jtis.
    let once = redis.cli(&["--raw", "KEYS", "{shared}:once:*"]);
    assert_eq!(once.lines().filter(|l| !l.is_empty()).count(), 2, "{once}");

    let agent = pki.client_as("agent", AGENT);
    probes_across_replicas_revoke_the_task(&c, &agent).await;
    let task = a_risk_signal_on_one_replica_blocks_all(&c, &pki).await;

    // All three SIGKILLed and restarted: the risk still blocks (on a fresh task too:
    // risk is the principal's), replays still refused.
    c.kill_all_and_restart();
    let agent2 = pki.client_as("agent2", AGENT2);
    let (s, b) = mint(&agent2, &c.url(0), &task, "https://api.example.com").await;
    assert!(
        (s, b["code"].as_str()) == (403, Some("policy_denied"))
            || (s, b["code"].as_str()) == (409, Some("task_not_active")),
        "{b}"
    );
    for i in 0..3 {
        let fresh = declare(&agent2, &c.url(i)).await;
        let (s, b) = mint(&agent2, &c.url(i), &fresh, "https://api.example.com").await;
        assert_eq!((s, b["code"].as_str()), (403, Some("policy_denied")), "{b}");
    }
    let token = key.sign_jti(AGENT, AUD, "jti-1");
    let (s, b) = declare_bearer(&c.url(2), &pki.bundle_a, &token).await;
    assert_eq!((s, b["code"].as_str()), (401, Some("token_replayed")));
}

#[tokio::test]
async fn one_embedded_node_keeps_single_use_tokens_and_risk_across_restarts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let key = svid_key(tmp.path());
    let mut c = cluster(tmp.path(), &pki, None, 1);
    single_use_is_refused_everywhere(&mut c, &pki, &key).await;
    let agent = pki.client_as("agent", AGENT);
    probes_across_replicas_revoke_the_task(&c, &agent).await;
    let task = a_risk_signal_on_one_replica_blocks_all(&c, &pki).await;
    c.kill_all_and_restart();
    let agent2 = pki.client_as("agent2", AGENT2);
    let _ = task;
    let fresh = declare(&agent2, &c.url(0)).await;
    let (s, b) = mint(&agent2, &c.url(0), &fresh, "https://api.example.com").await;
    assert_eq!(
        (s, b["code"].as_str()),
        (403, Some("policy_denied")),
        "risk survives: {b}"
    );
    let token = key.sign_jti(AGENT, AUD, "jti-1");
    let (s, b) = declare_bearer(&c.url(0), &pki.bundle_a, &token).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (401, Some("token_replayed")),
        "jti survives"
    );
}

/// Held on one replica, listed and approved on a second, collected on a third, across
/// SIGKILL restarts of all; a retried identical request collects an approved one once.
async fn approvals_span_replicas_and_restarts(c: &mut Cluster, pki: &Pki) {
    let agent = pki.client_as("agent-apr", AGENT);
    let op = pki.client_as("op", OPERATOR);
    let mut body = task_body("30m");
    body["scope"][0]["target"] = json!(PROD);
    let (s, task) = post_json(&agent, &format!("{}/v1/tasks", c.url(0)), body).await;
    assert_eq!(s, 201, "{task}");
    let task = task["task_id"].as_str().expect("id").to_string();

    let (s, held) = mint(&agent, &c.url(0), &task, PROD).await;
    assert_eq!(s, 202, "{held}");
    let id = held["approval_id"].as_str().expect("id").to_string();
    let (s, again) = mint(&agent, &c.url(1), &task, PROD).await;
    assert_eq!(
        (s, again["approval_id"].as_str()),
        (202, Some(id.as_str())),
        "same approval"
    );
    let (s, list) = get(&op, &format!("{}/v1/approvals?state=pending", c.url(1))).await;
    assert_eq!(s, 200, "{list}");
    assert!(
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|a| a["approval_id"] == id.as_str()),
        "{list}"
    );

    c.kill_all_and_restart();
    let url = |c: &Cluster, i: usize| format!("{}/v1/approvals/{id}", c.url(i));
    let (s, b) = get(&agent, &url(c, 2)).await;
    assert_eq!(
        (s, b["status"].as_str()),
        (202, Some("pending")),
        "survives: {b}"
    );
    let (s, b) = post_json(
        &op,
        &url(c, 1),
        json!({"decision": "approve", "reason": "CHG-1"}),
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("approved")), "{b}");

    c.kill_all_and_restart();
    let (s, minted) = get(&agent, &url(c, 2)).await;
    assert_eq!(s, 201, "collected on a third replica: {minted}");
    assert_eq!(minted["credential"]["token_type"], "Bearer");
    for i in 0..c.replicas.len() {
        let (s, b) = get(&agent, &url(c, i)).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (409, Some("approval_closed")),
            "replica {i}"
        );
    }

    // A retried identical request collects the approved approval, once.
    let (s, held) = mint(&agent, &c.url(0), &task, PROD).await;
    assert_eq!(s, 202, "{held}");
    let id2 = held["approval_id"].as_str().expect("id").to_string();
    assert_ne!(id2, id);
    let (s, _) = post_json(
        &op,
        &format!("{}/v1/approvals/{id2}", c.url(1)),
        json!({"decision": "approve", "reason": "CHG-2"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, b) = mint(&agent, &c.url(2), &task, PROD).await;
    assert_eq!(s, 201, "the retry collects: {b}");
    let (s, b) = mint(&agent, &c.url(0), &task, PROD).await;
    assert_eq!(s, 202, "collected once; the next one is held anew: {b}");
    assert_ne!(b["approval_id"].as_str(), Some(id2.as_str()));
}

#[tokio::test]
async fn approvals_are_shared_by_three_replicas_and_survive_their_restarts() {
    let redis = RedisServer::start(&[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let mut c = cluster(tmp.path(), &pki, Some(&redis), 3);
    approvals_span_replicas_and_restarts(&mut c, &pki).await;
}

#[tokio::test]
async fn approvals_survive_restarts_of_one_embedded_node() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let mut c = cluster(tmp.path(), &pki, None, 1);
    approvals_span_replicas_and_restarts(&mut c, &pki).await;
}

const CI_TARGET: &str = "https://deploy.example.com";

fn exchange_form(token: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange".into(),
        ),
        ("subject_token", token.into()),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:jwt".into(),
        ),
        ("resource", CI_TARGET.into()),
        ("scope", "deploy:write".into()),
    ]
}

async fn exchange(url: &str, ca: &Path, token: &str) -> (u16, Value) {
    let r = client(ca, None)
        .post(format!("{url}/v1/token"))
        .form(&exchange_form(token))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_approved_token_exchange_completes_on_retry_on_another_replica() {
    let redis = RedisServer::start(&[]);
    approved_exchange_completes_on_retry(Some(&redis), 3).await;
}

#[tokio::test]
async fn an_approved_token_exchange_completes_on_retry_on_one_embedded_node() {
    approved_exchange_completes_on_retry(None, 1).await;
}

async fn approved_exchange_completes_on_retry(redis: Option<&RedisServer>, n: usize) {
    let oidc = OidcIssuer::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let extra = format!(
        "[[oidc_issuers]]\nissuer = \"{}\"\naudiences = [\"{AUD}\"]\nalgorithms = [\"ES256\"]\nallow_insecure_http = true\njob_claims = [\"run_id\", \"run_attempt\"]\nmax_exchange_ttl = \"30m\"\n",
        oidc.issuer
    );
    let when = format!(
        r#"principal has issuer && principal.issuer == "{}" && resource.provider == "jwt" && resource.uri == "{CI_TARGET}""#,
        oidc.issuer
    );
    let policy = format!(
        "@id(\"ci-declare\")\npermit (principal, action == Mayfly::Action::\"DeclareTask\", resource)\nwhen {{ {when} }};\n\
         @id(\"ci-mint\") @approval(\"required\")\npermit (principal, action == Mayfly::Action::\"MintCredential\", resource)\nwhen {{ {when} }};\n"
    );
    let c = cluster_with(tmp.path(), &pki, redis, n, &extra, &[("ci.cedar", policy)]);
    let claims = json!({"aud": AUD, "sub": "repo:acme/app:ref:refs/heads/main", "run_id": "42", "run_attempt": "1"});
    let token = oidc.mint(claims.clone()).await;
    let (s, b) = exchange(&c.url(0), &pki.bundle_a, &token).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("authorization_pending")),
        "{b}"
    );
    let op = pki.client_as("op", OPERATOR);
    let (_, list) = get(&op, &format!("{}/v1/approvals?state=pending", c.url(1))).await;
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{list}");
    let id = items[0]["approval_id"].as_str().expect("id").to_string();
    // A retry before the decision answers the same approval, not a second one.
    let (s, _) = exchange(&c.url(2), &pki.bundle_a, &token).await;
    assert_eq!(s, 400);
    let (_, list) = get(&op, &format!("{}/v1/approvals?state=pending", c.url(0))).await;
    assert_eq!(list["items"].as_array().expect("items").len(), 1, "{list}");

    let (s, b) = post_json(
        &op,
        &format!("{}/v1/approvals/{id}", c.url(1)),
        json!({"decision": "approve", "reason": "release 1.2"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // The job retries (a fresh token of the same job) on another replica: it completes.
    let retry = oidc.mint(claims).await;
    let (s, b) = exchange(&c.url(2), &pki.bundle_a, &retry).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["access_token"].is_string());
    let (_, list) = get(&op, &format!("{}/v1/approvals?state=collected", c.url(0))).await;
    assert_eq!(list["items"][0]["approval_id"], id.as_str());
}

fn es256_pem() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("key")
        .serialize_pem()
}

/// Replaces the config's single signing key with a key directory.
fn use_keys_dir(config: &Path, keys: &Path) {
    let text = std::fs::read_to_string(config).expect("read");
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("signing_key_file") {
                format!("keys_dir = {keys:?}\nkeys_reload_interval = \"200ms\"")
            } else if l.starts_with("generate_key") {
                String::new()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(config, text.join("\n")).expect("write");
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().expect("header");
    let v: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .expect("b64"),
    )
    .expect("json");
    v["kid"].as_str().expect("kid").to_string()
}

async fn jwks_kids(url: &str, ca: &Path) -> Vec<String> {
    let v: Value = client(ca, None)
        .get(format!("{url}/.well-known/jwks.json"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    v["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_string())
        .collect()
}

async fn token_on(agent: &reqwest::Client, url: &str, task: &str) -> String {
    let (s, b) = mint(agent, url, task, "https://api.example.com").await;
    assert_eq!(s, 201, "{b}");
    b["credential"]["access_token"]
        .as_str()
        .expect("token")
        .to_string()
}

/// A rolling rotation across two replicas, each reading its own copy of the key Secret
/// (updated one pod at a time): every token, signed before, during and after, stays
/// introspectable on both.
#[tokio::test]
async fn a_rolling_key_rotation_across_two_replicas_keeps_every_token_introspectable() {
    let redis = RedisServer::start(&[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let (k1, k2) = (es256_pem(), es256_pem());
    let mut keys = Vec::new();
    let mut replicas = Vec::new();
    for i in 0..2 {
        let dir = tmp.path().join(format!("r{i}"));
        let config = replica_config(
            tmp.path(),
            &dir,
            &pki,
            Some(redis_store(&redis.url(), "rot")),
            i,
            "",
        );
        let kd = dir.join("jwt-keys");
        std::fs::create_dir_all(&kd).expect("mkdir");
        write_atomically(&kd.join("current.pem"), &k1);
        use_keys_dir(&config, &kd);
        keys.push(kd);
        replicas.push(Server::serve(&config));
    }
    let url = |i: usize| replicas[i].url("");
    let ca = pki.bundle_a.clone();
    let agent = pki.client_as("agent", AGENT);
    let task = declare(&agent, &url(0)).await;
    let mut tokens = vec![
        token_on(&agent, &url(0), &task).await,
        token_on(&agent, &url(1), &task).await,
    ];
    let kid1 = kid_of(&tokens[0]);

    // Step 1: publish next on each pod in turn; both keep signing with the current key.
    for kd in &keys {
        write_atomically(&kd.join("next.pem"), &k2);
    }
    let mut kid2 = String::new();
    for i in 0..2 {
        let kids = eventually(Duration::from_secs(10), || {
            let (u, ca) = (url(i), ca.clone());
            async move {
                let kids = jwks_kids(&u, &ca).await;
                (kids.len() == 2).then_some(kids)
            }
        })
        .await
        .expect("next key published");
        assert_eq!(kids[0], kid1);
        kid2 = kids[1].clone();
        tokens.push(token_on(&agent, &url(i), &task).await);
    }

    // Step 2, one pod at a time: next becomes current, current becomes previous.
    for (i, kd) in keys.iter().enumerate() {
        write_atomically(&kd.join("previous.pem"), &k1);
        write_atomically(&kd.join("current.pem"), &k2);
        std::fs::remove_file(kd.join("next.pem")).expect("rm");
        let signed = eventually(Duration::from_secs(10), || {
            let (agent, u, task, kid2) = (agent.clone(), url(i), task.clone(), kid2.clone());
            async move {
                let t = token_on(&agent, &u, &task).await;
                (kid_of(&t) == kid2).then_some(t)
            }
        })
        .await
        .expect("replica signs with the new key");
        tokens.push(signed);
        // Mid-rotation: the other replica may still sign with the old key.
        tokens.push(token_on(&agent, &url(1 - i), &task).await);
        for t in &tokens {
            for r in 0..2 {
                assert_eq!(
                    introspect(&agent, &format!("{}/v1/introspect", url(r)), t).await["active"],
                    true,
                    "token of kid {} on replica {r} after step 2 on replica {i}",
                    kid_of(t)
                );
            }
        }
    }
    assert!(tokens.iter().any(|t| kid_of(t) == kid1) && tokens.iter().any(|t| kid_of(t) == kid2));
    println!(
        "{} tokens across a rolling rotation, all active on both replicas",
        tokens.len()
    );
}

/// 200 000 tasks of one attacker (driven through the real engine and store in process:
/// 200 000 HTTP requests would take minutes here) neither clear another principal's
/// windows, risk or deny flags, nor stop an authorized CI job's single-use token.
#[tokio::test]
async fn two_hundred_thousand_attacker_tasks_clear_no_one_elses_state() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = std::sync::Arc::new(
        mayfly::lease::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).expect("store"),
    );
    attacker_tasks_clear_no_one_elses_state(store).await;
}

/// The same on the shared store the replicas use: real Redis, where every window, risk
/// score and flag is a key with its own TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_thousand_attacker_tasks_clear_no_one_elses_state_on_redis() {
    let redis = RedisServer::start(&[]);
    let store = mayfly::lease::redis::RedisStore::connect(&mayfly::lease::redis::RedisConfig {
        url: redis.url(),
        key_prefix: "attack".into(),
        username: None,
        password_file: None,
        tls_ca_file: None,
        durability: mayfly::lease::redis::Durability::Server,
        op_timeout: Duration::from_secs(5),
    })
    .await
    .expect("store");
    attacker_tasks_clear_no_one_elses_state(std::sync::Arc::new(store)).await;
}

async fn attacker_tasks_clear_no_one_elses_state(
    store: std::sync::Arc<dyn mayfly::lease::LeaseStore>,
) {
    use mayfly::anomaly::{AnomalyConfig, AnomalyEngine, Quotas, Signal};
    use mayfly::identity::Principal;
    use mayfly::task::TaskId;
    // Quotas off: the attacker is assumed to get all its tasks declared.
    let cfg = AnomalyConfig {
        quotas: Quotas {
            tasks: 0,
            requests: 0,
            window: Duration::from_secs(60),
        },
        ..AnomalyConfig::default()
    };
    let engine = AnomalyEngine::new(cfg, store.clone());
    let victim = Principal::parse(AGENT).expect("p");
    let (probed, denied) = (TaskId::generate(), TaskId::generate());
    for _ in 0..2 {
        assert!(
            engine
                .observe(&victim, Some(&probed), Signal::OutOfScope)
                .await
                .expect("obs")
                .is_empty()
        );
    }
    engine.deny(&denied).await.expect("deny");
    let risk_before = engine.risk(&victim).await.expect("risk").0;
    assert_eq!(risk_before, 40);

    let attacker = Principal::parse("spiffe://a.test/agent/attacker").expect("p");
    let started = std::time::Instant::now();
    // 16 concurrent streams, as an attacker spread over connections and replicas would.
    let engine = std::sync::Arc::new(engine);
    let streams: Vec<_> = (0..16)
        .map(|_| {
            let (engine, attacker) = (engine.clone(), attacker.clone());
            tokio::spawn(async move {
                for _ in 0..200_000 / 16 {
                    let t = TaskId::generate();
                    engine
                        .observe(&attacker, Some(&t), Signal::Request)
                        .await
                        .expect("obs");
                }
            })
        })
        .collect();
    for s in streams {
        s.await.expect("stream");
    }
    println!("200000 attacker tasks observed in {:?}", started.elapsed());

    let fired = engine
        .observe(&victim, Some(&probed), Signal::OutOfScope)
        .await
        .expect("obs");
    assert_eq!(
        fired.len(),
        1,
        "the victim's window survived: its third probe fires"
    );
    assert!(
        engine.is_denied(&denied).await.expect("flag"),
        "deny flag kept"
    );
    assert_eq!(
        engine.risk(&victim).await.expect("risk").0,
        60,
        "risk kept (+20)"
    );
    let exp = time::OffsetDateTime::now_utc() + time::Duration::minutes(10);
    assert!(
        store
            .insert_once("jti:bearer:https://ci:run-1", exp)
            .await
            .expect("jti"),
        "an authorized CI job's single-use token is accepted"
    );
}

/// A provider's rate limit holds across three replicas: grants measured across all of
/// them over the run stay within rate × seconds + burst.
#[tokio::test]
async fn a_providers_rate_limit_holds_globally_across_three_replicas() {
    let redis = RedisServer::start(&[]);
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let (rate, burst) = (20.0, 5.0);
    let mut c = cluster_with(tmp.path(), &pki, Some(&redis), 3, "", &[]);
    // The jwt provider with a budget; the principal may use all of it (one agent here);
    // the per-principal request quota off so only the bucket refuses.
    for (i, config) in c.configs.clone().iter().enumerate() {
        let text = std::fs::read_to_string(config).expect("read").replace(
            "[providers.jwt]\n",
            &format!(
                "[providers.jwt]\nrate_limit_per_second = {rate}\nrate_limit_burst = {burst}\n"
            ),
        );
        let text = text.replace("[limits]\n", "[limits]\nprincipal_rate_share = 1.0\n");
        let text = if text.contains("[limits]") {
            text
        } else {
            format!("{text}\n[limits]\nprincipal_rate_share = 1.0\n")
        };
        let text = format!("{text}\n[anomaly]\nmax_requests_per_principal = 0\n");
        std::fs::write(config, text).expect("write");
        c.restart(i);
    }
    let agent = pki.client_as("agent", AGENT);
    let task = declare(&agent, &c.url(0)).await;
    let urls: Vec<String> = (0..3).map(|i| c.url(i)).collect();
    let run = Duration::from_secs(3);
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for w in 0..6usize {
        let (agent, urls, task) = (agent.clone(), urls.clone(), task.clone());
        workers.push(tokio::spawn(async move {
            let (mut granted, mut limited, mut n) = (0u64, 0u64, w);
            while started.elapsed() < run {
                n += 1;
                let (s, b) = mint(&agent, &urls[n % 3], &task, "https://api.example.com").await;
                match s {
                    201 => granted += 1,
                    429 => {
                        assert_eq!(b["code"], "rate_limited");
                        limited += 1;
                    }
                    other => panic!("unexpected {other}: {b}"),
                }
            }
            (granted, limited)
        }));
    }
    let (mut granted, mut limited) = (0, 0);
    for w in workers {
        let (g, l) = w.await.expect("join");
        granted += g;
        limited += l;
    }
    let secs = started.elapsed().as_secs_f64();
    let bound = rate * secs + burst;
    println!(
        "{granted} grants ({:.1}/s) and {limited} refusals in {secs:.2} s across 3 replicas; bound {bound:.0}",
        granted as f64 / secs
    );
    assert!(limited > 0, "the load exceeded the budget");
    assert!(
        granted as f64 <= bound,
        "{granted} grants > rate × {secs:.2} s + burst = {bound:.0}"
    );
}

/// `mayfly approval ls|approve|deny` against a running broker.
#[tokio::test]
async fn the_approval_cli_lists_approves_and_denies() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let c = cluster(tmp.path(), &pki, None, 1);
    let op = pki.svid("op-cli", OPERATOR);
    let env = vec![
        ("MAYFLY_ADDR", c.url(0)),
        ("MAYFLY_CERT", op.cert.display().to_string()),
        ("MAYFLY_KEY", op.key.display().to_string()),
        ("MAYFLY_CA", pki.bundle_a.display().to_string()),
    ];
    let cli = |args: &[&str]| -> Value {
        let out = run_cli_env(args, &env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let agent = pki.client_as("agent", AGENT);
    let mut body = task_body("30m");
    body["scope"][0]["target"] = json!(PROD);
    let (_, task) = post_json(&agent, &format!("{}/v1/tasks", c.url(0)), body).await;
    let task = task["task_id"].as_str().expect("id").to_string();
    let (s, held) = mint(&agent, &c.url(0), &task, PROD).await;
    assert_eq!(s, 202);
    let id = held["approval_id"].as_str().expect("id").to_string();

    let listed = cli(&["approval", "ls", "--json"]);
    assert_eq!(listed["items"][0]["approval_id"], id.as_str(), "{listed}");
    let approved = cli(&["approval", "approve", &id, "--reason", "CHG-7", "--json"]);
    assert_eq!(approved["status"], "approved");
    assert_eq!(cli(&["approval", "ls", "--json"])["items"], json!([]));
    let (s, _) = get(&agent, &format!("{}/v1/approvals/{id}", c.url(0))).await;
    assert_eq!(s, 201);

    let (_, held) = mint(&agent, &c.url(0), &task, PROD).await;
    let id2 = held["approval_id"].as_str().expect("id").to_string();
    let denied = cli(&["approval", "deny", &id2, "--reason", "freeze", "--json"]);
    assert_eq!(denied["status"], "rejected");
    let out = run_cli_env(&["approval", "approve", &id2, "--reason", "again"], &env);
    assert!(
        !out.status.success(),
        "a decided approval cannot be decided again"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("approval_closed"));
}

/// Each principal has its own share of a provider's budget: one agent spending its share
/// leaves the rest to the others.
#[tokio::test]
async fn one_agent_cannot_spend_another_agents_share_of_a_provider_budget() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let mut c = cluster(tmp.path(), &pki, None, 1);
    let config = c.configs[0].clone();
    let text = std::fs::read_to_string(&config).expect("read").replace(
        "[providers.jwt]\n",
        "[providers.jwt]\nrate_limit_per_second = 0.1\nrate_limit_burst = 4\n",
    );
    std::fs::write(
        &config,
        format!("{text}\n[limits]\nprincipal_rate_share = 0.5\n"),
    )
    .expect("write");
    c.restart(0);
    let (a, b) = (pki.client_as("a", AGENT), pki.client_as("b", AGENT2));
    let (ta, tb) = (declare(&a, &c.url(0)).await, declare(&b, &c.url(0)).await);
    for _ in 0..2 {
        assert_eq!(
            mint(&a, &c.url(0), &ta, "https://api.example.com").await.0,
            201
        );
    }
    let (s, body) = mint(&a, &c.url(0), &ta, "https://api.example.com").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (429, Some("rate_limited")),
        "a's share (2) spent"
    );
    for _ in 0..2 {
        let (s, body) = mint(&b, &c.url(0), &tb, "https://api.example.com").await;
        assert_eq!(s, 201, "b still has its share: {body}");
    }
    let (s, _) = mint(&b, &c.url(0), &tb, "https://api.example.com").await;
    assert_eq!(s, 429, "the provider's burst (4) is spent");
}

/// A flood counted across replicas sets a deny flag every replica honours, also after
/// all of them restart.
async fn a_deny_flag_holds_everywhere_and_after_restarts(redis: Option<&RedisServer>, n: usize) {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    svid_key(tmp.path());
    let extra = "[anomaly]\ndeny_for = \"10m\"\n[[anomaly.rules]]\nname = \"flood\"\nsignal = \"request\"\nthreshold = 3\nwindow = \"60s\"\naction = \"deny\"\nmode = \"enforce\"\n";
    let mut c = cluster_with(tmp.path(), &pki, redis, n, extra, &[]);
    let agent = pki.client_as("agent", AGENT);
    let task = declare(&agent, &c.url(0)).await;
    for i in 0..3 {
        assert_eq!(
            mint(&agent, &c.url(i), &task, "https://api.example.com")
                .await
                .0,
            201
        );
    }
    for i in 0..n {
        let (s, b) = mint(&agent, &c.url(i), &task, "https://api.example.com").await;
        assert_eq!(
            (s, b["code"].as_str()),
            (403, Some("anomaly_denied")),
            "replica {i}"
        );
    }
    c.kill_all_and_restart();
    for i in 0..n {
        let (s, b) = mint(&agent, &c.url(i), &task, "https://api.example.com").await;
        assert_eq!(
            (s, b["code"].as_str()),
            (403, Some("anomaly_denied")),
            "after restart, replica {i}"
        );
    }
}

#[tokio::test]
async fn a_deny_flag_is_shared_by_three_replicas_and_survives_their_restarts() {
    let redis = RedisServer::start(&[]);
    a_deny_flag_holds_everywhere_and_after_restarts(Some(&redis), 3).await;
}

#[tokio::test]
async fn a_deny_flag_survives_restarts_of_one_embedded_node() {
    a_deny_flag_holds_everywhere_and_after_restarts(None, 1).await;
}

/// With the store unreachable a single-use token is refused with its own code, never
/// accepted unchecked; once the store is back the same (unconsumed) token works once.
#[tokio::test]
async fn a_single_use_token_is_refused_while_the_store_is_unreachable() {
    let redis = RedisServer::start(&[]);
    let port = redis.port;
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let key = svid_key(tmp.path());
    let c = cluster(tmp.path(), &pki, Some(&redis), 1);
    let token = key.sign_jti(AGENT, AUD, "jti-down");
    // Introspecting a garbage token needs no store; consuming the bearer's jti does.
    let introspect_with = |token: String| {
        let (url, ca) = (c.url(0), pki.bundle_a.clone());
        async move {
            let r = client(&ca, None)
                .post(format!("{url}/v1/introspect"))
                .bearer_auth(token)
                .form(&[("token", "not-a-jwt")])
                .send()
                .await
                .expect("send");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let data = redis.stop_keep_data();
    let (s, b) = introspect_with(token.clone()).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (503, Some("single_use_store_unavailable")),
        "{b}"
    );
    let redis = RedisServer::start_in(port, data, &[]);
    let back = eventually(Duration::from_secs(15), || {
        let t = token.clone();
        let f = &introspect_with;
        async move { (f(t).await.0 == 200).then_some(()) }
    })
    .await;
    assert!(
        back.is_some(),
        "the token was not consumed while the store was down"
    );
    let (s, b) = introspect_with(token).await;
    assert_eq!((s, b["code"].as_str()), (401, Some("token_replayed")));
    drop(redis);
}
