#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! A new user's first hour, as the README and docs/ describe it: the `make test`
//! preflight, the docs/cli.md task-file example against `mayfly dev`, dev tokens in both
//! GitHub `sub` forms, `config check` opening the files a config names, and a
//! `policy_denied` that says which policy decided.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// The first ```toml block after `heading` in a doc.
fn toml_block_after(doc: &str, heading: &str) -> String {
    let text = std::fs::read_to_string(repo().join(doc)).expect("doc");
    let from = text.find(heading).expect("heading");
    let rest = &text[from..];
    let start = rest.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let len = rest[start..].find("```").expect("block end");
    rest[start..start + len].to_string()
}

/// The connection variables for `mayfly dev`'s demo agent.
fn dev_agent_env(dir: &Path, server: &Server) -> Vec<(&'static str, String)> {
    let p = |n: &str| dir.join(n).display().to_string();
    vec![
        ("MAYFLY_ADDR", server.url("")),
        ("MAYFLY_CERT", p("agent.pem")),
        ("MAYFLY_KEY", p("agent-key.pem")),
        ("MAYFLY_CA", p("ca.pem")),
    ]
}

#[test]
fn the_docs_cli_task_file_example_runs_as_is_against_mayfly_dev() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let server = Server::dev(&dir);
    let task = tmp.path().join("deploy.toml");
    std::fs::write(&task, toml_block_after("docs/cli.md", "## The task file")).expect("write");
    let out = run_cli_env(
        &[
            "exec",
            "--task",
            task.to_str().expect("utf8"),
            "--",
            "sh",
            "-c",
            r#"test -n "$GITHUB_TOKEN" && test -n "$DEPLOY_MAYFLY_TOKEN_DEPLOY_EXAMPLE_COM" && test -n "$MAYFLY_TASK_ID" && echo all-set"#,
        ],
        &dev_agent_env(&dir, &server),
    );
    assert!(
        out.status.success() && text(&out.stdout).contains("all-set"),
        "status {:?}\nstdout: {}\nstderr: {}\nbroker: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        server.logs()
    );
}

fn dev_token(dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "dev",
        "token",
        "--dir",
        dir.to_str().expect("utf8"),
        "--oidc",
    ];
    args.extend_from_slice(extra);
    let out = run_cli(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    jwt_payload(text(&out.stdout).trim())
}

#[test]
fn dev_token_derives_sub_from_the_claims_in_both_github_forms() {
    let tmp = tempfile::tempdir().expect("tmp");
    let claims = r#"{"repository":"octo/widgets","repository_id":"42","repository_owner_id":"7"}"#;

    let legacy = dev_token(tmp.path(), &["--claims", claims]);
    assert_eq!(legacy["sub"], "repo:octo/widgets:ref:refs/heads/main");
    assert_eq!(legacy["repository_owner"], "octo");

    let immutable = dev_token(
        tmp.path(),
        &["--claims", claims, "--sub-format", "immutable"],
    );
    assert_eq!(
        immutable["sub"],
        "repo:octo@7/widgets@42:ref:refs/heads/main"
    );
    assert_eq!(immutable["repository_id"], "42");
    assert_eq!(immutable["repository_owner_id"], "7");

    // A deployment job: GitHub puts the environment in sub instead of the ref.
    let env = dev_token(
        tmp.path(),
        &[
            "--claims",
            r#"{"environment":"prod"}"#,
            "--sub-format",
            "immutable",
        ],
    );
    assert_eq!(env["sub"], "repo:acme@100000/app@100001:environment:prod");

    // A sub given in the claims is kept as given.
    let given = dev_token(tmp.path(), &["--claims", r#"{"sub":"custom-subject"}"#]);
    assert_eq!(given["sub"], "custom-subject");
}

#[test]
fn dev_token_refuses_to_guess_a_sub_it_cannot_derive() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = run_cli(&[
        "dev",
        "token",
        "--dir",
        tmp.path().to_str().expect("utf8"),
        "--oidc",
        "--claims",
        r#"{"repository":"no-slash"}"#,
        "--sub-format",
        "immutable",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot derive sub"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn config_check_lists_every_file_it_cannot_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let config = write_config(tmp.path(), &pki, &ConfigOptions::default());
    let ok = run_cli(&["config", "check", config.to_str().expect("utf8")]);
    assert!(
        ok.status.success() && text(&ok.stdout).starts_with("ok: config valid"),
        "stdout: {}\nstderr: {}",
        text(&ok.stdout),
        text(&ok.stderr)
    );

    // The same config with the serving certificate and a trust bundle gone.
    let toml = std::fs::read_to_string(&config).expect("config");
    let raw: toml::Value = toml::from_str(&toml).expect("toml");
    let cert = raw["tls"]["cert_file"]
        .as_str()
        .expect("cert_file")
        .to_string();
    let bundle = raw["trust_domains"][0]["bundle_file"]
        .as_str()
        .expect("bundle_file")
        .to_string();
    let broken = tmp.path().join("broken.toml");
    std::fs::write(
        &broken,
        toml.replace(&cert, &format!("{cert}.missing"))
            .replace(&bundle, &format!("{bundle}.missing")),
    )
    .expect("write");
    let out = run_cli(&["config", "check", broken.to_str().expect("utf8")]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("tls.cert_file: cannot read"), "{err}");
    assert!(
        err.contains("trust_domains[0].bundle_file: cannot read"),
        "{err}"
    );
}

#[tokio::test]
async fn a_dev_policy_denial_names_the_permits_considered_and_their_rule() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let server = Server::dev(&dir);
    let agent = dev_client(&dir, "agent");
    let resp = agent
        .post(server.url("/v1/tasks"))
        .json(&json!({"purpose": "plain http", "ttl": "10m",
            "scope": [{"provider": "jwt", "target": "http://api.example.com", "actions": ["read"]}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], "policy_denied", "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("no permit policy matched")
            && detail.contains("dev-declare-jwt")
            && detail.contains("dev-oidc-declare")
            && detail.contains("for https:// targets"),
        "{detail}"
    );
}

/// PATH with every command of this machine except `redis-*`, as on a machine where
/// Redis was never installed.
fn path_without_redis(into: &Path) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let home = std::env::var("HOME").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(PathBuf::from)
        .chain([Path::new(&home).join(".local/bin")]);
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let link = into.join(&name);
            if name.to_string_lossy().starts_with("redis-") || link.exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(e.path(), link);
        }
    }
    into.display().to_string()
}

#[test]
fn make_test_preflight_lists_everything_missing_in_one_message() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out: Output = Command::new("bash")
        .arg(repo().join("scripts/preflight.sh"))
        .env("PATH", path_without_redis(tmp.path()))
        .output()
        .expect("run preflight");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for tool in ["redis-server", "redis-sentinel", "redis-cli"] {
        assert!(
            err.contains(&format!("- {tool} (")),
            "{tool} not listed:\n{err}"
        );
    }
    assert_eq!(err.matches("prerequisite(s) missing").count(), 1, "{err}");
    assert!(err.contains("make deps"), "{err}");
}

/// Logs written to a pipe or file carry no ANSI colour codes.
#[test]
fn logs_off_a_terminal_are_plain_text() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["dev", "--dir", tmp.path().to_str().expect("utf8")])
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(repo())
        .env("MAYFLY_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mayfly dev");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let done = line.contains("listening");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let all = seen.join("\n");
    assert!(
        all.contains("listening"),
        "mayfly dev did not start:\n{all}"
    );
    assert!(!all.contains('\u{1b}'), "ANSI escape in piped logs:\n{all}");
}

/// `mayfly revoke` off a terminal prints one progress line per lease, no carriage
/// returns, so a log file reads line by line.
#[tokio::test]
async fn revoke_progress_off_a_terminal_is_one_line_per_lease() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let server = Server::dev(&dir);
    let agent = dev_client(&dir, "agent");
    for purpose in ["one", "two"] {
        let task: Value = agent
            .post(server.url("/v1/tasks"))
            .json(&json!({"purpose": purpose, "ttl": "10m",
                "scope": [{"provider": "jwt", "target": "https://api.example.com", "actions": ["read"]}]}))
            .send()
            .await
            .expect("declare")
            .json()
            .await
            .expect("json");
        let id = task["task_id"].as_str().expect("task_id");
        let resp = agent
            .post(server.url(&format!("/v1/tasks/{id}/credentials")))
            .json(&json!({"provider": "jwt", "target": "https://api.example.com"}))
            .send()
            .await
            .expect("mint");
        assert_eq!(resp.status(), 201);
    }
    let p = |n: &str| dir.join(n).display().to_string();
    let out = run_cli_env(
        &[
            "revoke",
            "--principal",
            "spiffe://dev.mayfly.local/agent/demo",
            "--reason",
            "offboarding",
        ],
        &[
            ("MAYFLY_ADDR", server.url("")),
            ("MAYFLY_CERT", p("operator.pem")),
            ("MAYFLY_KEY", p("operator-key.pem")),
            ("MAYFLY_CA", p("ca.pem")),
        ],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains('\r'),
        "carriage return off a terminal: {err:?}"
    );
    assert!(err.contains("revoking [1/2] "), "{err:?}");
    assert!(err.contains("revoking [2/2] "), "{err:?}");
    let progress = err.lines().filter(|l| l.starts_with("revoking [")).count();
    assert_eq!(progress, 2, "{err:?}");
}
