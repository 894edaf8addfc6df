//! `mayfly dev`: a working broker on embedded defaults, in one command.
//!
//! First run creates, under `--dir` (default `./.mayfly-dev`): a dev CA (`ca.pem`,
//! `ca-key.pem`), a server certificate, agent SVIDs `agent.pem` (spiffe://dev.mayfly.local/
//! agent/demo) and `agent2.pem` (…/agent/helper), an operator SVID `operator.pem`
//! (…/operator/admin), the JWT signing key, and `dev.json` describing it all. Later runs
//! reuse every file, so identities, leases and the audit chain survive restarts.

use clap::Args;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::app::App;
use crate::config::{Config, RawConfig};
use crate::pki::{Ca, LeafSpec};
use crate::provider::jwt::{SigningAlg, SigningKey};
use crate::secret::write_private_file;

pub const TRUST_DOMAIN: &str = "dev.mayfly.local";
pub const AGENT_ID: &str = "spiffe://dev.mayfly.local/agent/demo";
pub const AGENT2_ID: &str = "spiffe://dev.mayfly.local/agent/helper";
pub const OPERATOR_ID: &str = "spiffe://dev.mayfly.local/operator/admin";
/// The dev OIDC issuer (a stand-in for e.g. GitHub Actions) and the audience of dev tokens.
pub const OIDC_ISSUER: &str = "https://oidc.dev.mayfly.local";
pub const DEV_AUDIENCE: &str = "mayfly-dev";

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Directory for the dev PKI, store, audit log and dev.json.
    #[arg(long, default_value = ".mayfly-dev", global = true)]
    pub dir: PathBuf,
    /// Address to listen on (port 0 picks a free port; dev.json records the real one).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Directory of Cedar policies.
    #[arg(long, default_value = "config/policies")]
    pub policies: PathBuf,
    /// Lease store: embedded (default, a file in --dir) or a Redis URL
    /// (`redis://host:port`); several `mayfly dev` with the same --dir and Redis and
    /// different --listen form a multi-replica setup.
    #[arg(long)]
    pub store: Option<String>,
    /// Audit node id. Default "dev"; on Redis "dev-PORT", so replicas sharing --dir each
    /// write their own audit chain.
    #[arg(long)]
    pub node: Option<String>,
    #[command(subcommand)]
    pub command: Option<DevCommand>,
}

#[derive(clap::Subcommand, Debug)]
pub enum DevCommand {
    /// Print a signed dev token: an OIDC workload token (`--oidc --claims JSON`, e.g.
    /// GitHub-shaped) or a JWT-SVID (`--jwt-svid SPIFFE_ID`). Uses the keys in --dir.
    Token {
        #[arg(long, conflicts_with = "jwt_svid")]
        oidc: bool,
        /// Claims to set or override (a JSON object), with --oidc. Unless it sets `sub`
        /// itself, `sub` is derived from the resulting claims as GitHub Actions does:
        /// `repository`, `repository_owner`, `repository_owner_id`, `repository_id`, and
        /// `environment` if set, else `ref`.
        #[arg(long, requires = "oidc")]
        claims: Option<String>,
        /// Form of the derived `sub`: `legacy` (`repo:OWNER/REPO:ref:REF`) or `immutable`
        /// (`repo:OWNER@OWNER_ID/REPO@REPO_ID:ref:REF`, GitHub's default since July 2026
        /// for new or renamed repositories).
        #[arg(long, value_enum, default_value = "legacy", requires = "oidc")]
        sub_format: SubFormat,
        #[arg(long)]
        jwt_svid: Option<String>,
        /// Lifetime of the token.
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

/// GitHub Actions' two `sub` forms.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubFormat {
    Legacy,
    Immutable,
}

/// The `sub` GitHub Actions would give a token with these claims: the repository (by
/// name, or by owner and repository ids), then `environment:NAME` if the job has one,
/// else `ref:REF`. `None` if a claim it needs is missing or not a string.
pub fn github_sub(claims: &serde_json::Value, form: SubFormat) -> Option<String> {
    let text = |k: &str| match &claims[k] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let repository = text("repository")?;
    let repo = match form {
        SubFormat::Legacy => repository,
        SubFormat::Immutable => {
            let (owner, name) = repository.split_once('/')?;
            let owner = text("repository_owner").unwrap_or_else(|| owner.to_string());
            format!(
                "{owner}@{}/{name}@{}",
                text("repository_owner_id")?,
                text("repository_id")?
            )
        }
    };
    let context = match text("environment") {
        Some(env) => format!("environment:{env}"),
        None => format!("ref:{}", text("ref")?),
    };
    Some(format!("repo:{repo}:{context}"))
}

/// Creates (or loads) the dev OIDC issuer key and the dev JWT-SVID key, and writes the
/// JWKS/bundle files the broker trusts them through.
fn ensure_bearer_keys(files: &Files) -> Result<(SigningKey, SigningKey), crate::Error> {
    let oidc =
        SigningKey::load_or_generate(&files.p("oidc-issuer-key.pem"), Some(SigningAlg::ES256))?;
    let svid = SigningKey::load_or_generate(&files.p("jwt-svid-key.pem"), Some(SigningAlg::ES256))?;
    let jwks = json!({"keys": [oidc.jwk()]});
    let mut svid_jwk = svid.jwk().clone();
    svid_jwk["use"] = json!("jwt-svid");
    let bundle = json!({"keys": [svid_jwk]});
    std::fs::write(files.p("oidc-jwks.json"), jwks.to_string())
        .map_err(io_err("writing oidc-jwks.json".into()))?;
    std::fs::write(files.p("jwt-svid-bundle.json"), bundle.to_string())
        .map_err(io_err("writing jwt-svid-bundle.json".into()))?;
    Ok((oidc, svid))
}

/// `mayfly dev token …`
pub fn token(dir: &Path, command: &DevCommand) -> Result<String, crate::Error> {
    let DevCommand::Token {
        oidc,
        claims,
        sub_format,
        jwt_svid,
        ttl,
    } = command;
    let files = Files {
        dir: dir.to_path_buf(),
    };
    let (oidc_key, svid_key) = ensure_bearer_keys(&files)?;
    let ttl = crate::duration::parse(ttl).map_err(|e| crate::Error::Tls(format!("--ttl: {e}")))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let exp = now + i64::try_from(ttl.as_secs()).unwrap_or(600);
    let usage = || crate::Error::Tls("give --oidc [--claims JSON] or --jwt-svid SPIFFE_ID".into());
    let signed = if *oidc {
        let mut c = json!({
            "iss": OIDC_ISSUER, "aud": DEV_AUDIENCE,
            "repository": "acme/app", "repository_owner": "acme",
            "repository_id": "100001", "repository_owner_id": "100000",
            "ref": "refs/heads/main", "run_id": "1", "run_attempt": "1",
            "iat": now, "nbf": now, "exp": exp, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let mut sub_given = false;
        if let Some(extra) = claims {
            let extra: serde_json::Value = serde_json::from_str(extra)
                .map_err(|e| crate::Error::Tls(format!("--claims is not JSON: {e}")))?;
            let obj = extra
                .as_object()
                .ok_or_else(|| crate::Error::Tls("--claims must be a JSON object".into()))?;
            // A new repository without a new owner: the owner is the repository's prefix.
            if !obj.contains_key("repository_owner")
                && let Some(repo) = obj.get("repository").and_then(|r| r.as_str())
                && let Some((owner, _)) = repo.split_once('/')
            {
                c["repository_owner"] = json!(owner);
            }
            for (k, v) in obj {
                c[k] = v.clone();
            }
            sub_given = obj.contains_key("sub");
        }
        if !sub_given {
            let sub = github_sub(&c, *sub_format).ok_or_else(|| {
                crate::Error::Tls(
                    "cannot derive sub: --claims must leave repository (OWNER/REPO), ref or environment, and for --sub-format immutable repository_id and repository_owner_id as strings or numbers; or set sub itself".into(),
                )
            })?;
            c["sub"] = json!(sub);
        }
        oidc_key.sign_json(&c, "JWT")?
    } else {
        let id = jwt_svid.as_deref().ok_or_else(usage)?;
        crate::identity::SpiffeId::parse(id)
            .map_err(|e| crate::Error::Tls(format!("--jwt-svid: {e}")))?;
        let c = json!({"sub": id, "aud": [DEV_AUDIENCE], "iat": now, "exp": exp});
        svid_key.sign_json(&c, "JWT")?
    };
    Ok(signed)
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> crate::Error {
    move |source| crate::Error::Io { context, source }
}

fn pki_err(e: crate::pki::PkiError) -> crate::Error {
    crate::Error::Tls(format!("dev PKI: {e}"))
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn exists(&self, name: &str) -> bool {
        self.p(name).exists()
    }
    fn write_pair(&self, stem: &str, issued: &crate::pki::Issued) -> Result<(), crate::Error> {
        std::fs::write(self.p(&format!("{stem}.pem")), &issued.cert_pem)
            .map_err(io_err(format!("writing {stem}.pem")))?;
        write_private_file(
            &self.p(&format!("{stem}-key.pem")),
            issued.key_pem.expose().as_bytes(),
        )
        .map_err(io_err(format!("writing {stem}-key.pem")))
    }
}

/// Creates whatever part of the dev PKI is missing; reuses the rest.
fn ensure_pki(files: &Files, listen: SocketAddr) -> Result<(), crate::Error> {
    let ca = if files.exists("ca.pem") && files.exists("ca-key.pem") {
        let read =
            |n: &str| std::fs::read_to_string(files.p(n)).map_err(io_err(format!("reading {n}")));
        Ca::from_pem(&read("ca.pem")?, &read("ca-key.pem")?).map_err(pki_err)?
    } else {
        let ca = Ca::generate("Mayfly dev CA", TRUST_DOMAIN).map_err(pki_err)?;
        std::fs::write(files.p("ca.pem"), ca.cert_pem())
            .map_err(io_err("writing ca.pem".into()))?;
        write_private_file(&files.p("ca-key.pem"), ca.key_pem().expose().as_bytes())
            .map_err(io_err("writing ca-key.pem".into()))?;
        // Every leaf must chain to this new CA.
        for stem in ["server", "agent", "agent2", "operator"] {
            let _ = std::fs::remove_file(files.p(&format!("{stem}.pem")));
        }
        ca
    };
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    let leaves = [
        (
            "server",
            LeafSpec::server(
                Some("spiffe://dev.mayfly.local/mayfly"),
                &["localhost"],
                &ips,
                365,
            ),
        ),
        ("agent", LeafSpec::svid(AGENT_ID, 365)),
        ("agent2", LeafSpec::svid(AGENT2_ID, 365)),
        ("operator", LeafSpec::svid(OPERATOR_ID, 365)),
    ];
    for (stem, spec) in leaves {
        if !files.exists(&format!("{stem}.pem")) || !files.exists(&format!("{stem}-key.pem")) {
            files.write_pair(stem, &ca.issue(&spec).map_err(pki_err)?)?;
        }
    }
    Ok(())
}

/// The dev configuration, built through the same validation as a config file.
pub fn dev_config(
    dir: &Path,
    listen: SocketAddr,
    policies: &Path,
    store: Option<&str>,
    node: &str,
    issuer: &str,
) -> Result<Config, crate::Error> {
    let d = |n: &str| dir.join(n).display().to_string();
    let store = match store {
        None => format!("kind = \"embedded\"\npath = {:?}", d("leases.redb")),
        Some(url) => format!("kind = \"redis\"\nurl = {url:?}\nkey_prefix = \"mayfly-dev\""),
    };
    // Replicas share the directory: each writes its own audit chain.
    let audit = if node == "dev" {
        d("audit.jsonl")
    } else {
        d(&format!("audit-{node}.jsonl"))
    };
    let toml = format!(
        r#"
listen = "{listen}"
node_id = "{node}"
[tls]
cert_file = {server:?}
key_file = {server_key:?}
[[trust_domains]]
name = "{TRUST_DOMAIN}"
bundle_file = {ca:?}
[operators]
spiffe_ids = ["{OPERATOR_ID}"]
[policy]
dir = {policies:?}
reload_interval = "2s"
[store]
{store}
[audit]
path = {audit:?}
[providers.jwt]
issuer = "{issuer}"
signing_key_file = {jwt_key:?}
generate_key = "ES256"
[[jwt_svid]]
trust_domain = "{TRUST_DOMAIN}"
bundle_file = {svid_bundle:?}
audiences = ["{DEV_AUDIENCE}"]
[[oidc_issuers]]
issuer = "{OIDC_ISSUER}"
audiences = ["{DEV_AUDIENCE}"]
jwks_file = {oidc_jwks:?}
algorithms = ["ES256"]
job_claims = ["run_id", "run_attempt"]
"#,
        svid_bundle = d("jwt-svid-bundle.json"),
        oidc_jwks = d("oidc-jwks.json"),
        server = d("server.pem"),
        server_key = d("server-key.pem"),
        ca = d("ca.pem"),
        policies = policies.display().to_string(),
        audit = audit,
        jwt_key = d("jwt-signing-key.pem"),
    );
    let raw: RawConfig = toml::from_str(&toml).map_err(|e| {
        crate::Error::Config(crate::config::ConfigError::Parse {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })
    })?;
    Ok(Config::try_from(raw)?)
}

fn curl_help(dir: &Path, addr: SocketAddr) -> String {
    let d = dir.display();
    // The binary running now: `mayfly` need not be on PATH (`make install` puts it there).
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "mayfly".into());
    format!(
        r#"
Mayfly dev broker on https://{addr}  (trust domain {TRUST_DOMAIN}; files in {d}/, described by {d}/dev.json)

Try the whole flow (paste into a shell):

  export MF=https://{addr} D={d} MAYFLY={exe}
  AGENT="--cacert $D/ca.pem --cert $D/agent.pem --key $D/agent-key.pem"
  OPER="--cacert $D/ca.pem --cert $D/operator.pem --key $D/operator-key.pem"

  # 1. declare a task (purpose + scope)
  TASK=$(curl -s $AGENT -H 'content-type: application/json' $MF/v1/tasks \
    -d '{{"purpose":"triage open issues","scope":[{{"provider":"jwt","target":"https://api.example.com","actions":["issues:read"]}}],"ttl":"30m"}}' \
    | grep -o '"task_id":"[^"]*"' | cut -d'"' -f4); echo "task $TASK"

  # 2. get a credential inside it
  TOKEN=$(curl -s $AGENT -H 'content-type: application/json' $MF/v1/tasks/$TASK/credentials \
    -d '{{"provider":"jwt","target":"https://api.example.com","ttl":"5m"}}' \
    | grep -o '"access_token":"[^"]*"' | cut -d'"' -f4); echo "token ${{TOKEN:0:24}}..."

  # 3. a resource server checks it (RFC 7662) -> "active":true
  curl -s $AGENT $MF/v1/introspect --data-urlencode "token=$TOKEN"; echo

  # 4. out of scope -> 403 out_of_scope
  curl -s $AGENT -H 'content-type: application/json' $MF/v1/tasks/$TASK/credentials \
    -d '{{"provider":"jwt","target":"https://api.example.com","actions":["issues:delete"]}}'; echo

  # 5. the operator sees the lease; the agent completes the task
  curl -s $OPER "$MF/v1/leases?task=$TASK"; echo
  curl -s $AGENT -X POST $MF/v1/tasks/$TASK/complete; echo

  # 6. the token is dead -> "active":false ; the audit chain verifies
  curl -s $AGENT $MF/v1/introspect --data-urlencode "token=$TOKEN"; echo
  $MAYFLY audit verify $D/audit.jsonl

  # Delegation and anomaly control:

  HELPER="--cacert $D/ca.pem --cert $D/agent2.pem --key $D/agent2-key.pem"
  TASK=$(curl -s $AGENT -H 'content-type: application/json' $MF/v1/tasks \
    -d '{{"purpose":"release notes","scope":[{{"provider":"jwt","target":"https://api.example.com","actions":["issues:read","issues:comment"]}}],"ttl":"30m"}}' \
    | grep -o '"task_id":"[^"]*"' | cut -d'"' -f4)
  # 7. hand a narrower slice to the helper agent; its tokens carry "sub":".../agent/demo","act":{{"sub":".../agent/helper"}}
  SUB=$(curl -s $AGENT -H 'content-type: application/json' $MF/v1/tasks/$TASK/delegate \
    -d '{{"principal":"spiffe://dev.mayfly.local/agent/helper","purpose":"read only","scope":[{{"provider":"jwt","target":"https://api.example.com","actions":["issues:read"]}}],"ttl":"10m"}}' \
    | grep -o '"task_id":"[^"]*"' | cut -d'"' -f4); echo "sub-task $SUB"
  curl -s $HELPER -H 'content-type: application/json' $MF/v1/tasks/$SUB/credentials \
    -d '{{"provider":"jwt","target":"https://api.example.com"}}'; echo
  # 8. three out-of-scope requests within 60 s revoke the whole task tree (default rule)
  for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}} ' $AGENT -H 'content-type: application/json' \
    $MF/v1/tasks/$TASK/credentials -d '{{"provider":"jwt","target":"https://api.example.com","actions":["admin"]}}'; done; echo
  curl -s $AGENT $MF/v1/tasks/$TASK | grep -o '"state":"[a-z]*","created_at' | head -1   # -> revoked

  # CI token exchange (RFC 8693) with a GitHub-shaped dev OIDC token, no client certificate:
  OIDC=$($MAYFLY dev token --dir $D --oidc --claims '{{"repository":"acme/app","ref":"refs/heads/main"}}')
  curl -s --cacert $D/ca.pem $MF/v1/token \
    -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
    -d subject_token_type=urn:ietf:params:oauth:token-type:jwt --data-urlencode "subject_token=$OIDC" \
    -d resource=https://api.example.com -d scope=issues:read; echo
"#
    )
}

/// The JWT issuer. Alone, a dev broker is its own issuer (`https://ADDR`). Replicas on
/// Redis must share one issuer, or a token minted by one would not introspect on another:
/// the first replica records its issuer in `issuer.txt` and the others reuse it.
fn dev_issuer(dir: &Path, addr: SocketAddr, shared: bool) -> Result<String, crate::Error> {
    let own = format!("https://{addr}");
    if !shared {
        return Ok(own);
    }
    let path = dir.join("issuer.txt");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().starts_with("https://") => Ok(s.trim().to_string()),
        _ => {
            std::fs::write(&path, &own).map_err(io_err("writing issuer.txt".into()))?;
            Ok(own)
        }
    }
}

pub async fn run(args: DevArgs) -> Result<(), crate::Error> {
    if let Some(command) = &args.command {
        println!("{}", token(&args.dir, command)?);
        return Ok(());
    }
    std::fs::create_dir_all(&args.dir)
        .map_err(io_err(format!("creating {}", args.dir.display())))?;
    let files = Files {
        dir: args.dir.clone(),
    };
    ensure_pki(&files, args.listen)?;
    let (oidc_key, svid_key) = ensure_bearer_keys(&files)?;
    // Bind first: with port 0 the issuer URL and dev.json need the real port.
    let listener = super::bind(args.listen).await?;
    let addr = listener
        .local_addr()
        .map_err(io_err("listener address".into()))?;
    let node = args.node.clone().unwrap_or_else(|| match args.store {
        Some(_) => format!("dev-{}", addr.port()),
        None => "dev".into(),
    });
    let issuer = dev_issuer(&args.dir, addr, args.store.is_some())?;
    let config = dev_config(
        &args.dir,
        addr,
        &args.policies,
        args.store.as_deref(),
        &node,
        &issuer,
    )?;
    let app = App::build(&config).await?;
    let p = |n: &str| args.dir.join(n).display().to_string();
    let pair = |stem: &str, id: &str| json!({"spiffe_id": id, "cert": p(&format!("{stem}.pem")), "key": p(&format!("{stem}-key.pem"))});
    let info = json!({
        "listen": addr.to_string(),
        "url": format!("https://{addr}"),
        "trust_domain": TRUST_DOMAIN,
        "ca": p("ca.pem"),
        "server": {"cert": p("server.pem"), "key": p("server-key.pem")},
        "agent": pair("agent", AGENT_ID),
        "agent2": pair("agent2", AGENT2_ID),
        "operator": pair("operator", OPERATOR_ID),
        "audit_log": config.audit_path.display().to_string(),
        "store": args.store.clone().unwrap_or_else(|| p("leases.redb")),
        "policies": args.policies.display().to_string(),
        "jwt_issuer": config.jwt_issuer,
        "jwks_uri": format!("{}/.well-known/jwks.json", config.jwt_issuer),
        "oidc": {
            "issuer": OIDC_ISSUER, "audience": DEV_AUDIENCE, "kid": oidc_key.kid(),
            "key": p("oidc-issuer-key.pem"), "jwks": p("oidc-jwks.json"),
        },
        "jwt_svid": {
            "trust_domain": TRUST_DOMAIN, "audience": DEV_AUDIENCE, "kid": svid_key.kid(),
            "key": p("jwt-svid-key.pem"), "jwks": p("jwt-svid-bundle.json"),
        },
    });
    let text = serde_json::to_string_pretty(&info).unwrap_or_default();
    std::fs::write(args.dir.join("dev.json"), text).map_err(io_err("writing dev.json".into()))?;
    let help = curl_help(&args.dir, addr);
    crate::app::serve(app, listener, move |_| println!("{help}")).await
}
