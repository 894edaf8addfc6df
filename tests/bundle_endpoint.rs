#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Trust bundles from SPIFFE bundle endpoints (`https_web` and `https_spiffe` profiles),
//! against the real `mayfly` binary and a real HTTPS server in the test.

mod common;

use common::*;
use mayfly::pki::{Ca, LeafSpec};
use std::path::Path;
use std::time::Duration;

const B_AGENT: &str = "spiffe://b.test/agent/x";
const ENDPOINT_ID: &str = "spiffe://b.test/bundle-server";
const AUD: &str = "https://mayfly.test";

fn ip() -> std::net::IpAddr {
    "127.0.0.1".parse().expect("ip")
}

/// A bundle server certificate that is an SVID of trust domain B named `id`.
fn endpoint_svid(pki: &Pki, ca: &Ca, name: &str, id: &str) -> Pair {
    pki.issue_with(
        ca,
        name,
        &LeafSpec::server(Some(id), &["localhost"], &[ip()], 1),
    )
}

fn b_agent(pki: &Pki, name: &str, ca: &Ca) -> Pair {
    pki.issue_with(ca, name, &LeafSpec::svid(B_AGENT, 1))
}

fn serve_with(dir: &Path, pki: &Pki, td_b: String, extra: String) -> Server {
    let opts = ConfigOptions {
        td_b: Some(td_b),
        extra,
        ..ConfigOptions::default()
    };
    Server::serve(&write_config(dir, pki, &opts))
}

async fn eventually_status(server: &Server, ca: &Path, pair: &Pair, want: u16) -> bool {
    eventually(Duration::from_secs(10), || async {
        let (s, _) = declare_with_svid(server, ca, pair).await;
        (s == want).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn an_https_web_bundle_endpoint_is_followed_through_a_ca_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    // The endpoint's server certificate comes from a separate "web" CA.
    let web = Ca::generate("Web CA", "web.test").expect("ca");
    let web_ca = dir.path().join("web-ca.pem");
    std::fs::write(&web_ca, web.cert_pem()).expect("write");
    let cert = pki.issue_with(
        &web,
        "endpoint",
        &LeafSpec::server(None, &["localhost"], &[ip()], 1),
    );
    let endpoint = BundleServer::start(&cert, spiffe_bundle_doc(&[&pki.ca_b], &[], 1, 1));
    let server = serve_with(
        dir.path(),
        &pki,
        format!(
            "bundle_endpoint = \"{}\"\nendpoint_profile = \"https_web\"\nendpoint_ca_file = {web_ca:?}\nrefresh_min = \"1s\"\nrefresh_max = \"2s\"",
            endpoint.url()
        ),
        String::new(),
    );
    let ca = pki.bundle_a.clone();
    let old = b_agent(&pki, "b-old", &pki.ca_b);
    let (s, body) = declare_with_svid(&server, &ca, &old).await;
    assert_eq!(s, 201, "first bundle fetched before serving: {body}");

    let b2 = Ca::generate("CA B2", TD_B).expect("ca");
    let new = b_agent(&pki, "b-new", &b2);
    endpoint.set_doc(spiffe_bundle_doc(&[&b2], &[], 2, 1));
    assert!(
        eventually_status(&server, &ca, &new, 201).await,
        "refreshed on spiffe_refresh_hint\n{}",
        server.logs()
    );
    let (s, body) = declare_with_svid(&server, &ca, &old).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("svid_untrusted_chain"))
    );

    // A broken answer, then an older sequence (a replay): both refused, B2 stays.
    let failed = [("source", "endpoint"), ("outcome", "failed")];
    let before = metric_value(
        &metrics_text(&server, &ca).await,
        "mayfly_trust_bundle_updates_total",
        &failed,
    );
    endpoint.set_doc("{\"keys\": 5}".into());
    wait_for_metric(
        &server,
        &ca,
        "mayfly_trust_bundle_updates_total",
        &failed,
        before + 1.0,
        Duration::from_secs(10),
    )
    .await;
    let (s, _) = declare_with_svid(&server, &ca, &new).await;
    assert_eq!(s, 201, "last good bundle kept after a broken answer");
    endpoint.set_doc(spiffe_bundle_doc(&[&pki.ca_b], &[], 1, 1));
    server
        .wait_for_log("spiffe_sequence went back", Duration::from_secs(10))
        .await;
    let (s, _) = declare_with_svid(&server, &ca, &new).await;
    assert_eq!(s, 201, "last good bundle kept\n{}", server.logs());
    let (s, _) = declare_with_svid(&server, &ca, &old).await;
    assert_eq!(s, 401, "the rolled-back bundle was refused");
}

#[test]
fn without_a_bootstrap_bundle_an_unreachable_endpoint_stops_the_broker_at_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    // The endpoint's certificate is from CA A, but Mayfly is told to trust only CA B for it.
    let cert = pki.issue_with(
        &pki.ca_a,
        "endpoint",
        &LeafSpec::server(None, &["localhost"], &[ip()], 1),
    );
    let endpoint = BundleServer::start(&cert, spiffe_bundle_doc(&[&pki.ca_b], &[], 1, 1));
    let opts = ConfigOptions {
        td_b: Some(format!(
            "bundle_endpoint = \"{}\"\nendpoint_ca_file = {:?}",
            endpoint.url(),
            pki.bundle_b
        )),
        ..ConfigOptions::default()
    };
    let config = write_config(dir.path(), &pki, &opts);
    let out = run_cli(&["serve", "-c", config.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail closed: {err}");
    assert!(err.contains("bundle endpoint"), "{err}");
    assert_eq!(
        endpoint.requests(),
        0,
        "no request over an unverified connection"
    );
}

#[tokio::test]
async fn an_https_spiffe_endpoint_is_authenticated_by_its_svid_and_carries_trust_across_a_rotation()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let b2 = Ca::generate("CA B2", TD_B).expect("ca");
    let jwt_key = JwtSvidKey::generate("k1");
    // Phase 1: the endpoint (an SVID of CA B) announces CA B2 beside CA B.
    let cert = endpoint_svid(&pki, &pki.ca_b, "endpoint", ENDPOINT_ID);
    let endpoint = BundleServer::start(
        &cert,
        spiffe_bundle_doc(&[&pki.ca_b, &b2], &[&jwt_key.jwk], 1, 1),
    );
    let server = serve_with(
        dir.path(),
        &pki,
        format!(
            "bundle_endpoint = \"{url}\"\nendpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"{ENDPOINT_ID}\"\nbundle_file = {boot:?}\nrefresh_min = \"1s\"\nrefresh_max = \"2s\"",
            url = endpoint.url(),
            boot = pki.bundle_b,
        ),
        // JWT-SVID keys of B from the same endpoint, authenticated the same way.
        format!(
            "[[jwt_svid]]\ntrust_domain = \"{TD_B}\"\nbundle_endpoint = \"{url}\"\nendpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"{ENDPOINT_ID}\"\naudiences = [\"{AUD}\"]\n",
            url = endpoint.url()
        ),
    );
    let ca = pki.bundle_a.clone();
    let new = b_agent(&pki, "b-new", &b2);
    let (s, body) = declare_with_svid(&server, &ca, &new).await;
    assert_eq!(
        s,
        201,
        "B2 announced by the endpoint: {body}\n{}",
        server.logs()
    );
    let (s, body) = declare_with_bearer(&server, &ca, &jwt_key.sign(B_AGENT, AUD)).await;
    assert_eq!(
        s,
        201,
        "JWT-SVID keys over https_spiffe: {body}\n{}",
        server.logs()
    );

    // Phase 2: the endpoint itself moves to an SVID of CA B2 — trusted only because the
    // last fetch said so (the bootstrap file still holds CA B alone) — and drops CA B.
    endpoint.set_cert(&endpoint_svid(&pki, &b2, "endpoint2", ENDPOINT_ID));
    endpoint.set_doc(spiffe_bundle_doc(&[&b2], &[&jwt_key.jwk], 2, 1));
    let old = b_agent(&pki, "b-old", &pki.ca_b);
    assert!(
        eventually_status(&server, &ca, &old, 401).await,
        "CA B dropped after a fetch from the endpoint's new SVID\n{}",
        server.logs()
    );
    let (s, _) = declare_with_svid(&server, &ca, &new).await;
    assert_eq!(s, 201);
}

#[tokio::test]
async fn an_https_spiffe_endpoint_presenting_another_spiffe_id_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let b2 = Ca::generate("CA B2", TD_B).expect("ca");
    // A valid SVID of the right trust domain, but not the configured endpoint ID.
    let cert = endpoint_svid(&pki, &pki.ca_b, "impostor", "spiffe://b.test/impostor");
    let endpoint = BundleServer::start(&cert, spiffe_bundle_doc(&[&b2], &[], 1, 1));
    let server = serve_with(
        dir.path(),
        &pki,
        format!(
            "bundle_endpoint = \"{url}\"\nendpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"{ENDPOINT_ID}\"\nbundle_file = {boot:?}\nrefresh_min = \"1s\"\nrefresh_max = \"1s\"",
            url = endpoint.url(),
            boot = pki.bundle_b,
        ),
        String::new(),
    );
    let ca = pki.bundle_a.clone();
    server
        .wait_for_log(
            "server SVID is spiffe://b.test/impostor, expected spiffe://b.test/bundle-server",
            Duration::from_secs(10),
        )
        .await;
    // The bootstrap bundle stays in force; the impostor's CA B2 is never trusted.
    let (s, _) = declare_with_svid(&server, &ca, &b_agent(&pki, "b-old", &pki.ca_b)).await;
    assert_eq!(s, 201);
    let (s, body) = declare_with_svid(&server, &ca, &b_agent(&pki, "b-new", &b2)).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("svid_untrusted_chain"))
    );
    assert_eq!(endpoint.requests(), 0, "refused during the handshake");
}
