#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Delegation to sub-agents with attenuation, over real mTLS against the binary.

mod common;

use base64::Engine;
use common::*;
use serde_json::{Value, json};

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("b64"),
    )
    .expect("json")
}

#[tokio::test]
async fn delegation_attenuates_carries_the_chain_and_dies_with_the_parent() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let opts = ConfigOptions {
        extra: "[limits]\nmax_delegation_depth = 2".into(),
        ..Default::default()
    };
    let server = Server::serve(&write_config(dir.path(), &pki, &opts));
    let one = pki.client_as("one", AGENT);
    let two = pki.client_as("two", AGENT2);
    let three_id = "spiffe://a.test/agent/three";
    let three = pki.client_as("three", three_id);

    let (s, parent) = post_json(&one, &server.url("/v1/tasks"), task_body("30m")).await;
    assert_eq!(s, 201);
    let parent_id = parent["task_id"].as_str().expect("id").to_string();
    let delegate = |scope: Value, ttl: &str, to: &str| json!({"principal": to, "purpose": "sub-step", "scope": scope, "ttl": ttl});
    let narrow = json!([{"provider": "jwt", "target": "https://api.example.com", "actions": ["issues:read"], "resources": ["repo/acme/widgets"]}]);
    let url = |t: &str| server.url(&format!("/v1/tasks/{t}/delegate"));

    // Wider than held, longer than the parent, or from a non-owner: refused.
    let wider = json!([{"provider": "jwt", "target": "https://api.example.com", "actions": ["issues:read", "issues:delete"]}]);
    let (s, b) = post_json(&one, &url(&parent_id), delegate(wider, "5m", AGENT2)).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (403, Some("delegation_wider")),
        "{b}"
    );
    let broader_resource = json!([{"provider": "jwt", "target": "https://api.example.com", "actions": ["issues:read"], "resources": ["repo/*"]}]);
    let (s, b) = post_json(
        &one,
        &url(&parent_id),
        delegate(broader_resource, "5m", AGENT2),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (403, Some("delegation_wider")));
    let (s, b) = post_json(
        &one,
        &url(&parent_id),
        delegate(narrow.clone(), "2h", AGENT2),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (400, Some("ttl_exceeds_task")));
    let (s, b) = post_json(
        &two,
        &url(&parent_id),
        delegate(narrow.clone(), "5m", AGENT2),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (403, Some("not_task_owner")));
    let (s, b) = post_json(
        &one,
        &url(&parent_id),
        delegate(narrow.clone(), "5m", OPERATOR),
    )
    .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (403, Some("policy_denied")),
        "policy decides who may receive"
    );

    // A narrower slice for agent two.
    let (s, child) = post_json(
        &one,
        &url(&parent_id),
        delegate(narrow.clone(), "10m", AGENT2),
    )
    .await;
    assert_eq!(s, 201, "{child}");
    let child_id = child["task_id"].as_str().expect("id").to_string();
    assert_eq!(child["parent"], parent_id.as_str());
    assert_eq!(child["owner"], AGENT2);
    // Agent two mints inside it; the token carries the chain.
    let (s, cred) = post_json(
        &two,
        &server.url(&format!("/v1/tasks/{child_id}/credentials")),
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    assert_eq!(s, 201, "{cred}");
    let token = cred["credential"]["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    // RFC 8693 §4.1: `sub` is the root of the delegation, `act.sub` the holder.
    let c = claims(&token);
    assert_eq!(c["sub"], AGENT);
    assert_eq!(c["act"], json!({"sub": AGENT2}));
    assert_eq!(c["scope"], "issues:read");
    // The child cannot exceed its own (narrower) grant.
    let (s, b) = post_json(&two, &server.url(&format!("/v1/tasks/{child_id}/credentials")), json!({"provider": "jwt", "target": "https://api.example.com", "actions": ["issues:comment"]})).await;
    assert_eq!((s, b["code"].as_str()), (403, Some("out_of_scope")));

    // Depth: one → two → three is depth 2 (allowed); three → one would be depth 3.
    let (s, grandchild) = post_json(
        &two,
        &url(&child_id),
        delegate(narrow.clone(), "5m", three_id),
    )
    .await;
    assert_eq!(s, 201, "{grandchild}");
    let gc_id = grandchild["task_id"].as_str().expect("id").to_string();
    let (s, b) = post_json(&three, &url(&gc_id), delegate(narrow.clone(), "1m", AGENT)).await;
    assert_eq!((s, b["code"].as_str()), (403, Some("delegation_too_deep")));
    let (s, cred3) = post_json(
        &three,
        &server.url(&format!("/v1/tasks/{gc_id}/credentials")),
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    assert_eq!(s, 201);
    let token3 = cred3["credential"]["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    // Three levels: root one, then two, now three holds it.
    let chain3 = json!({"sub": three_id, "act": {"sub": AGENT2}});
    let c3 = claims(&token3);
    assert_eq!(c3["sub"], AGENT);
    assert_eq!(c3["act"], chain3);
    // Introspection says the same.
    let introspect_url = server.url("/v1/introspect");
    let seen = introspect(&one, &introspect_url, &token3).await;
    assert_eq!(seen["active"], true, "{seen}");
    assert_eq!(seen["sub"], AGENT);
    assert_eq!(seen["act"], chain3);
    // So does the audit record of the mint (`principal` stays the caller).
    let minted = audit_records(&dir.path().join("audit.jsonl"))
        .into_iter()
        .find(|r| r["lease_id"] == c3["jti"] && r["action"] == "MintCredential")
        .expect("audit record of the mint");
    assert_eq!(minted["principal"], three_id);
    assert_eq!(minted["subject"], AGENT);
    assert_eq!(minted["act"], chain3);
    // A token outside delegation: sub is the holder, no act.
    let (s, own) = post_json(
        &one,
        &server.url(&format!("/v1/tasks/{parent_id}/credentials")),
        json!({"provider": "jwt", "target": "https://api.example.com"}),
    )
    .await;
    assert_eq!(s, 201, "{own}");
    let own = claims(own["credential"]["access_token"].as_str().expect("token"));
    assert_eq!(own["sub"], AGENT);
    assert!(own.get("act").is_none(), "{own}");

    // Completing the root revokes every descendant's credentials.
    let (s, done) = post_json(
        &one,
        &server.url(&format!("/v1/tasks/{parent_id}/complete")),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(done["tasks"].as_array().expect("tasks").len(), 3);
    assert_eq!(
        introspect(&one, &introspect_url, &token).await["active"],
        false
    );
    assert_eq!(
        introspect(&one, &introspect_url, &token3).await["active"],
        false
    );
    let (_, view) = get(&two, &server.url(&format!("/v1/tasks/{child_id}"))).await;
    assert_eq!(view["state"], "completed");
}
