//! A free loopback port; shared by the test fixtures and the benches.

/// A port on 127.0.0.1 that nothing listens on now (the OS picks it; bound then released,
/// a race that is harmless on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
