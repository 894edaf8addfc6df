//! A real moto STS/IAM emulator on a free loopback port.

use super::free_port;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A real moto STS/IAM emulator on a free loopback port, killed on drop. With
/// `no_auth_actions = Some(n)`, IAM authentication is enforced after the first `n`
/// requests (the set-up).
pub struct Moto {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Moto {
    pub fn start(no_auth_actions: Option<u32>) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tmp");
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .env("MOTO_ENABLE_RECORDING", "True")
            .env("MOTO_RECORDER_FILEPATH", dir.path().join("recording"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(n) = no_auth_actions {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let child = cmd.spawn().expect(
            "moto_server must be installed: pip install 'moto[server]' (.ci/run does this)",
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    /// Kills the emulator (an unreachable AWS).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SDK config for `key`/`secret` against this emulator.
    pub async fn sdk(&self, key: &str, secret: &str, token: Option<&str>) -> aws_config::SdkConfig {
        super::aws_sdk_config(&self.url, key, secret, token).await
    }

    pub async fn start_recording(&self) {
        reqwest::Client::new()
            .post(format!("{}/moto-api/recorder/start-recording", self.url))
            .send()
            .await
            .expect("recorder");
    }

    /// Every request moto recorded since `start_recording`.
    pub async fn recording(&self) -> Vec<Value> {
        let text = reqwest::Client::new()
            .get(format!("{}/moto-api/recorder/download-recording", self.url))
            .send()
            .await
            .expect("recording")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
