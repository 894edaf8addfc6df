#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The agent helpers against the real broker: `mayfly exec` (credentials in the child's
//! environment, exit status, signals, the task always completed) and
//! `mayfly credential-process` (its failures carry the problem code).

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A broker on the test PKI whose policy refuses to mint for `https://refused.example`.
struct Broker {
    tmp: tempfile::TempDir,
    pki: Pki,
    server: Server,
    agent: Pair,
    operator: reqwest::Client,
}

impl Broker {
    fn start() -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let pki = Pki::new(tmp.path());
        let config = write_config(tmp.path(), &pki, &ConfigOptions::default());
        std::fs::write(
            tmp.path().join("policies/refuse.cedar"),
            r#"@id("refuse-one-target")
forbid (principal, action == Mayfly::Action::"MintCredential", resource)
when { resource.uri == "https://refused.example" };"#,
        )
        .expect("policy");
        let server = Server::serve(&config);
        let agent = pki.svid("agent", AGENT);
        let operator = pki.client_as("op", OPERATOR);
        Self {
            tmp,
            pki,
            server,
            agent,
            operator,
        }
    }

    /// The connection variables for the agent's SVID.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MAYFLY_ADDR", self.server.url("")),
            ("MAYFLY_CERT", self.agent.cert.display().to_string()),
            ("MAYFLY_KEY", self.agent.key.display().to_string()),
            ("MAYFLY_CA", self.pki.bundle_a.display().to_string()),
        ]
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).expect("write task file");
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn exec(&self, task: &Path, extra: &[&str], cmd: &[&str]) -> Output {
        run_cli_env(&exec_argv(task, extra, cmd), &self.env())
    }

    async fn task(&self, id: &str) -> Value {
        let (s, t) = get(&self.operator, &self.server.url(&format!("/v1/tasks/{id}"))).await;
        assert_eq!(s, 200, "{t}");
        t
    }

    async fn all_tasks(&self) -> Vec<Value> {
        let (s, page) = get(&self.operator, &self.server.url("/v1/tasks")).await;
        assert_eq!(s, 200, "{page}");
        page["items"].as_array().expect("items").clone()
    }

    /// The task is completed and every lease it had is revoked.
    async fn assert_completed(&self, id: &str, leases: usize) {
        let t = self.task(id).await;
        assert_eq!(t["state"], "completed", "{t}");
        let ls = t["leases"].as_array().expect("leases");
        assert_eq!(ls.len(), leases, "{t}");
        assert!(ls.iter().all(|l| l["state"] == "revoked"), "{t}");
    }
}

/// `exec --task TASK EXTRA… -- CMD…`
fn exec_argv<'a>(task: &'a Path, extra: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["exec", "--task", task.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    args
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `task=tsk_…` line the test commands print.
fn task_id_in(o: &Output) -> String {
    let out = stdout(o);
    out.lines()
        .find_map(|l| l.strip_prefix("task="))
        .unwrap_or_else(|| panic!("no task= line in {out:?}; stderr: {}", stderr(o)))
        .to_string()
}

const ONE_JWT: &str = r#"
purpose = "exec test"
ttl = "10m"
[[scope]]
provider = "jwt"
target = "https://api.example.com"
actions = ["read"]
"#;

#[tokio::test]
async fn exec_runs_the_command_with_its_token_then_completes_the_task_and_passes_the_status() {
    let b = Broker::start();
    let task = b.file("task.toml", ONE_JWT);
    let token_out = b.path("token");

    let ok = b.exec(
        &task,
        &["--verbose"],
        &[
            "sh",
            "-c",
            r#"test -n "$MAYFLY_TOKEN" && test "$MAYFLY_TOKEN" = "$MAYFLY_TOKEN_API_EXAMPLE_COM" \
               && printf %s "$MAYFLY_TOKEN" > "$1" && echo "task=$MAYFLY_TASK_ID" && echo ok"#,
            "sh",
            token_out.to_str().expect("utf8"),
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).ends_with("ok\n"), "{}", stdout(&ok));
    let id = task_id_in(&ok);
    b.assert_completed(&id, 1).await;
    let token = std::fs::read_to_string(&token_out).expect("token written by the child");
    assert_eq!(jwt_payload(&token)["aud"], "https://api.example.com");
    let agent = client(&b.pki.bundle_a, Some(&b.agent));
    let seen = introspect(&agent, &b.server.url("/v1/introspect"), &token).await;
    assert_eq!(seen["active"], false, "revoked with the task");
    // --verbose names the task, the lease and the variables, never a value.
    let log = stderr(&ok);
    assert!(log.contains(&format!("declared task {id}")), "{log}");
    assert!(log.contains("(lease lse_"), "{log}");
    assert!(
        log.contains("set MAYFLY_TOKEN from jwt:https://api.example.com"),
        "{log}"
    );
    assert!(log.contains("set MAYFLY_TASK_ID"), "{log}");
    assert!(!log.contains(&token), "the token must never be printed");

    // CMD's exit status is mayfly's, and the task is completed all the same.
    let seven = b.exec(
        &task,
        &[],
        &["sh", "-c", "echo task=$MAYFLY_TASK_ID; exit 7"],
    );
    assert_eq!(seven.status.code(), Some(7), "{}", stderr(&seven));
    b.assert_completed(&task_id_in(&seven), 1).await;

    // Killed by a signal: 128 + its number, as a shell reports it.
    let killed = b.exec(
        &task,
        &[],
        &["sh", "-c", "echo task=$MAYFLY_TASK_ID; kill -TERM $$"],
    );
    assert_eq!(killed.status.code(), Some(128 + 15), "{}", stderr(&killed));
    b.assert_completed(&task_id_in(&killed), 1).await;

    // A command that cannot be found: 127, and the declared task still ends.
    let before = b.all_tasks().await.len();
    let missing = b.exec(&task, &[], &["/nonexistent/mayfly-test-command"]);
    assert_eq!(missing.status.code(), Some(127), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("cannot run /nonexistent/mayfly-test-command"));
    let tasks = b.all_tasks().await;
    assert_eq!(tasks.len(), before + 1);
    assert!(tasks.iter().all(|t| t["state"] == "completed"), "{tasks:?}");

    // --env-prefix renames Mayfly's own variables.
    let prefixed = b.exec(
        &task,
        &["--env-prefix", "AGENT_"],
        &[
            "sh",
            "-c",
            r#"test -n "$AGENT_TOKEN" && test -z "$MAYFLY_TOKEN" && echo "task=$AGENT_TASK_ID""#,
        ],
    );
    assert!(prefixed.status.success(), "{}", stderr(&prefixed));
    b.assert_completed(&task_id_in(&prefixed), 1).await;
}

#[tokio::test]
async fn sigterm_to_exec_reaches_the_command_and_the_task_is_still_completed() {
    let b = Broker::start();
    let task = b.file("task.toml", ONE_JWT);
    let (marker, ready) = (b.path("got-term"), b.path("ready"));
    let script = r#"trap 'echo got-term > "$1"; exit 3' TERM
               echo "$MAYFLY_TASK_ID" > "$2.tmp" && mv "$2.tmp" "$2"
               while :; do sleep 0.1; done"#;
    let cmd = [
        "sh",
        "-c",
        script,
        "sh",
        marker.to_str().expect("utf8"),
        ready.to_str().expect("utf8"),
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(exec_argv(&task, &[], &cmd))
        .envs(b.env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mayfly exec");
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        if let Ok(id) = std::fs::read_to_string(&ready) {
            break id.trim().to_string();
        }
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(b.task(&id).await["state"], "active");

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .expect("signal mayfly");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mayfly exec did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("stderr");
    assert_eq!(
        status.code(),
        Some(3),
        "the command's trap status: {}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("the trap ran")
            .trim(),
        "got-term"
    );
    b.assert_completed(&id, 1).await;
}

/// A task file with a grant for each of two targets of `provider`.
fn two_grants(provider: &str, a: &str, b: &str) -> String {
    let grant = |target: &str| {
        format!("[[scope]]\nprovider = {provider:?}\ntarget = {target:?}\nactions = [\"read\"]\n")
    };
    format!(
        "purpose = \"two grants\"\nttl = \"10m\"\n{}{}",
        grant(a),
        grant(b)
    )
}

#[tokio::test]
async fn nothing_is_declared_for_a_bad_task_file_and_a_refused_credential_ends_the_task() {
    let b = Broker::start();
    let ran = b.path("ran");
    let cmd = [
        "sh",
        "-c",
        "touch \"$1\"",
        "sh",
        ran.to_str().expect("utf8"),
    ];

    // Unknown key: refused before anything is sent, naming file and key.
    let bad = b.file("bad.toml", &format!("{ONE_JWT}retries = 3\n"));
    let out = b.exec(&bad, &[], &cmd);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("bad.toml") && err.contains("unknown field `retries`"),
        "{err}"
    );

    // An invalid value names its key.
    let bad_ttl = b.file("ttl.toml", &ONE_JWT.replace("\"10m\"", "\"soon\""));
    let err = stderr(&b.exec(&bad_ttl, &[], &cmd));
    assert!(err.contains("ttl.toml: ttl:"), "{err}");

    // Two aws roles would both set AWS_ACCESS_KEY_ID: refused before declaring.
    let two_aws = b.file(
        "two-aws.toml",
        &two_grants("aws", "arn:aws:iam::1:role/a", "arn:aws:iam::1:role/b"),
    );
    let out = b.exec(&two_aws, &[], &cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("would both set AWS_ACCESS_KEY_ID"),
        "{}",
        stderr(&out)
    );
    assert!(b.all_tasks().await.is_empty(), "nothing was declared");

    // Declared, one credential minted, the next refused by policy: CMD never runs and
    // the task is completed, revoking the lease already minted.
    let refused = b.file(
        "refused.toml",
        &two_grants("jwt", "https://ok.example", "https://refused.example"),
    );
    let out = b.exec(&refused, &[], &cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("policy_denied"), "{}", stderr(&out));
    assert!(
        !ran.exists(),
        "the command must not run without its credentials"
    );
    let tasks = b.all_tasks().await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let id = tasks[0]["task_id"].as_str().expect("id");
    b.assert_completed(id, 1).await;
}

#[tokio::test]
async fn credential_process_fails_with_the_problem_code_and_prints_nothing() {
    let b = Broker::start();
    let aws_task = b.file(
        "aws.toml",
        r#"purpose = "aws through credential_process"
ttl = "15m"
[[scope]]
provider = "aws"
target = "arn:aws:iam::123456789012:role/deploy"
actions = ["s3:GetObject"]
"#,
    );
    // This broker runs no aws provider: the declaration is refused with its code.
    let out = run_cli_env(
        &[
            "credential-process",
            "--task",
            aws_task.to_str().expect("utf8"),
        ],
        &b.env(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "stdout is for the credential only");
    assert!(
        stderr(&out).contains("provider_not_configured"),
        "{}",
        stderr(&out)
    );

    // Under an existing (jwt) task, an aws target is outside its scope.
    let agent = client(&b.pki.bundle_a, Some(&b.agent));
    let (s, t) = post_json(&agent, &b.server.url("/v1/tasks"), task_body("10m")).await;
    assert_eq!(s, 201, "{t}");
    let id = t["task_id"].as_str().expect("id");
    let out = run_cli_env(
        &[
            "credential-process",
            "--task-id",
            id,
            "--target",
            "arn:aws:iam::123456789012:role/deploy",
            "--ttl",
            "15m",
        ],
        &b.env(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("403 out_of_scope"),
        "{}",
        stderr(&out)
    );

    // The task id may come from MAYFLY_TASK_ID (set by `mayfly exec`); --target is needed.
    let mut env = b.env();
    env.push(("MAYFLY_TASK_ID", id.to_string()));
    let out = run_cli_env(&["credential-process"], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("--target is required"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn exec_can_authenticate_with_a_token_file_instead_of_a_certificate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let server = Server::dev(&dir);
    let svid = run_cli(&[
        "dev",
        "token",
        "--dir",
        dir.to_str().expect("utf8"),
        "--jwt-svid",
        "spiffe://dev.mayfly.local/agent/demo",
    ]);
    assert!(svid.status.success(), "{}", stderr(&svid));
    let token_file = tmp.path().join("svid.jwt");
    std::fs::write(&token_file, &svid.stdout).expect("write token");
    let task = tmp.path().join("task.toml");
    std::fs::write(&task, ONE_JWT).expect("write task file");
    let env = [
        ("MAYFLY_ADDR", server.url("")),
        ("MAYFLY_CA", dir.join("ca.pem").display().to_string()),
        ("MAYFLY_TOKEN_FILE", token_file.display().to_string()),
        // Not read: the token replaces the certificate.
        ("MAYFLY_CERT", "/nonexistent/cert.pem".to_string()),
    ];
    let out = run_cli_env(
        &exec_argv(
            &task,
            &[],
            &[
                "sh",
                "-c",
                r#"test -n "$MAYFLY_TOKEN" && echo "task=$MAYFLY_TASK_ID""#,
            ],
        ),
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = task_id_in(&out);
    let operator = dev_client(&dir, "operator");
    let (s, t) = get(&operator, &server.url(&format!("/v1/tasks/{id}"))).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["owner"], "spiffe://dev.mayfly.local/agent/demo");
    assert_eq!(t["state"], "completed");
    assert_eq!(t["leases"][0]["state"], "revoked", "{t}");
}
