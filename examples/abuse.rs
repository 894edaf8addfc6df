//! `make abuse`: hostile clients against a built `mayfly` binary, from a bounded,
//! loopback-only client. Each attack runs on its own (a fresh broker each time) while an
//! authenticated agent keeps making requests on fresh mTLS connections; prints a table
//! of the agent's success rate and p99, the broker's peak RSS, how quickly stalled
//! connections were closed, and the audit bytes per unauthenticated request.
//!
//! Environment:
//! - `MAYFLY_BIN`: the binary (default `target/release/mayfly`);
//! - `MAYFLY_ABUSE_CONNS`: connections per connection attack (default 1000);
//! - `MAYFLY_ABUSE_JUNK`: junk bearer requests (default 10000);
//! - `MAYFLY_ABUSE_SOURCES`: loopback source addresses the attack connections are spread
//!   over (default: enough to stay under `limits.max_connections_per_source`, so the
//!   timeouts — not the per-source cap — are what is measured).
//!
//! Only 127.0.0.0/8 is ever contacted. Production defaults are used for every limit.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a load tool: a failed set-up step must stop it loudly"
)]

use rustls_pki_types::pem::PemObject;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

const AGENT: &str = "spiffe://a.test/agent/one";
const POLICY: &str = r#"
@id("agents-declare")
permit (principal, action == Mayfly::Action::"DeclareTask", resource)
when { principal.path like "/agent/*" && resource.provider == "jwt" };
"#;
/// The agent probes for at least this long under each attack.
const MIN_WINDOW: Duration = Duration::from_secs(5);
/// Concurrent TLS handshakes the attacker runs at once (the client stays bounded).
const MAX_CONNECTING: usize = 64;
/// Production defaults (config/mayfly.full.toml), which the broker runs with here.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const PER_SOURCE: usize = 64;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Files {
    dir: tempfile::TempDir,
    ca: PathBuf,
    agent_cert: PathBuf,
    agent_key: PathBuf,
}

fn setup() -> Files {
    mayfly::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tmp");
    let p = |n: &str| dir.path().join(n);
    let ca = mayfly::pki::Ca::generate("abuse CA", "a.test").expect("ca");
    std::fs::write(p("ca.pem"), ca.cert_pem()).expect("write");
    let server = ca
        .issue(&mayfly::pki::LeafSpec::server(
            None,
            &["localhost"],
            &["127.0.0.1".parse().expect("ip")],
            1,
        ))
        .expect("server");
    std::fs::write(p("server.pem"), &server.cert_pem).expect("write");
    std::fs::write(p("server-key.pem"), server.key_pem.expose()).expect("write");
    let agent = ca
        .issue(&mayfly::pki::LeafSpec::svid(AGENT, 1))
        .expect("agent");
    std::fs::write(p("agent.pem"), &agent.cert_pem).expect("write");
    std::fs::write(p("agent-key.pem"), agent.key_pem.expose()).expect("write");
    std::fs::create_dir_all(p("policies")).expect("mkdir");
    std::fs::write(p("policies/agents.cedar"), POLICY).expect("write");
    Files {
        ca: p("ca.pem"),
        agent_cert: p("agent.pem"),
        agent_key: p("agent-key.pem"),
        dir,
    }
}

/// A fresh broker (its own audit log and store) for one attack.
fn write_config(f: &Files, name: &str) -> (PathBuf, PathBuf) {
    let d = f.dir.path();
    let audit = d.join(format!("{name}-audit.jsonl"));
    let text = format!(
        r#"listen = "127.0.0.1:0"
node_id = "abuse"
[tls]
cert_file = {cert:?}
key_file = {key:?}
[[trust_domains]]
name = "a.test"
bundle_file = {ca:?}
[policy]
dir = {pol:?}
reload_interval = "5s"
[store]
kind = "embedded"
path = {store:?}
[audit]
path = {audit:?}
[anomaly]
rules = []
# The measured agent declares 20 tasks a second; the per-principal quotas (a separate
# control, tested on their own) would refuse it after 120 a minute.
max_tasks_per_principal = 0
max_requests_per_principal = 0
[providers.jwt]
issuer = "https://mayfly.abuse"
signing_key_file = {jwt:?}
generate_key = "ES256"
"#,
        cert = d.join("server.pem"),
        key = d.join("server-key.pem"),
        ca = f.ca,
        pol = d.join("policies"),
        store = d.join(format!("{name}-leases.redb")),
        jwt = d.join("jwt.pem"),
    );
    let cfg = d.join(format!("{name}.toml"));
    std::fs::write(&cfg, text).expect("config");
    (cfg, audit)
}

struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &Path, cfg: &Path) -> Broker {
    let mut child = Command::new(bin)
        .args(["--log-format", "json", "serve", "-c"])
        .arg(cfg)
        .env("MAYFLY_LOG", "warn,mayfly=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                seen.push(line);
                continue;
            };
            if v["fields"]["message"] == "mayfly listening (mTLS)" {
                let _ = tx.send(Ok(v["fields"]["addr"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()));
            } else {
                seen.push(line);
            }
        }
        let _ = tx.send(Err(seen.join("\n")));
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(a)) => a.parse().expect("addr"),
        Ok(Err(log)) => panic!("broker exited:\n{log}"),
        Err(_) => panic!("broker did not start in 30 s"),
    };
    Broker { child, addr }
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak RSS of `pid` while `stop` is false.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::SeqCst) {
            peak = peak.max(rss_bytes(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak.max(rss_bytes(pid))
    })
}

fn agent_client(f: &Files) -> reqwest::Client {
    let mut pem = std::fs::read(&f.agent_cert).expect("cert");
    pem.extend(std::fs::read(&f.agent_key).expect("key"));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&f.ca).expect("ca")).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
        // A fresh connection per request: the agent must get through accept too.
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

#[derive(Default)]
struct AgentStats {
    ok: u64,
    total: u64,
    latencies: Vec<Duration>,
}

impl AgentStats {
    fn p99(&mut self) -> Duration {
        self.latencies.sort();
        let i = (self.latencies.len() * 99).div_ceil(100).saturating_sub(1);
        self.latencies.get(i).copied().unwrap_or_default()
    }
    fn success(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.ok as f64 / self.total as f64
        }
    }
}

/// The agent declares tasks, one every 50 ms, until `stop`.
async fn agent_loop(
    client: reqwest::Client,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> AgentStats {
    let url = format!("https://{addr}/v1/tasks");
    let body = serde_json::json!({
        "purpose": "abuse probe",
        "scope": [{"provider": "jwt", "target": "https://api.example.com", "actions": ["read"]}],
        "ttl": "5m"
    });
    let mut stats = AgentStats::default();
    while !stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let ok = client
            .post(&url)
            .json(&body)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 201);
        stats.latencies.push(t0.elapsed());
        stats.total += 1;
        stats.ok += u64::from(ok);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stats
}

fn attacker_tls(f: &Files, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&f.ca).expect("ca");
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Attack connection `i`'s loopback source: 127.0.1.x, spread over `sources`.
fn source_of(i: usize, sources: usize) -> IpAddr {
    let n = (i % sources.max(1)) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, n.wrapping_add(1)))
}

async fn tcp_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(source, 0))?;
    s.connect(addr).await
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_from(
    tls: &tokio_rustls::TlsConnector,
    source: IpAddr,
    addr: SocketAddr,
) -> Option<Tls> {
    let tcp = tcp_from(source, addr).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from("localhost").ok()?;
    tokio::time::timeout(Duration::from_secs(10), tls.connect(name, tcp))
        .await
        .ok()?
        .ok()
}

/// Waits until the server closes `s`; how long that took from `since`.
async fn closed_after(mut s: Tls, since: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[derive(Clone, Copy)]
enum Attack {
    SlowBody,
    Idle,
    HeaderFlood,
}

struct Row {
    attack: String,
    agent: AgentStats,
    rss_peak: u64,
    note: String,
}

/// Opens `conns` attack connections of `kind`, holds them until the server closes them,
/// while the agent probes; returns the row.
async fn connection_attack(
    f: &Files,
    bin: &Path,
    kind: Attack,
    conns: usize,
    sources: usize,
) -> Row {
    let name = match kind {
        Attack::SlowBody => "slow-body",
        Attack::Idle => "idle",
        Attack::HeaderFlood => "header-flood",
    };
    let (cfg, _) = write_config(f, name);
    let broker = start(bin, &cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(broker.child.id(), stop.clone());
    let agent = tokio::spawn(agent_loop(agent_client(f), broker.addr, stop.clone()));
    let connecting = Arc::new(Semaphore::new(MAX_CONNECTING));
    let (h1, h2) = (attacker_tls(f, b"http/1.1"), attacker_tls(f, b"h2"));
    let opened = Arc::new(AtomicU64::new(0));
    let limit = match kind {
        Attack::Idle => IDLE_TIMEOUT + Duration::from_secs(20),
        _ => HEADER_TIMEOUT.max(BODY_TIMEOUT) + Duration::from_secs(20),
    };
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let (connecting, opened) = (connecting.clone(), opened.clone());
            // Idle: half HTTP/1.1 (ended by the header timeout), half HTTP/2 (idle timeout).
            let tls = if matches!(kind, Attack::Idle) && i % 2 == 1 {
                h2.clone()
            } else {
                h1.clone()
            };
            let addr = broker.addr;
            tokio::spawn(async move {
                let permit = connecting.acquire_owned().await.ok()?;
                let mut s = tls_from(&tls, source_of(i, sources), addr).await?;
                drop(permit);
                opened.fetch_add(1, Ordering::SeqCst);
                let since = Instant::now();
                match kind {
                    Attack::SlowBody => {
                        s.write_all(
                            b"POST /v1/token HTTP/1.1\r\nHost: localhost\r\n\
                              Content-Type: application/x-www-form-urlencoded\r\n\
                              Content-Length: 1000\r\n\r\ngrant_type=",
                        )
                        .await
                        .ok()?;
                    }
                    Attack::Idle if i % 2 == 1 => {
                        s.write_all(
                            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                        )
                        .await
                        .ok()?;
                    }
                    Attack::Idle => {}
                    Attack::HeaderFlood => {
                        // 383 KB of header lines that never end, as in the report.
                        let _ = s
                            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
                            .await;
                        let line = format!("X-Flood: {}\r\n", "f".repeat(1000));
                        for _ in 0..383 {
                            if s.write_all(line.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.flush().await;
                Some((i, closed_after(s, since, limit).await))
            })
        })
        .collect();
    let started = Instant::now();
    let mut closed: Vec<Duration> = Vec::new();
    let mut still_open = 0;
    let mut by_kind: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for t in tasks {
        match t.await.ok().flatten() {
            Some((i, Some(d))) => {
                closed.push(d);
                by_kind[i % 2].push(d);
            }
            Some((_, None)) => still_open += 1,
            None => {}
        }
    }
    tokio::time::sleep(MIN_WINDOW.saturating_sub(started.elapsed())).await;
    stop.store(true, Ordering::SeqCst);
    let mut agent = agent.await.expect("agent");
    let rss_peak = rss.join().expect("rss");
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    let note = match kind {
        Attack::Idle => format!(
            "{} opened; HTTP/1.1 closed by {:.1}s (header timeout {}s), HTTP/2 by {:.1}s (idle timeout {}s; a peer not answering PING: 20+10s); {still_open} still open at the deadline",
            opened.load(Ordering::SeqCst),
            max(&by_kind[0]).as_secs_f64(),
            HEADER_TIMEOUT.as_secs(),
            max(&by_kind[1]).as_secs_f64(),
            IDLE_TIMEOUT.as_secs()
        ),
        _ => format!(
            "{} opened; all closed by {:.1}s (timeout {}s); {still_open} still open at the deadline",
            opened.load(Ordering::SeqCst),
            max(&closed).as_secs_f64(),
            if matches!(kind, Attack::SlowBody) {
                BODY_TIMEOUT.as_secs()
            } else {
                HEADER_TIMEOUT.as_secs()
            }
        ),
    };
    let _ = agent.p99();
    Row {
        attack: format!("{conns} {name} connections"),
        agent,
        rss_peak,
        note,
    }
}

fn junk_token() -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let iss = format!("https://evil.example/{}", "x".repeat(4000));
    format!(
        "{}.{}.c2ln",
        b64(serde_json::json!({"alg": "ES256", "kid": "k"})),
        b64(serde_json::json!({"iss": iss, "sub": "x", "aud": "mayfly", "exp": 4102444800u64}))
    )
}

async fn junk_attack(f: &Files, bin: &Path, n: usize) -> Row {
    let (cfg, audit) = write_config(f, "junk");
    let broker = start(bin, &cfg);
    let before = std::fs::metadata(&audit).map(|m| m.len()).unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(broker.child.id(), stop.clone());
    let agent = tokio::spawn(agent_loop(agent_client(f), broker.addr, stop.clone()));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&f.ca).expect("ca")).expect("ca");
    let url = format!("https://{}/v1/tasks", broker.addr);
    let token = junk_token();
    let conns = 8;
    let per = n / conns;
    let sent = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let c = reqwest::Client::builder()
                .tls_certs_only([ca.clone()])
                .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1)))
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client");
            let (url, token, sent) = (url.clone(), token.clone(), sent.clone());
            tokio::spawn(async move {
                for _ in 0..per {
                    if let Ok(r) = c.get(&url).bearer_auth(&token).send().await {
                        sent.fetch_add(1, Ordering::SeqCst);
                        let _ = r.bytes().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let took = t0.elapsed();
    tokio::time::sleep(MIN_WINDOW.saturating_sub(took)).await;
    let n = sent.load(Ordering::SeqCst) as usize;
    stop.store(true, Ordering::SeqCst);
    let agent = agent.await.expect("agent");
    let rss_peak = rss.join().expect("rss");
    // The summary of the last interval is written at shutdown: stop gracefully.
    let pid = broker.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let mut broker = broker;
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let grown = std::fs::metadata(&audit).map(|m| m.len()).unwrap_or(0) - before;
    let text = std::fs::read_to_string(&audit).unwrap_or_default();
    // Bytes of the records the junk caused (the agent's own records are not its cost).
    let (mut full, mut summarised, mut junk_bytes) = (0u64, 0u64, 0u64);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["kind"] == "request" && v["principal"].is_null() {
            full += 1;
            junk_bytes += line.len() as u64 + 1;
        }
        if v["kind"] == "refusals.summary" {
            summarised += v["count"].as_u64().unwrap_or(0);
            junk_bytes += line.len() as u64 + 1;
        }
    }
    Row {
        attack: format!("{n} junk bearer requests"),
        agent,
        rss_peak,
        note: format!(
            "{n} answered at {:.0} req/s; their records: {junk_bytes} B = {:.1} B per unauthenticated request (the log grew {grown} B, the agent's records included); {full} written in full, {summarised} in summaries",
            n as f64 / took.as_secs_f64(),
            junk_bytes as f64 / n.max(1) as f64
        ),
    }
}

async fn baseline(f: &Files, bin: &Path) -> Row {
    let (cfg, _) = write_config(f, "baseline");
    let broker = start(bin, &cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(broker.child.id(), stop.clone());
    let agent = tokio::spawn(agent_loop(agent_client(f), broker.addr, stop.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    Row {
        attack: "no attack".into(),
        agent: agent.await.expect("agent"),
        rss_peak: rss.join().expect("rss"),
        note: String::new(),
    }
}

#[tokio::main]
async fn main() {
    let bin = PathBuf::from(
        std::env::var("MAYFLY_BIN").unwrap_or_else(|_| "target/release/mayfly".into()),
    );
    assert!(
        bin.is_file(),
        "no binary at {} (set MAYFLY_BIN)",
        bin.display()
    );
    let conns = env_num("MAYFLY_ABUSE_CONNS", 1000);
    let junk = env_num("MAYFLY_ABUSE_JUNK", 10_000);
    let sources = env_num(
        "MAYFLY_ABUSE_SOURCES",
        conns.div_ceil(PER_SOURCE - 4).max(1),
    )
    .min(250);
    let f = setup();
    eprintln!(
        "abuse: {} with {conns} connections per attack from {sources} loopback sources, {junk} junk requests",
        bin.display()
    );
    let mut rows = vec![baseline(&f, &bin).await];
    for kind in [Attack::SlowBody, Attack::Idle, Attack::HeaderFlood] {
        rows.push(connection_attack(&f, &bin, kind, conns, sources).await);
    }
    rows.push(junk_attack(&f, &bin, junk).await);

    println!("| attack | agent success | agent p99 | broker peak RSS | notes |");
    println!("|---|---|---|---|---|");
    for mut r in rows {
        let p99 = r.agent.p99();
        println!(
            "| {} | {:.1} % ({}/{}) | {:.0} ms | {:.0} MiB | {} |",
            r.attack,
            r.agent.success(),
            r.agent.ok,
            r.agent.total,
            p99.as_secs_f64() * 1000.0,
            r.rss_peak as f64 / (1024.0 * 1024.0),
            r.note
        );
    }
}
