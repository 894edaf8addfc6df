//! Policies and a `mayfly serve` config written to a temp dir.

use super::{OPERATOR, Pki, TD_A, TD_B};
use std::path::{Path, PathBuf};

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

pub fn redis_store(url: &str, prefix: &str) -> String {
    format!("kind = \"redis\"\nurl = {url:?}\nkey_prefix = {prefix:?}\nop_timeout = \"1s\"")
}
