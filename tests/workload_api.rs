#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Trust bundles streamed from the SPIFFE Workload API, against the real `mayfly` binary
//! and a Workload API stand-in speaking the real gRPC protocol on a unix socket
//! (`tests/fixtures/workload_api/server.py`).

mod common;

use common::*;
use mayfly::pki::{Ca, LeafSpec};
use std::path::{Path, PathBuf};
use std::time::Duration;

const AUD: &str = "https://mayfly.test";
const B_AGENT: &str = "spiffe://b.test/agent/x";

struct Env {
    dir: tempfile::TempDir,
    pki: Pki,
    stub: Option<WorkloadApiStub>,
    config: PathBuf,
}

impl Env {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn stub_dir(&self) -> PathBuf {
        self.dir.path().join("workload-api")
    }

    fn stub(&self) -> &WorkloadApiStub {
        self.stub.as_ref().expect("stub running")
    }

    /// An agent SVID of trust domain B issued by `ca`.
    fn b_agent(&self, name: &str, ca: &Ca) -> Pair {
        self.pki.issue_with(ca, name, &LeafSpec::svid(B_AGENT, 1))
    }
}

/// Trust domain B's X.509 bundle (and, with `jwt`, its JWT bundle) from the Workload API;
/// trust domain A (the broker's own certificate) from its PEM file.
fn setup(jwt: bool, initial_timeout: &str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let socket = dir.path().join("agent.sock");
    let jwt_svid = if jwt {
        format!(
            "[[jwt_svid]]\ntrust_domain = \"{TD_B}\"\nsource = \"workload_api\"\naudiences = [\"{AUD}\"]\n"
        )
    } else {
        String::new()
    };
    let opts = ConfigOptions {
        td_b: Some("source = \"workload_api\"".into()),
        extra: format!(
            "[workload_api]\nsocket = \"unix://{}\"\ninitial_timeout = \"{initial_timeout}\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n{jwt_svid}",
            socket.display()
        ),
        ..ConfigOptions::default()
    };
    let config = write_config(dir.path(), &pki, &opts);
    Env {
        dir,
        pki,
        stub: None,
        config,
    }
}

fn start_stub(env: &mut Env) {
    let dir = env.stub_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    env.stub = Some(WorkloadApiStub::start(&env.socket(), &dir));
}

async fn eventually_status(
    server: &Server,
    ca: &Path,
    pair: &Pair,
    want: u16,
) -> Option<serde_json::Value> {
    eventually(Duration::from_secs(10), || async {
        let (s, body) = declare_with_svid(server, ca, pair).await;
        (s == want).then_some(body)
    })
    .await
}

#[tokio::test]
async fn x509_bundles_from_the_workload_api_rotate_without_restart_and_survive_a_broken_stream() {
    let mut env = setup(false, "10s");
    start_stub(&mut env);
    env.stub().set_x509(TD_B, env.pki.ca_b.cert_pem());
    let server = Server::serve(&env.config);
    let ca = env.pki.bundle_a.clone();

    // Served from the first streamed bundle: an SVID of B's CA is accepted over mTLS.
    let old = env.b_agent("b-old", &env.pki.ca_b);
    let (s, body) = declare_with_svid(&server, &ca, &old).await;
    assert_eq!(s, 201, "{body}\n{}", server.logs());

    // The agent rotates B to a new CA: the new CA's SVIDs are accepted, the old refused,
    // with no restart.
    let b2 = Ca::generate("CA B2", TD_B).expect("ca");
    let new = env.b_agent("b-new", &b2);
    let (s, body) = declare_with_svid(&server, &ca, &new).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("svid_untrusted_chain"))
    );
    env.stub().set_x509(TD_B, b2.cert_pem());
    assert!(
        eventually_status(&server, &ca, &new, 201).await.is_some(),
        "the rotated CA is trusted without a restart\n{}",
        server.logs()
    );
    let (s, body) = declare_with_svid(&server, &ca, &old).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("svid_untrusted_chain")),
        "the old CA is no longer trusted"
    );

    // The agent goes away: the last good bundle stays in force.
    let failures = "mayfly_workload_api_stream_failures_total";
    let before = metric_value(&metrics_text(&server, &ca).await, failures, &[]);
    env.stub.take().expect("stub").stop();
    wait_for_metric(
        &server,
        &ca,
        failures,
        &[],
        before + 1.0,
        Duration::from_secs(10),
    )
    .await;
    let (s, body) = declare_with_svid(&server, &ca, &new).await;
    assert_eq!(s, 201, "last good bundle kept: {body}");
    let metrics = metrics_text(&server, &ca).await;
    assert_eq!(
        metric_value(&metrics, "mayfly_workload_api_connected", &[]),
        0.0,
        "{metrics}"
    );

    // It comes back with yet another CA: Mayfly reconnects (backoff) and follows it.
    let b3 = Ca::generate("CA B3", TD_B).expect("ca");
    let _ = std::fs::remove_file(env.socket());
    start_stub(&mut env);
    env.stub().set_x509(TD_B, b3.cert_pem());
    let newest = env.b_agent("b-newest", &b3);
    assert!(
        eventually_status(&server, &ca, &newest, 201)
            .await
            .is_some(),
        "reconnected after the stream broke\n{}",
        server.logs()
    );
    let (s, _) = declare_with_svid(&server, &ca, &new).await;
    assert_eq!(s, 401, "B2 left the bundle");

    // The agent stops listing B (federation removed): B is no longer trusted at all.
    env.stub().set_x509(TD_A, env.pki.ca_a.cert_pem());
    env.stub().remove_x509(TD_B);
    let gone = eventually(Duration::from_secs(10), || async {
        let (s, body) = declare_with_svid(&server, &ca, &newest).await;
        (s == 401 && body["code"] == "svid_unknown_trust_domain").then_some(())
    })
    .await;
    assert!(gone.is_some(), "{}", server.logs());
}

#[tokio::test]
async fn jwt_bundles_from_the_workload_api_verify_jwt_svids_and_rotate() {
    let mut env = setup(true, "10s");
    start_stub(&mut env);
    let k1 = JwtSvidKey::generate("k1");
    env.stub().set_x509(TD_B, env.pki.ca_b.cert_pem());
    env.stub()
        .set_jwt(TD_B, &serde_json::json!({ "keys": [k1.jwk] }));
    let server = Server::serve(&env.config);
    let ca = env.pki.bundle_a.clone();

    let (s, body) = declare_with_bearer(&server, &ca, &k1.sign(B_AGENT, AUD)).await;
    assert_eq!(s, 201, "{body}\n{}", server.logs());

    // The agent replaces k1 by k2: k2's tokens are accepted, k1's refused.
    let k2 = JwtSvidKey::generate("k2");
    env.stub()
        .set_jwt(TD_B, &serde_json::json!({ "keys": [k2.jwk] }));
    let accepted = eventually(Duration::from_secs(10), || async {
        let (s, _) = declare_with_bearer(&server, &ca, &k2.sign(B_AGENT, AUD)).await;
        (s == 201).then_some(())
    })
    .await;
    assert!(accepted.is_some(), "k2 trusted\n{}", server.logs());
    let (s, body) = declare_with_bearer(&server, &ca, &k1.sign(B_AGENT, AUD)).await;
    assert_eq!((s, body["code"].as_str()), (401, Some("token_unknown_kid")));
}

#[test]
fn the_broker_refuses_to_start_when_no_workload_api_answers() {
    let env = setup(false, "1s");
    let started = std::time::Instant::now();
    let out = run_cli(&["serve", "-c", env.config.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail closed: {err}");
    assert!(
        err.contains("SPIFFE Workload API") && err.contains("X.509 b.test"),
        "{err}"
    );
    assert!(err.contains("connect"), "names the cause: {err}");
    assert!(started.elapsed() < Duration::from_secs(15), "bounded wait");
}

#[test]
fn the_broker_refuses_to_start_when_the_workload_api_never_lists_the_trust_domain() {
    let mut env = setup(false, "1s");
    start_stub(&mut env);
    // The agent knows only trust domain A: nothing for B.
    env.stub().set_x509(TD_A, env.pki.ca_a.cert_pem());
    let out = run_cli(&["serve", "-c", env.config.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail closed: {err}");
    assert!(err.contains("X.509 b.test"), "{err}");
}
