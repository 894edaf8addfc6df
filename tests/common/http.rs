//! Clients and requests: mTLS/HTTPS clients, JSON calls, polling with a deadline, and
//! the audit log read back.

use super::{Pair, Server};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// An HTTPS client trusting `ca` and presenting `identity` (if any).
pub fn client(ca: &Path, identity: Option<&Pair>) -> reqwest::Client {
    mayfly::install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).expect("ca")).expect("ca pem");
    let mut b = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10));
    if let Some(p) = identity {
        let mut pem = std::fs::read(&p.cert).expect("cert");
        pem.extend(std::fs::read(&p.key).expect("key"));
        b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
    }
    b.build().expect("client")
}

/// Sends a JSON body; returns status and parsed body.
pub async fn post_json(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn introspect(c: &reqwest::Client, url: &str, token: &str) -> Value {
    let r = c
        .post(url)
        .form(&[("token", token)])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.expect("json")
}

pub fn task_body(ttl: &str) -> Value {
    serde_json::json!({
        "purpose": "summarise open issues",
        "scope": [{
            "provider": "jwt",
            "target": "https://api.example.com",
            "actions": ["issues:read", "issues:comment"],
            "resources": ["repo/acme/*"]
        }],
        "ttl": ttl
    })
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The audit log's text once the file has stopped growing: with the embedded store the
/// file is fed from the store's audit journal a few milliseconds after each commit
/// (docs/audit-log.md), so a record can reach it just after its response.
pub fn audit_text(path: &Path) -> String {
    let size = || std::fs::metadata(path).map(|m| m.len()).ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let (mut last, mut stable) = (size(), 0);
    // Settled: unchanged for 125 ms, well over the pump's 10 ms batches and an fsync.
    while stable < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(25));
        let now = size();
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Reads the audit log as JSON values ([`audit_text`]).
pub fn audit_records(path: &Path) -> Vec<Value> {
    audit_text(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// POST /v1/tasks with a bearer token (no client certificate); status and `code`.
pub async fn declare_with_bearer(server: &Server, ca: &Path, token: &str) -> (u16, Value) {
    let r = client(ca, None)
        .post(server.url("/v1/tasks"))
        .bearer_auth(token)
        .json(&task_body("10m"))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// POST /v1/tasks over mTLS with `pair`, on a new connection; status and body.
pub async fn declare_with_svid(server: &Server, ca: &Path, pair: &Pair) -> (u16, Value) {
    post_json(
        &client(ca, Some(pair)),
        &server.url("/v1/tasks"),
        task_body("10m"),
    )
    .await
}

/// The status of a plain HTTP/1.0 GET to loopback `port` (None if it cannot connect).
pub fn raw_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    c.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
