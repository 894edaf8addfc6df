#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The OpenAPI spec is generated from the code; the checked-in copy must match it, and
//! every documented operation must be routed.

mod common;

use common::*;

#[test]
fn checked_in_spec_matches_the_code() {
    let generated = mayfly::api::openapi::spec();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let checked_in: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("docs/openapi.json"))
            .expect("json");
    assert!(
        generated == checked_in,
        "docs/openapi.json is stale: run `cargo run -q -- openapi > docs/openapi.json`"
    );
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_served() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let server = Server::serve(&write_config(dir.path(), &pki, &ConfigOptions::default()));
    let op = pki.client_as("op", OPERATOR);
    let spec = mayfly::api::openapi::spec();
    let (s, served) = get(&op, &server.url("/openapi.json")).await;
    assert_eq!(s, 200);
    assert_eq!(served, spec);
    let mut n = 0;
    for (path, ops) in spec["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{id}", "tsk_00000000000000000000000000000000")
            .replace("/v1/leases/tsk_", "/v1/leases/lse_");
        for method in ops.as_object().expect("ops").keys() {
            let r = op
                .request(
                    method.to_uppercase().parse().expect("method"),
                    server.url(&concrete),
                )
                .send()
                .await
                .expect("send");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            assert!(
                body["code"] != "not_found" && body["code"] != "method_not_allowed",
                "{method} {path} is documented but not routed ({status} {body})"
            );
            n += 1;
        }
    }
    assert!(n >= 20, "{n} operations");
}
