//! Starting a real `redis-server` on loopback; shared by the test fixtures and the benches.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `redis-server` on 127.0.0.1:`port`, data in `dir`, no RDB snapshots, output discarded.
/// Callers add their own flags (later flags override earlier ones) and spawn it.
pub fn redis_command(port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ])
    .arg("--dir")
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

/// Waits (100 tries, 50 ms apart) until the server on `port` answers `PING` (or asks for auth).
pub fn wait_for_pong(port: u16) -> bool {
    use std::io::{Read, Write};
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 16];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read(&mut buf).is_ok_and(|n| {
                    buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH")
                })
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
