//! Test fixtures: a PKI minted in code, configs written to temp dirs, the real `mayfly`
//! binary started on a free loopback port, and mTLS clients.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fixtures"
)]

mod bao_bin;
mod loopback;
mod redis_bin;

use bao_bin::bao_binary;
pub use loopback::free_port;
use mayfly::pki::{Ca, LeafSpec};
use redis_bin::{redis_command, wait_for_pong};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const TD_A: &str = "a.test";
pub const TD_B: &str = "b.test";
pub const AGENT: &str = "spiffe://a.test/agent/one";
pub const AGENT2: &str = "spiffe://a.test/agent/two";
pub const OPERATOR: &str = "spiffe://a.test/operator/admin";

pub const TEST_POLICY: &str = r#"
@id("agents-declare")
permit (principal, action == Mayfly::Action::"DeclareTask", resource)
when {
  principal.path like "/agent/*" &&
  resource.provider == "jwt" &&
  resource.uri like "https://*" &&
  context.ttl_seconds <= 7200
};

@id("agents-mint")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { principal.path like "/agent/*" && resource.provider == "jwt" };

@id("agents-delegate-to-agents")
permit (principal, action == Mayfly::Action::"DelegateTask", resource)
when { principal.path like "/agent/*" && resource.path like "/agent/*" };
"#;

/// A cert/key pair on disk.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Two trust domains with their CAs, a server certificate, and files on disk.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_a: Ca,
    pub ca_b: Ca,
    pub bundle_a: PathBuf,
    pub bundle_b: PathBuf,
    pub server: Pair,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        mayfly::install_crypto_provider();
        let ca_a = Ca::generate("CA A", TD_A).expect("ca a");
        let ca_b = Ca::generate("CA B", TD_B).expect("ca b");
        let bundle_a = dir.join("bundle-a.pem");
        let bundle_b = dir.join("bundle-b.pem");
        std::fs::write(&bundle_a, ca_a.cert_pem()).expect("write");
        std::fs::write(&bundle_b, ca_b.cert_pem()).expect("write");
        let mut pki = Self {
            dir: dir.to_path_buf(),
            ca_a,
            ca_b,
            bundle_a,
            bundle_b,
            server: Pair {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
        };
        let spec = LeafSpec::server(
            None,
            &["localhost"],
            &["127.0.0.1".parse().expect("ip")],
            30,
        );
        pki.server = pki.issue_with(&pki.ca_a, "server", &spec);
        pki
    }

    pub fn issue_with(&self, ca: &Ca, name: &str, spec: &LeafSpec) -> Pair {
        let issued = ca.issue(spec).expect("issue");
        let pair = Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pair.cert, &issued.cert_pem).expect("write");
        std::fs::write(&pair.key, issued.key_pem.expose()).expect("write");
        pair
    }

    /// A valid SVID for `id` from trust domain A's CA.
    /// An mTLS client presenting a fresh SVID for `id`, trusting the server's CA.
    pub fn client_as(&self, name: &str, id: &str) -> reqwest::Client {
        client(&self.bundle_a, Some(&self.svid(name, id)))
    }

    pub fn svid(&self, name: &str, id: &str) -> Pair {
        self.issue_with(&self.ca_a, name, &LeafSpec::svid(id, 1))
    }
}

pub struct ConfigOptions {
    pub audit: Option<PathBuf>,
    /// The body of the `[store]` table; embedded in the temp dir when `None`.
    pub store: Option<String>,
    pub node_id: String,
    pub claim_hold: String,
    pub extra: String,
    /// Trust domain B's `[[trust_domains]]` keys after `name` (default: its PEM file).
    pub td_b: Option<String>,
}

impl Default for ConfigOptions {
    fn default() -> Self {
        Self {
            audit: None,
            store: None,
            node_id: "test".into(),
            claim_hold: "30s".into(),
            extra: String::new(),
            td_b: None,
        }
    }
}

/// Writes policies and a config for `mayfly serve` into `dir`; returns the config path.
pub fn write_config(dir: &Path, pki: &Pki, opts: &ConfigOptions) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    std::fs::write(policies.join("test.cedar"), TEST_POLICY).expect("write");
    let audit = opts
        .audit
        .clone()
        .unwrap_or_else(|| dir.join("audit.jsonl"));
    let text = format!(
        r#"
listen = "127.0.0.1:0"
node_id = "{node}"
[tls]
cert_file = {cert:?}
key_file = {key:?}
[[trust_domains]]
name = "{TD_A}"
bundle_file = {ba:?}
[[trust_domains]]
name = "{TD_B}"
{td_b}
[operators]
spiffe_ids = ["{OPERATOR}"]
[policy]
dir = {policies:?}
reload_interval = "1s"
[store]
{store}
[audit]
path = {audit:?}
[reaper]
interval = "200ms"
claim_hold = "{hold}"
[providers.jwt]
issuer = "https://mayfly.test"
signing_key_file = {jwt:?}
generate_key = "ES256"
{extra}
"#,
        cert = pki.server.cert,
        key = pki.server.key,
        ba = pki.bundle_a,
        td_b = opts
            .td_b
            .clone()
            .unwrap_or_else(|| format!("bundle_file = {:?}", pki.bundle_b)),
        store = opts.store.clone().unwrap_or_else(|| format!(
            "kind = \"embedded\"\npath = {:?}",
            dir.join("leases.redb")
        )),
        node = opts.node_id,
        hold = opts.claim_hold,
        jwt = dir.join("jwt-key.pem"),
        extra = opts.extra,
    );
    let path = dir.join("mayfly.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A running `mayfly` process. Killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_mayfly")
}

fn repo() -> PathBuf {
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

/// Reads the audit log as JSON values.
pub fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

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

pub fn redis_store(url: &str, prefix: &str) -> String {
    format!("kind = \"redis\"\nurl = {url:?}\nkey_prefix = {prefix:?}\nop_timeout = \"1s\"")
}

/// A `VerifiedCaller` produced by the real identity code from `pair` (trust domain A).
pub fn verified(pki: &Pki, pair: &Pair) -> mayfly::identity::VerifiedCaller {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_file_iter(&pair.cert)
            .expect("pem")
            .collect::<Result<_, _>>()
            .expect("der");
    let bundles = mayfly::identity::TrustBundles::from_pem_files(&[(
        mayfly::identity::TrustDomain::parse(TD_A).expect("td"),
        pki.bundle_a.clone(),
    )])
    .expect("bundles");
    mayfly::identity::x509::verify_svid(
        &chain,
        &bundles,
        Some("127.0.0.1".parse().expect("ip")),
        rustls_pki_types::UnixTime::now(),
    )
    .expect("valid svid")
}

/// An mTLS client for one of the identities `mayfly dev` created in `dir`.
pub fn dev_client(dir: &Path, who: &str) -> reqwest::Client {
    let pair = Pair {
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}-key.pem")),
    };
    client(&dir.join("ca.pem"), Some(&pair))
}

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

/// An ES256 JWT-SVID signing key with its JWK (`use: "jwt-svid"`).
pub struct JwtSvidKey {
    key: jsonwebtoken::EncodingKey,
    pub kid: String,
    pub jwk: Value,
}

impl JwtSvidKey {
    pub fn generate(kid: &str) -> Self {
        mayfly::install_crypto_provider();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
            .expect("encoding key");
        let mut jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES256)
                .expect("jwk"),
        )
        .expect("json");
        jwk["kid"] = kid.into();
        jwk["use"] = "jwt-svid".into();
        Self {
            key,
            kid: kid.to_string(),
            jwk,
        }
    }

    /// A JWT-SVID for `sub` with audience `aud` and a `jti`, valid for ten minutes.
    pub fn sign_jti(&self, sub: &str, aud: &str, jti: &str) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims =
            serde_json::json!({"sub": sub, "aud": [aud], "iat": now, "exp": now + 600, "jti": jti});
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }

    /// A JWT-SVID for `sub` with audience `aud`, valid for ten minutes.
    pub fn sign(&self, sub: &str, aud: &str) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims = serde_json::json!({"sub": sub, "aud": [aud], "iat": now, "exp": now + 600});
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }
}

/// A SPIFFE bundle document: `cas` as `x509-svid` authorities, `jwt` keys as given.
pub fn spiffe_bundle_doc(cas: &[&Ca], jwt: &[&Value], sequence: u64, refresh_hint: u64) -> String {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let mut keys: Vec<Value> = cas
        .iter()
        .map(|ca| {
            let der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
                .expect("der");
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(der.as_ref())],
            })
        })
        .collect();
    keys.extend(jwt.iter().map(|j| (*j).clone()));
    serde_json::json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    })
    .to_string()
}

/// A real HTTPS server (tokio-rustls + hyper, on its own thread and runtime) serving a
/// SPIFFE bundle document at any path. Its certificate and document can be swapped
/// while it runs; it counts the requests it answered. Stopped on drop.
pub struct BundleServer {
    pub addr: SocketAddr,
    doc: std::sync::Arc<std::sync::Mutex<String>>,
    tls: std::sync::Arc<std::sync::Mutex<std::sync::Arc<rustls::ServerConfig>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn tls_config(pair: &Pair) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&pair.cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("der");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pair.key).expect("key");
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config"),
    )
}

impl BundleServer {
    pub fn start(cert: &Pair, doc: String) -> Self {
        use std::sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering};
        mayfly::install_crypto_provider();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let doc = Arc::new(Mutex::new(doc));
        let tls = Arc::new(Mutex::new(tls_config(cert)));
        let requests = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (d, t, r) = (doc.clone(), tls.clone(), requests.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let config = t.lock().expect("lock").clone();
                        let (d, r) = (d.clone(), r.clone());
                        tokio::spawn(async move {
                            let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                            else {
                                return;
                            };
                            let svc = hyper::service::service_fn(move |_req| {
                                r.fetch_add(1, Ordering::SeqCst);
                                let body = d.lock().expect("lock").clone();
                                async move {
                                    hyper::Response::builder()
                                        .header("content-type", "application/json")
                                        .body(http_body_util::Full::new(hyper::body::Bytes::from(
                                            body,
                                        )))
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            doc,
            tls,
            requests,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}/bundle", self.addr)
    }

    pub fn set_doc(&self, doc: String) {
        *self.doc.lock().expect("lock") = doc;
    }

    /// New connections get this certificate.
    pub fn set_cert(&self, cert: &Pair) {
        *self.tls.lock().expect("lock") = tls_config(cert);
    }

    /// Requests answered (a refused TLS handshake never becomes one).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
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

/// A real OpenBao dev server on a free loopback port (root token `root`), killed on drop.
pub struct Bao {
    child: Child,
    pub addr: String,
    _home: tempfile::TempDir,
}

impl Bao {
    pub fn start() -> Self {
        let port = free_port();
        let home = tempfile::tempdir().expect("tmp");
        let child = Command::new(bao_binary())
            .args([
                "server",
                "-dev",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                "-dev-root-token-id=root",
            ])
            .env("HOME", home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bao");
        let addr = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if raw_get_status(port, "/v1/sys/health") == Some(200) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "bao did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            addr,
            _home: home,
        }
    }

    /// One API call with `token`; returns the status and the JSON body (Null if none).
    pub async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = reqwest::Client::new()
            .request(method, format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("bao call");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Kills the server (an unreachable Vault).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A root call that must succeed.
    pub async fn root(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call("root", method, path, body).await;
        assert!((200..300).contains(&s), "bao {method} {path}: {s} {v}");
        v
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real moto STS/IAM emulator on a free loopback port, killed on drop. With
/// `no_auth_actions = Some(n)`, IAM authentication is enforced after the first `n`
/// requests (the set-up).
pub struct Moto {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Moto {
    pub fn start(no_auth_actions: Option<u32>) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tmp");
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .env("MOTO_ENABLE_RECORDING", "True")
            .env("MOTO_RECORDER_FILEPATH", dir.path().join("recording"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(n) = no_auth_actions {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let child = cmd.spawn().expect(
            "moto_server must be installed: pip install 'moto[server]' (.ci/run does this)",
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    /// Kills the emulator (an unreachable AWS).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SDK config for `key`/`secret` against this emulator.
    pub async fn sdk(&self, key: &str, secret: &str, token: Option<&str>) -> aws_config::SdkConfig {
        let creds = aws_sdk_sts::config::Credentials::new(
            key,
            secret,
            token.map(String::from),
            None,
            "test",
        );
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(creds)
            .load()
            .await
    }

    pub async fn start_recording(&self) {
        reqwest::Client::new()
            .post(format!("{}/moto-api/recorder/start-recording", self.url))
            .send()
            .await
            .expect("recorder");
    }

    /// Every request moto recorded since `start_recording`.
    pub async fn recording(&self) -> Vec<Value> {
        let text = reqwest::Client::new()
            .get(format!("{}/moto-api/recorder/download-recording", self.url))
            .send()
            .await
            .expect("recording")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Where `.ci/run` installs ministack, in a virtualenv of its own (it upgrades botocore
/// past what the AWS CLI pins). `MAYFLY_MINISTACK` overrides the path.
pub fn ministack_bin() -> PathBuf {
    std::env::var_os("MAYFLY_MINISTACK").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/ministack-venv/bin/ministack")
        },
        PathBuf::from,
    )
}

/// A real ministack (IAM, STS, S3) on a free loopback port with IAM evaluation on
/// (`AUTH=true`: the access key `test` is the account root), killed on drop. Unlike
/// moto it enforces session policies, explicit denies and their conditions
/// (`aws:PrincipalTag/*`, `aws:TokenIssueTime`).
pub struct Ministack {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

/// The account ministack runs as (a 12-digit id, as role ARNs need).
pub const MINISTACK_ACCOUNT: &str = "123456789012";

impl Ministack {
    pub fn start() -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tmp");
        let bin = ministack_bin();
        let child = Command::new(&bin)
            .current_dir(dir.path())
            .env("AUTH", "true")
            .env("GATEWAY_PORT", port.to_string())
            .env("BIND_HOST", "127.0.0.1")
            .env("SERVICES", "iam,sts,s3")
            .env("MINISTACK_ACCOUNT_ID", MINISTACK_ACCOUNT)
            .env("STATE_DIR", dir.path())
            .env("TMPDIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; ministack must be installed in its own virtualenv (.ci/run does this)",
                    bin.display()
                )
            });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if raw_get_status(port, "/_ministack/health") == Some(200) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ministack did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    /// SDK config for `key`/`secret` against this emulator.
    pub async fn sdk(&self, key: &str, secret: &str, token: Option<&str>) -> aws_config::SdkConfig {
        let creds = aws_sdk_sts::config::Credentials::new(
            key,
            secret,
            token.map(String::from),
            None,
            "test",
        );
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(creds)
            .load()
            .await
    }

    /// The account root (`test`/`test`).
    pub async fn root(&self) -> aws_config::SdkConfig {
        self.sdk("test", "test", None).await
    }
}

impl Drop for Ministack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The role `deploy`'s inline deny policy (`mayfly-revoked-sessions`) as IAM holds it,
/// read with `iam`; `None` when the role has none. IAM may return it URL-encoded.
pub async fn role_deny_policy(iam: &aws_sdk_iam::Client) -> Option<Value> {
    let out = iam
        .get_role_policy()
        .role_name("deploy")
        .policy_name("mayfly-revoked-sessions")
        .send()
        .await
        .ok()?;
    let doc = out.policy_document();
    let text = if doc.starts_with('{') {
        doc.to_string()
    } else {
        percent_encoding::percent_decode_str(doc)
            .decode_utf8()
            .expect("utf8")
            .into_owned()
    };
    Some(serde_json::from_str(&text).expect("json"))
}
