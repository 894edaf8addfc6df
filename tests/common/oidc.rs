//! A real OIDC issuer (npm `oauth2-mock-server`) and JWS payload decoding.

use super::{free_port, server::repo};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A real OIDC issuer (npm `oauth2-mock-server`, `tests/fixtures/oidc/server.mjs`) on a
/// free loopback port, killed on drop. `.ci/run` installs it with `npm ci`.
pub struct OidcIssuer {
    child: Child,
    pub issuer: String,
    port: u16,
}

impl OidcIssuer {
    pub fn start() -> Self {
        let dir = repo().join("tests/fixtures/oidc");
        assert!(
            dir.join("node_modules/oauth2-mock-server").exists(),
            "run `npm ci` in tests/fixtures/oidc (.ci/run does this)"
        );
        let port = free_port();
        let mut child = Command::new("node")
            .arg("server.mjs")
            .arg(port.to_string())
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node must be installed");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("OIDC issuer did not start");
        let issuer = line.strip_prefix("ready ").expect("ready line").to_string();
        Self {
            child,
            issuer,
            port,
        }
    }

    fn control(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A token signed by the issuer's current key, with `claims` added.
    pub async fn mint(&self, claims: Value) -> String {
        let v: Value = reqwest::Client::new()
            .post(format!("{}/test/mint", self.control()))
            .json(&serde_json::json!({"claims": claims}))
            .send()
            .await
            .expect("mint")
            .json()
            .await
            .expect("json");
        v["token"].as_str().expect("token").to_string()
    }

    /// Adds a key; later tokens are signed with it. Returns its kid.
    pub async fn rotate(&self) -> String {
        let v: Value = reqwest::Client::new()
            .post(format!("{}/test/rotate", self.control()))
            .send()
            .await
            .expect("rotate")
            .json()
            .await
            .expect("json");
        v["kid"].as_str().expect("kid").to_string()
    }

    /// How many JWKS requests the issuer served.
    pub async fn jwks_fetches(&self) -> u64 {
        let v: Value = reqwest::Client::new()
            .get(format!("{}/test/stats", self.control()))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json");
        v["jwks"].as_u64().expect("count")
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OidcIssuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The payload of a compact JWS, decoded (no verification).
pub fn jwt_payload(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("b64"),
    )
    .expect("claims")
}
