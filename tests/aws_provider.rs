#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failed set-up step must abort the test loudly"
)]
//! The `aws` provider against the moto STS/IAM emulator, reached by the real AWS SDK,
//! with IAM authentication enforced after set-up: assumed-role sessions with the session
//! policy, tags, SourceIdentity and duration Mayfly sent; the real AWS CLI through
//! `mayfly credential-process`; revocation through the deny policy and its pruning.
//! moto never enforces session policies and ignores policy conditions, so the tests
//! assert on what Mayfly sent and on the deny statement it wrote.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

const ACCOUNT: &str = "123456789012";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/deploy";
/// Set-up calls made before moto starts enforcing IAM authentication.
const SETUP_ACTIONS: u32 = 5;

const AWS_POLICY: &str = r#"
@id("agents-aws-declare")
permit (principal, action == Mayfly::Action::"DeclareTask", resource)
when { principal.path like "/agent/*" && resource.provider == "aws" };

@id("agents-aws-mint")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { principal.path like "/agent/*" && resource.provider == "aws" };
"#;

/// Creates the role agents assume (trusting Mayfly's user), Mayfly's IAM user with an
/// access key and exactly the permissions the provider needs, and a role permission the
/// sessions can exercise. Exactly `SETUP_ACTIONS` calls; then moto enforces IAM auth.
async fn provision(moto: &Moto) -> (String, String) {
    let admin = moto.sdk("setup", "setup", None).await;
    let iam = aws_sdk_iam::Client::new(&admin);
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/mayfly")},
        "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
    }]});
    iam.create_role()
        .role_name("deploy")
        .assume_role_policy_document(trust.to_string())
        .max_session_duration(3600)
        .send()
        .await
        .expect("create role");
    iam.create_user()
        .user_name("mayfly")
        .send()
        .await
        .expect("user");
    let key = iam
        .create_access_key()
        .user_name("mayfly")
        .send()
        .await
        .expect("key");
    let key = key.access_key().expect("access key");
    let mayfly = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"], "Resource": ROLE_ARN},
        {"Effect": "Allow", "Action": ["sts:GetCallerIdentity"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["iam:GetRolePolicy", "iam:PutRolePolicy", "iam:DeleteRolePolicy"], "Resource": ROLE_ARN},
    ]});
    iam.put_user_policy()
        .user_name("mayfly")
        .policy_name("mayfly-broker")
        .policy_document(mayfly.to_string())
        .send()
        .await
        .expect("user policy");
    let work = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iam:GetRole"], "Resource": "*"},
    ]});
    iam.put_role_policy()
        .role_name("deploy")
        .policy_name("work")
        .policy_document(work.to_string())
        .send()
        .await
        .expect("role policy");
    (
        key.access_key_id().to_string(),
        key.secret_access_key().to_string(),
    )
}

struct Env {
    dir: tempfile::TempDir,
    pki: Pki,
    moto: Moto,
    key: (String, String),
    server: Server,
}

fn aws_config(moto: &Moto, revocation: &str) -> String {
    format!(
        r#"
[anomaly]
rules = []
[providers.aws]
region = "us-east-1"
endpoint_url = "{url}"
allow_insecure_http = true
revocation = "{revocation}"
prune_interval = "1s"
[providers.aws.targets.deploy]
role_arn = "{ROLE_ARN}"
[providers.aws.targets.other]
role_arn = "arn:aws:iam::{ACCOUNT}:role/other"
"#,
        url = moto.url
    )
}

fn mayfly_env(key: &(String, String), home: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", key.0.clone()),
        ("AWS_SECRET_ACCESS_KEY", key.1.clone()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", home.join("none").display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            home.join("none").display().to_string(),
        ),
    ]
}

async fn start(revocation: &str) -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path());
    let moto = Moto::start(Some(SETUP_ACTIONS));
    moto.start_recording().await;
    let key = provision(&moto).await;
    let opts = ConfigOptions {
        extra: aws_config(&moto, revocation),
        ..Default::default()
    };
    let config = write_config(dir.path(), &pki, &opts);
    std::fs::write(dir.path().join("policies/aws.cedar"), AWS_POLICY).expect("policy");
    let server = Server::serve_env(&config, &mayfly_env(&key, dir.path()));
    Env {
        dir,
        pki,
        moto,
        key,
        server,
    }
}

impl Env {
    fn agent(&self) -> reqwest::Client {
        self.pki.client_as("agent", AGENT)
    }
    fn operator(&self) -> reqwest::Client {
        self.pki.client_as("operator", OPERATOR)
    }
    async fn declare(&self) -> String {
        let (s, b) = post_json(
            &self.agent(),
            &self.server.url("/v1/tasks"),
            json!({
                "purpose": "publish the nightly report",
                "scope": [
                    {"provider": "aws", "target": "deploy",
                     "actions": ["iam:GetRole", "s3:GetObject", "s3:PutObject"],
                     "resources": [ROLE_ARN, "arn:aws:s3:::reports/*"]},
                    {"provider": "aws", "target": "other",
                     "actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::reports/*"]},
                ],
                "ttl": "30m",
            }),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        b["task_id"].as_str().expect("task").to_string()
    }
    async fn mint(&self, task: &str, body: Value) -> (u16, Value) {
        post_json(
            &self.agent(),
            &self.server.url(&format!("/v1/tasks/{task}/credentials")),
            body,
        )
        .await
    }
    async fn lease(&self, id: &str) -> Value {
        let (s, b) = get(
            &self.operator(),
            &self.server.url(&format!("/v1/leases/{id}")),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        b
    }
    async fn mayfly_iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(&self.moto.sdk(&self.key.0, &self.key.1, None).await)
    }
    async fn deny_policy(&self) -> Option<Value> {
        role_deny_policy(&self.mayfly_iam().await).await
    }
}

/// The session's SDK config from a credential in the `credential_process` shape.
async fn session(moto: &Moto, cred: &Value) -> aws_config::SdkConfig {
    moto.sdk(
        cred["AccessKeyId"].as_str().expect("key"),
        cred["SecretAccessKey"].as_str().expect("secret"),
        Some(cred["SessionToken"].as_str().expect("token")),
    )
    .await
}

/// The form parameters of every recorded request with `Action=action`.
async fn recorded(moto: &Moto, action: &str) -> Vec<HashMap<String, String>> {
    use base64::Engine;
    let mut out = Vec::new();
    for r in moto.recording().await {
        let Some(body) = r["body"].as_str() else {
            continue;
        };
        let body = if r["body_encoded"] == true {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("b64");
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            body.to_string()
        };
        let form: HashMap<String, String> = body
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                let dec = |s: &str| {
                    percent_encoding::percent_decode_str(&s.replace('+', " "))
                        .decode_utf8_lossy()
                        .into_owned()
                };
                (dec(k), dec(v))
            })
            .collect();
        if form.get("Action").map(String::as_str) == Some(action) {
            out.push(form);
        }
    }
    out
}

fn deny_leases(policy: &Value) -> Vec<String> {
    policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| {
            s["Sid"]
                .as_str()
                .is_some_and(|s| s.starts_with("MayflyRevokedUntil"))
        })
        .flat_map(|s| {
            s["Condition"]["StringEquals"]["aws:PrincipalTag/mayfly:lease"]
                .as_array()
                .expect("leases")
                .iter()
                .map(|v| v.as_str().expect("id").to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn assumed_role_session_is_cut_to_the_grant_and_revoked_by_deny_policy() {
    let env = start("deny_policy").await;
    let task = env.declare().await;

    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "aws", "target": "deploy",
                   "actions": ["iam:GetRole", "s3:GetObject"],
                   "resources": [ROLE_ARN, "arn:aws:s3:::reports/2026/*"],
                   "ttl": "5m"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let lease_id = b["lease_id"].as_str().expect("lease").to_string();
    let cred = b["credential"].clone();
    // The credential_process shape, exactly.
    let mut keys: Vec<&str> = cred
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "AccessKeyId",
            "Expiration",
            "SecretAccessKey",
            "SessionToken",
            "Version"
        ]
    );
    assert_eq!(cred["Version"], 1);
    let exp = time::OffsetDateTime::parse(
        cred["Expiration"].as_str().expect("exp"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let left = exp - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::seconds(850) && left <= time::Duration::seconds(900),
        "a 5 min lease gets STS's 900 s floor: {left}"
    );

    // The session works and is named after the lease.
    let sess = session(&env.moto, &cred).await;
    let who = aws_sdk_sts::Client::new(&sess)
        .get_caller_identity()
        .send()
        .await
        .expect("caller identity");
    assert_eq!(
        who.arn(),
        Some(format!("arn:aws:sts::{ACCOUNT}:assumed-role/deploy/{lease_id}").as_str())
    );
    aws_sdk_iam::Client::new(&sess)
        .get_role()
        .role_name("deploy")
        .send()
        .await
        .expect("the session can act before revocation");

    // What Mayfly sent to STS.
    let calls = recorded(&env.moto, "AssumeRole").await;
    let call = calls
        .iter()
        .find(|c| c.get("RoleSessionName") == Some(&lease_id))
        .expect("the AssumeRole call");
    assert_eq!(call["RoleArn"], ROLE_ARN);
    assert_eq!(call["DurationSeconds"], "900");
    assert_eq!(call["SourceIdentity"], "a.test+agent+one");
    let policy: Value = serde_json::from_str(&call["Policy"]).expect("policy json");
    assert_eq!(
        policy,
        json!({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow",
            "Action": ["iam:GetRole", "s3:GetObject"],
            "Resource": [ROLE_ARN, "arn:aws:s3:::reports/2026/*"],
        }]})
    );
    let tags: HashMap<&str, &str> = (1..=2)
        .map(|i| {
            (
                call[&format!("Tags.member.{i}.Key")].as_str(),
                call[&format!("Tags.member.{i}.Value")].as_str(),
            )
        })
        .collect();
    assert_eq!(tags["mayfly:task"], task);
    assert_eq!(tags["mayfly:lease"], lease_id);

    // Revocation writes the deny statement; the revoked session is refused.
    let (s, b) = post_json(
        &env.operator(),
        &env.server.url(&format!("/v1/leases/{lease_id}/revoke")),
        json!({"reason": "agent misbehaved"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let l = env.lease(&lease_id).await;
    assert_eq!(l["state"], "revoked", "{l}");
    let deny = env.deny_policy().await.expect("deny policy written");
    assert!(deny_leases(&deny).contains(&lease_id), "{deny}");
    let sid = deny["Statement"][0]["Sid"].as_str().expect("sid");
    let until: i64 = sid
        .trim_start_matches("MayflyRevokedUntil")
        .parse()
        .expect("ts");
    assert!(until >= exp.unix_timestamp(), "kept until the session dies");
    let err = aws_sdk_iam::Client::new(&sess)
        .get_role()
        .role_name("deploy")
        .send()
        .await
        .expect_err("the revoked session must be denied");
    assert!(format!("{err:?}").contains("AccessDenied"), "{err:?}");

    // Pruning: a statement whose sessions have all expired is dropped; live ones stay.
    let mut doc = deny.clone();
    let past = time::OffsetDateTime::now_utc().unix_timestamp() - 60;
    doc["Statement"].as_array_mut().expect("array").push(json!({
        "Sid": format!("MayflyRevokedUntil{past}"),
        "Effect": "Deny", "Action": "*", "Resource": "*",
        "Condition": {"StringEquals": {"aws:PrincipalTag/mayfly:lease": ["lse_expired"]}},
    }));
    env.mayfly_iam()
        .await
        .put_role_policy()
        .role_name("deploy")
        .policy_name("mayfly-revoked-sessions")
        .policy_document(doc.to_string())
        .send()
        .await
        .expect("seed expired entry");
    let pruned = eventually(Duration::from_secs(10), || async {
        let p = env.deny_policy().await?;
        let l = deny_leases(&p);
        (!l.contains(&"lse_expired".to_string())).then_some(l)
    })
    .await
    .expect("the expired entry is pruned");
    assert!(
        pruned.contains(&lease_id),
        "the live entry stays: {pruned:?}"
    );
}

#[tokio::test]
async fn upstream_denial_oversized_policy_and_ttl_floor() {
    let mut env = start("deny_policy").await;
    let task = env.declare().await;

    // Mayfly's user may not assume the `other` role: STS's AccessDenied → 502.
    let (s, b) = env
        .mint(&task, json!({"provider": "aws", "target": "other"}))
        .await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["code"], "upstream_denied", "{b}");
    assert!(
        b["detail"]
            .as_str()
            .expect("detail")
            .contains("AccessDenied"),
        "{b}"
    );

    // IAM wildcards and policy variables are refused with their own code, at declaration
    // and at credential request (IAM would read them as wider than the checked scope).
    let (s, b) = post_json(
        &env.agent(),
        &env.server.url("/v1/tasks"),
        json!({"purpose": "wild", "ttl": "5m", "scope": [
            {"provider": "aws", "target": "deploy", "actions": ["s3:GetObject"],
             "resources": ["arn:aws:s3:::reports/?"]}]}),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["code"], "aws_resource_wildcard", "{b}");
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "aws", "target": "deploy", "actions": ["s3:GetObject"],
                   "resources": ["arn:aws:s3:::reports/${aws:username}"]}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["code"], "aws_resource_wildcard", "{b}");

    // A grant whose session policy would exceed 2048 characters: 400, never widened.
    let many: Vec<String> = (0..60)
        .map(|i| format!("arn:aws:s3:::reports/quarterly/department-{i:03}/summary.csv"))
        .collect();
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "aws", "target": "deploy", "actions": ["s3:GetObject"], "resources": many}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["code"], "policy_too_large");

    // Nothing of either failure stays active.
    let (s, page) = get(
        &env.operator(),
        &env.server.url(&format!("/v1/leases?task={task}")),
    )
    .await;
    assert_eq!(s, 200);
    for l in page["items"].as_array().expect("items") {
        assert_eq!(l["state"], "revoked", "{l}");
    }

    // A 3 s lease still gets a 900 s session: at the lease's end the reaper denies it.
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "aws", "target": "deploy", "actions": ["iam:GetRole"], "resources": [ROLE_ARN], "ttl": "3s"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let lease_id = b["lease_id"].as_str().expect("lease").to_string();
    let l = eventually(Duration::from_secs(15), || async {
        let l = env.lease(&lease_id).await;
        (l["state"] == "revoked").then_some(l)
    })
    .await
    .expect("revoked at expiry");
    assert_eq!(l["reason"], "ttl_expired", "{l}");
    let deny = env.deny_policy().await.expect("deny policy");
    assert!(deny_leases(&deny).contains(&lease_id), "{deny}");

    // AWS unreachable: 503, and the lease is not left active (its revocation is retried
    // through the deny policy, since the session might exist).
    env.moto.stop();
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "aws", "target": "deploy", "actions": ["iam:GetRole"], "resources": [ROLE_ARN]}),
        )
        .await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["code"], "provider_unavailable");
    let (_, page) = get(
        &env.operator(),
        &env.server.url(&format!("/v1/leases?task={task}")),
    )
    .await;
    for l in page["items"].as_array().expect("items") {
        assert!(l["state"] == "revoked" || l["state"] == "revoking", "{l}");
    }
}

#[tokio::test]
async fn expires_only_mode_reports_when_the_session_dies() {
    let env = start("expires_only").await;
    let task = env.declare().await;
    let (s, b) = env
        .mint(
            &task,
            json!({"provider": "aws", "target": "deploy", "actions": ["iam:GetRole"], "resources": [ROLE_ARN], "ttl": "10m"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let lease_id = b["lease_id"].as_str().expect("lease").to_string();
    let expiration = b["credential"]["Expiration"]
        .as_str()
        .expect("exp")
        .to_string();
    let (s, b) = post_json(
        &env.agent(),
        &env.server.url(&format!("/v1/tasks/{task}/complete")),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let l = env.lease(&lease_id).await;
    assert_eq!(l["state"], "revoked", "{l}");
    let dies = time::OffsetDateTime::parse(
        l["dies_at"].as_str().expect("dies_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("time");
    let exp =
        time::OffsetDateTime::parse(&expiration, &time::format_description::well_known::Rfc3339)
            .expect("time");
    assert_eq!(dies.unix_timestamp(), exp.unix_timestamp());
    assert!(
        env.deny_policy().await.is_none(),
        "no deny policy in expires_only mode"
    );
}

/// The real AWS CLI, configured with `credential_process = mayfly credential-process …`.
#[tokio::test]
async fn aws_cli_with_credential_process() {
    let env = start("deny_policy").await;
    let task = env.declare().await;
    let agent = env.pki.svid("agent-cli", AGENT);
    let bin = env!("CARGO_BIN_EXE_mayfly");
    let cfg = env.dir.path().join("aws-config");
    std::fs::write(
        &cfg,
        format!(
            "[profile mayfly]\nregion = us-east-1\ncredential_process = {bin} credential-process --addr {addr} --cert {cert} --key {key} --ca {ca} --task-id {task} --target deploy --ttl 15m\n",
            addr = env.server.url(""),
            cert = agent.cert.display(),
            key = agent.key.display(),
            ca = env.pki.bundle_a.display(),
        ),
    )
    .expect("aws config");
    let out = std::process::Command::new("aws")
        .args([
            "sts",
            "get-caller-identity",
            "--profile",
            "mayfly",
            "--output",
            "json",
        ])
        .args(["--endpoint-url", &env.moto.url])
        .env("AWS_CONFIG_FILE", &cfg)
        .env("AWS_SHARED_CREDENTIALS_FILE", env.dir.path().join("none"))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .expect("aws CLI must be installed: pip install awscli (.ci/run does this)");
    assert!(
        out.status.success(),
        "aws sts get-caller-identity failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let who: Value = serde_json::from_slice(&out.stdout).expect("json");
    let arn = who["Arn"].as_str().expect("arn");
    assert!(
        arn.starts_with(&format!("arn:aws:sts::{ACCOUNT}:assumed-role/deploy/lse_")),
        "{arn}"
    );
}

/// `mayfly exec` puts the session in the real AWS CLI's environment and ends it after.
#[tokio::test]
async fn exec_runs_the_aws_cli_with_the_session_and_revokes_it_after() {
    let env = start("deny_policy").await;
    let agent = env.pki.svid("agent-exec", AGENT);
    let task_file = env.dir.path().join("task.toml");
    std::fs::write(
        &task_file,
        format!(
            "purpose = \"read the role\"\nttl = \"10m\"\n[[scope]]\nprovider = \"aws\"\ntarget = \"deploy\"\nactions = [\"iam:GetRole\"]\nresources = [\"{ROLE_ARN}\"]\n"
        ),
    )
    .expect("task file");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["exec", "--task", task_file.to_str().expect("utf8")])
        .args(["--addr", &env.server.url("")])
        .args(["--cert", agent.cert.to_str().expect("utf8")])
        .args(["--key", agent.key.to_str().expect("utf8")])
        .args(["--ca", env.pki.bundle_a.to_str().expect("utf8")])
        .args([
            "--",
            "aws",
            "sts",
            "get-caller-identity",
            "--output",
            "json",
        ])
        .args(["--region", "us-east-1", "--endpoint-url", &env.moto.url])
        .env("AWS_CONFIG_FILE", env.dir.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", env.dir.path().join("none"))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .expect("run mayfly exec");
    assert!(
        out.status.success(),
        "exec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let who: Value = serde_json::from_slice(&out.stdout).expect("json");
    let arn = who["Arn"].as_str().expect("arn");
    let lease_id = arn.rsplit('/').next().expect("session name").to_string();
    assert!(lease_id.starts_with("lse_"), "{arn}");
    // The task was completed when the command exited: its session is on the deny list.
    let l = env.lease(&lease_id).await;
    assert_eq!(l["state"], "revoked", "{l}");
    let deny = env.deny_policy().await.expect("deny policy");
    assert!(deny_leases(&deny).contains(&lease_id), "{deny}");
}
