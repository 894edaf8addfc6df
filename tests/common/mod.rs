//! Test fixtures, one module per fake or fixture: a PKI minted in code, configs written
//! to temp dirs, the real `mayfly` binary on a free loopback port, clients, and the real
//! backends (Redis, OpenBao, moto, ministack, an OIDC issuer, a Workload API stand-in, a
//! bundle endpoint). Tests import them from here.
#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses a different part of the fixtures"
)]

mod bao;
mod bao_bin;
mod bundle_server;
mod config;
mod http;
mod jwt_svid;
mod loopback;
mod metrics;
mod ministack;
mod moto;
mod oidc;
mod pki;
mod records;
mod redis;
mod redis_bin;
mod server;
mod workload_api;

pub use bao::Bao;
pub use bundle_server::{BundleServer, spiffe_bundle_doc};
pub use config::{ConfigOptions, TEST_POLICY, redis_store, write_config};
pub use http::{
    audit_records, audit_text, client, declare_with_bearer, declare_with_svid, eventually, get,
    introspect, post_json, raw_get_status, task_body,
};
pub use jwt_svid::JwtSvidKey;
pub use loopback::free_port;
pub use metrics::{metric_value, metrics_text, wait_for_metric};
pub use ministack::{MINISTACK_ACCOUNT, Ministack, ministack_bin, role_deny_policy};
pub use moto::Moto;
pub use records::{lease, task};

/// SDK config for `key`/`secret` against the AWS emulator at `url` (moto or ministack).
pub async fn aws_sdk_config(
    url: &str,
    key: &str,
    secret: &str,
    token: Option<&str>,
) -> aws_config::SdkConfig {
    let creds =
        aws_sdk_sts::config::Credentials::new(key, secret, token.map(String::from), None, "test");
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(creds)
        .load()
        .await
}
pub use oidc::{OidcIssuer, jwt_payload};
pub use pki::{AGENT, AGENT2, OPERATOR, Pair, Pki, TD_A, TD_B, verified};
pub use redis::RedisServer;
pub use server::{Server, dev_client, run_cli, run_cli_env};
pub use workload_api::{WorkloadApiStub, write_atomically};
