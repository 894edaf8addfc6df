//! A real ministack (IAM, STS, S3) with IAM evaluation on, and the role deny policy
//! it holds.

use super::{free_port, raw_get_status};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where `.ci/run` installs ministack, in a virtualenv of its own (it upgrades botocore
/// past what the AWS CLI pins). `MAYFLY_MINISTACK` overrides the path.
pub fn ministack_bin() -> PathBuf {
    std::env::var_os("MAYFLY_MINISTACK").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/ministack-venv/bin/ministack")
        },
        PathBuf::from,
    )
}

/// A real ministack (IAM, STS, S3) on a free loopback port with IAM evaluation on
/// (`AUTH=true`: the access key `test` is the account root), killed on drop. Unlike
/// moto it enforces session policies, explicit denies and their conditions
/// (`aws:PrincipalTag/*`, `aws:TokenIssueTime`).
pub struct Ministack {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

/// The account ministack runs as (a 12-digit id, as role ARNs need).
pub const MINISTACK_ACCOUNT: &str = "123456789012";

impl Ministack {
    pub fn start() -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tmp");
        let bin = ministack_bin();
        let child = Command::new(&bin)
            .current_dir(dir.path())
            .env("AUTH", "true")
            .env("GATEWAY_PORT", port.to_string())
            .env("BIND_HOST", "127.0.0.1")
            .env("SERVICES", "iam,sts,s3")
            .env("MINISTACK_ACCOUNT_ID", MINISTACK_ACCOUNT)
            .env("STATE_DIR", dir.path())
            .env("TMPDIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; ministack must be installed in its own virtualenv (.ci/run does this)",
                    bin.display()
                )
            });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if raw_get_status(port, "/_ministack/health") == Some(200) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ministack did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    /// SDK config for `key`/`secret` against this emulator.
    pub async fn sdk(&self, key: &str, secret: &str, token: Option<&str>) -> aws_config::SdkConfig {
        super::aws_sdk_config(&self.url, key, secret, token).await
    }

    /// The account root (`test`/`test`).
    pub async fn root(&self) -> aws_config::SdkConfig {
        self.sdk("test", "test", None).await
    }
}

impl Drop for Ministack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The role `deploy`'s inline deny policy (`mayfly-revoked-sessions`) as IAM holds it,
/// read with `iam`; `None` when the role has none. IAM may return it URL-encoded.
pub async fn role_deny_policy(iam: &aws_sdk_iam::Client) -> Option<Value> {
    let out = iam
        .get_role_policy()
        .role_name("deploy")
        .policy_name("mayfly-revoked-sessions")
        .send()
        .await
        .ok()?;
    let doc = out.policy_document();
    let text = if doc.starts_with('{') {
        doc.to_string()
    } else {
        percent_encoding::percent_decode_str(doc)
            .decode_utf8()
            .expect("utf8")
            .into_owned()
    };
    Some(serde_json::from_str(&text).expect("json"))
}
