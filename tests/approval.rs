#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Step-up approval: a policy annotated `@approval("required")` holds the request until an
//! operator decides; only then is the credential minted.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn a_held_request_is_minted_only_after_an_operator_approves_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let config = write_config(dir.path(), &pki, &ConfigOptions::default());
    std::fs::write(
        dir.path().join("policies/prod.cedar"),
        r#"@id("prod-needs-approval") @approval("required")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { resource.uri == "https://prod.example.com" };"#,
    )
    .expect("policy");
    let server = Server::serve(&config);
    let agent = pki.client_as("agent", AGENT);
    let other = pki.client_as("agent2", AGENT2);
    let op = pki.client_as("op", OPERATOR);
    let mut body = task_body("30m");
    body["scope"][0]["target"] = json!("https://prod.example.com");
    let (_, task) = post_json(&agent, &server.url("/v1/tasks"), body).await;
    let creds = server.url(&format!(
        "/v1/tasks/{}/credentials",
        task["task_id"].as_str().expect("id")
    ));
    let req = json!({"provider": "jwt", "target": "https://prod.example.com"});

    let (s, held) = post_json(&agent, &creds, req.clone()).await;
    assert_eq!(s, 202, "{held}");
    assert_eq!(held["status"], "pending");
    assert!(held.get("credential").is_none());
    let id = held["approval_id"].as_str().expect("id").to_string();
    let url = server.url(&format!("/v1/approvals/{id}"));
    let (s, b) = get(&agent, &url).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("pending")));
    let (s, _) = get(&other, &url).await;
    assert_eq!(s, 404, "only the requester sees its approval");
    let (s, b) = post_json(
        &agent,
        &url,
        json!({"decision": "approve", "reason": "self"}),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (403, Some("not_operator")));
    // No lease exists yet.
    let (_, leases) = get(
        &op,
        &server.url(&format!(
            "/v1/leases?task={}",
            task["task_id"].as_str().expect("id")
        )),
    )
    .await;
    assert_eq!(leases["items"].as_array().expect("items").len(), 0);

    let (s, b) = post_json(
        &op,
        &url,
        json!({"decision": "approve", "reason": "change CHG-42"}),
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("approved")), "{b}");
    let (s, minted) = get(&agent, &url).await;
    assert_eq!(s, 201, "{minted}");
    assert_eq!(minted["credential"]["token_type"], "Bearer");
    let (s, b) = get(&agent, &url).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (409, Some("approval_closed")),
        "collectable once"
    );

    // Rejected requests never mint.
    let (_, held) = post_json(&agent, &creds, req).await;
    let url = server.url(&format!(
        "/v1/approvals/{}",
        held["approval_id"].as_str().expect("id")
    ));
    let (s, _) = post_json(
        &op,
        &url,
        json!({"decision": "reject", "reason": "not during freeze"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, b) = get(&agent, &url).await;
    assert_eq!((s, b["code"].as_str()), (403, Some("approval_rejected")));
    let (s, b) = post_json(
        &op,
        &url,
        json!({"decision": "approve", "reason": "changed my mind"}),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (409, Some("approval_closed")));
}
