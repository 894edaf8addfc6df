//! The real `mayfly` binary, started on a free loopback port and killed on drop, and
//! the CLI run to completion.

use super::{Pair, client};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `mayfly` process. Killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
}

pub(super) fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_mayfly")
}

pub(super) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Server {
    fn spawn(args: &[&str]) -> Self {
        Self::spawn_env(args, &[])
    }

    /// `mayfly serve` with extra environment variables (e.g. AWS credentials).
    pub fn serve_env(config: &Path, env: &[(&str, String)]) -> Self {
        Self::spawn_env(&["serve", "-c", config.to_str().expect("utf8")], env)
    }

    fn spawn_env(args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(binary());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .args(["--log-format", "json"])
            .args(args)
            .current_dir(repo())
            .env("MAYFLY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mayfly");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push(line.clone());
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if v["fields"]["message"] == "mayfly listening (mTLS)" {
                        let addr = v["fields"]["addr"]
                            .as_str()
                            .expect("addr")
                            .parse()
                            .expect("addr");
                        return Self {
                            child,
                            addr,
                            stderr: rx,
                        };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!("mayfly did not start: {status:?}\n{}", seen.join("\n"));
                }
            }
        }
    }

    pub fn serve(config: &Path) -> Self {
        Self::spawn(&["serve", "-c", config.to_str().expect("utf8")])
    }

    pub fn dev(dir: &Path) -> Self {
        Self::dev_on(dir, "127.0.0.1:0")
    }

    /// `mayfly dev` on a free port with extra flags.
    pub fn dev_with(dir: &Path, extra: &[&str]) -> Self {
        let mut args = vec![
            "dev",
            "--dir",
            dir.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// `mayfly dev` on a given address (a restart keeps its address, hence its issuer).
    pub fn dev_on(dir: &Path, listen: &str) -> Self {
        Self::spawn(&[
            "dev",
            "--dir",
            dir.to_str().expect("utf8"),
            "--listen",
            listen,
        ])
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// The log lines the server wrote so far (for failure messages).
    pub fn logs(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// Waits until a log line contains `needle`; returns the lines read meanwhile (which
    /// `logs` no longer returns). Panics with them after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            for line in self.stderr.try_iter() {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen.join("\n");
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {needle:?}:\n{}",
                seen.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mayfly ARGS` to completion.
pub fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run mayfly")
}

/// Runs `mayfly ARGS` with extra environment variables.
pub fn run_cli_env(args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(binary());
    cmd.args(args).current_dir(repo());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run mayfly")
}

/// An mTLS client for one of the identities `mayfly dev` created in `dir`.
pub fn dev_client(dir: &Path, who: &str) -> reqwest::Client {
    let pair = Pair {
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}-key.pem")),
    };
    client(&dir.join("ca.pem"), Some(&pair))
}
