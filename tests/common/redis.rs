//! A real `redis-server` on a free loopback port.

use super::free_port;
use super::redis_bin::{redis_command, wait_for_pong};
use std::process::{Child, Command};

/// A real `redis-server` on a free loopback port, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::start_in(port, tempfile::tempdir().expect("tmp"), extra)
    }

    /// A server on `port` keeping its data in `dir` (a restart with the same `dir` and
    /// `--appendonly yes` finds its data again).
    pub fn start_in(port: u16, dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let child = redis_command(port, dir.path())
            .args(["--appendonly", "no"])
            .args(extra)
            .spawn()
            .expect(
                "redis-server must be installed (apt-get install redis-server; .ci/run does this)",
            );
        assert!(wait_for_pong(port), "redis-server did not answer on {port}");
        Self { child, port, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server and hands back its data directory (for a restart).
    pub fn stop_keep_data(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let keep = tempfile::tempdir().expect("tmp");
        std::mem::replace(&mut self.dir, keep)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
