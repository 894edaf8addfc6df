//! The SPIFFE Workload API stand-in on a unix socket.

use super::server::repo;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A SPIFFE Workload API stand-in (`tests/fixtures/workload_api/server.py`, the real gRPC
/// protocol through PyPI `spiffe`'s generated stubs) on a unix socket, serving the
/// bundles written under `dir` (`x509/<td>.pem`, `jwt/<td>.json`). Killed on drop.
pub struct WorkloadApiStub {
    child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl WorkloadApiStub {
    pub fn start(socket: &Path, dir: &Path) -> Self {
        let script = repo().join("tests/fixtures/workload_api/server.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(socket)
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 must be installed");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line == "ready" => {}
            other => {
                let _ = child.kill();
                panic!(
                    "Workload API stub did not start ({other:?}); it needs `pip install spiffe grpcio` (.ci/run does this)"
                );
            }
        }
        Self {
            child,
            socket: socket.to_path_buf(),
            dir: dir.to_path_buf(),
        }
    }

    /// Serves `pem` as the X.509 bundle of `td` (streamed to connected clients).
    pub fn set_x509(&self, td: &str, pem: &str) {
        write_atomically(&self.dir.join("x509").join(format!("{td}.pem")), pem);
    }

    /// Stops listing `td` in the X.509 bundle set.
    pub fn remove_x509(&self, td: &str) {
        std::fs::remove_file(self.dir.join("x509").join(format!("{td}.pem"))).expect("rm");
    }

    /// Serves `jwks` as the JWT bundle of `td`.
    pub fn set_jwt(&self, td: &str, jwks: &Value) {
        write_atomically(
            &self.dir.join("jwt").join(format!("{td}.json")),
            &jwks.to_string(),
        );
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkloadApiStub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes through a rename, so a reader never sees half a file.
pub fn write_atomically(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}
