#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! Policy hot reload on a running broker, and `mayfly policy check`.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test]
async fn hot_reload_applies_good_policies_and_keeps_the_last_good_set_on_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let config = write_config(dir.path(), &pki, &ConfigOptions::default());
    let server = Server::serve(&config);
    let agent = pki.client_as("agent", AGENT);
    let url = server.url("/v1/tasks");
    let policy_file = dir.path().join("policies/test.cedar");

    let (s, _) = post_json(&agent, &url, task_body("10m")).await;
    assert_eq!(s, 201);

    // A broken file is refused; the last good set stays in force.
    std::fs::write(&policy_file, "permit(principal,").expect("write");
    let audit = dir.path().join("audit.jsonl");
    let refused = eventually(Duration::from_secs(10), || {
        let audit = audit.clone();
        async move {
            audit_records(&audit).into_iter().find(|r| {
                r["kind"] == "policy.reload"
                    && r["outcome"]
                        .as_str()
                        .is_some_and(|o| o.starts_with("refused"))
            })
        }
    })
    .await
    .expect("reload refusal audited");
    assert!(
        refused["detail"]
            .as_str()
            .expect("detail")
            .contains("test.cedar:1"),
        "{refused}"
    );
    let (s, _) = post_json(&agent, &url, task_body("10m")).await;
    assert_eq!(s, 201, "last good set still permits");

    // A valid, stricter set takes effect without restart.
    std::fs::write(
        &policy_file,
        r#"@id("nothing") forbid (principal, action, resource);"#,
    )
    .expect("write");
    let denied = eventually(Duration::from_secs(10), || {
        let (agent, url) = (agent.clone(), url.clone());
        async move {
            let (s, b) = post_json(&agent, &url, task_body("10m")).await;
            (s == 403).then_some(b)
        }
    })
    .await
    .expect("new policy applied");
    assert_eq!(denied["code"], "policy_denied");
}

#[test]
fn policy_check_names_file_and_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("bad.cedar"),
        "// fine\n\npermit (principal, action == Mayfly::Action::\"MintCredential\", resource)\nwhen { context.no_such_field == 1 };\n",
    )
    .expect("write");
    let out = run_cli(&["policy", "check", dir.path().to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.cedar:"), "{err}");
    assert!(
        err.contains(":3") || err.contains(":4"),
        "names the line: {err}"
    );

    let ok = run_cli(&["policy", "check", "config/policies"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn serve_refuses_to_start_on_an_invalid_policy() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let config = write_config(dir.path(), &pki, &ConfigOptions::default());
    std::fs::write(
        dir.path().join("policies/test.cedar"),
        "permit(principal, action, resource) when { 1 };",
    )
    .expect("write");
    let out = run_cli(&["serve", "-c", config.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test.cedar:1"), "{err}");
}

#[test]
fn shipped_config_files_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in ["config/mayfly.toml", "config/mayfly.full.toml"] {
        let path = root.join(f);
        if path.exists() {
            mayfly::config::Config::load(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        } else {
            panic!("{f} is missing");
        }
    }
}
