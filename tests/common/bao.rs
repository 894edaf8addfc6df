//! A real OpenBao dev server on a free loopback port.

use super::bao_bin::bao_binary;
use super::{free_port, raw_get_status};
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A real OpenBao dev server on a free loopback port (root token `root`), killed on drop.
pub struct Bao {
    child: Child,
    pub addr: String,
    _home: tempfile::TempDir,
}

impl Bao {
    pub fn start() -> Self {
        let port = free_port();
        let home = tempfile::tempdir().expect("tmp");
        let child = Command::new(bao_binary())
            .args([
                "server",
                "-dev",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                "-dev-root-token-id=root",
            ])
            .env("HOME", home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bao");
        let addr = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if raw_get_status(port, "/v1/sys/health") == Some(200) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "bao did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            addr,
            _home: home,
        }
    }

    /// One API call with `token`; returns the status and the JSON body (Null if none).
    pub async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = reqwest::Client::new()
            .request(method, format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("bao call");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Kills the server (an unreachable Vault).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A root call that must succeed.
    pub async fn root(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call("root", method, path, body).await;
        assert!((200..300).contains(&s), "bao {method} {path}: {s} {v}");
        v
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
