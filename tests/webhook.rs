#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Revocations and anomalies reach a real HTTPS webhook, signed, retried after a failure.

mod common;

use common::*;
use http_body_util::BodyExt;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, String, String)>>>);

/// An HTTPS receiver that refuses its first delivery with 500 and accepts the rest.
async fn receiver(pki: &Pki) -> (u16, Received) {
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(&pki.server.cert)
        .expect("pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("der");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pki.server.key).expect("key");
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let got = Received::default();
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let (ts, sig) = (h("x-mayfly-timestamp"), h("x-mayfly-signature"));
                            let body = String::from_utf8(
                                req.into_body()
                                    .collect()
                                    .await
                                    .expect("body")
                                    .to_bytes()
                                    .to_vec(),
                            )
                            .expect("utf8");
                            let first = {
                                let mut all = seen.0.lock().expect("lock");
                                all.push((ts, sig, body));
                                all.len() == 1
                            };
                            let status = if first { 500 } else { 200 };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(String::new())
                                    .expect("resp"),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, got)
}

#[tokio::test]
async fn revocations_and_anomalies_are_posted_signed_and_retried() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let (port, got) = receiver(&pki).await;
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, "whsec-test-123\n").expect("secret");
    let extra = format!(
        "[webhook]\nurl = \"https://127.0.0.1:{port}/hook\"\nsecret_file = {secret_file:?}\nca_file = {:?}\ntimeout = \"2s\"",
        pki.bundle_a
    );
    let server = Server::serve(&write_config(
        dir.path(),
        &pki,
        &ConfigOptions {
            extra,
            ..Default::default()
        },
    ));
    let agent = pki.client_as("agent", AGENT);
    let op = pki.client_as("op", OPERATOR);
    let (_, task) = post_json(&agent, &server.url("/v1/tasks"), task_body("10m")).await;
    let id = task["task_id"].as_str().expect("id");
    let (_, c) = post_json(
        &agent,
        &server.url(&format!("/v1/tasks/{id}/credentials")),
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    let lease = c["lease_id"].as_str().expect("lease").to_string();
    let (s, _) = post_json(
        &op,
        &server.url(&format!("/v1/leases/{lease}/revoke")),
        json!({"reason": "webhook test"}),
    )
    .await;
    assert_eq!(s, 200);

    let delivered = eventually(Duration::from_secs(10), || {
        let got = got.clone();
        async move { (got.0.lock().expect("lock").len() >= 2).then_some(()) }
    })
    .await;
    assert!(delivered.is_some(), "retried after the first 500");
    let all = got.0.lock().expect("lock").clone();
    assert_eq!(all[0].2, all[1].2, "the retry carries the same record");
    for (ts, sig, body) in &all {
        let ts: u64 = ts.parse().expect("timestamp");
        assert_eq!(
            sig,
            &mayfly::webhook::sign(b"whsec-test-123", ts, body),
            "valid signature"
        );
    }
    let record: Value = serde_json::from_str(&all[1].2).expect("json");
    assert_eq!(record["kind"], "lease.revoked");
    assert_eq!(record["lease_id"], lease.as_str());
    assert_eq!(record["reason"], "webhook test");
    // It is the audit record itself: the same line is in the chain.
    let audit = audit_text(&dir.path().join("audit.jsonl"));
    assert!(audit.lines().any(|l| l == all[1].2));
}
