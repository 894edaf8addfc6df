//! Defaults of keys whose serde default is a function; each is documented, with why, in
//! `config/mayfly.full.toml`.

pub(super) fn dpop_max_age() -> String {
    "60s".into()
}
pub(super) fn dpop_leeway() -> String {
    "5s".into()
}
pub(super) fn dpop_nonce_lifetime() -> String {
    "60s".into()
}
pub(super) fn jwt_binding() -> crate::provider::jwt::Binding {
    crate::provider::jwt::Binding::Optional
}
pub(super) fn jwt_burst() -> f64 {
    50.0
}
pub(super) fn webhook_timeout() -> String {
    "5s".into()
}
pub(super) fn webhook_attempts() -> u32 {
    5
}
pub(super) fn webhook_events() -> Vec<String> {
    ["lease.revoked", "lease.irrevocable", "anomaly.triggered"]
        .map(String::from)
        .to_vec()
}
pub(super) fn rule_mode() -> String {
    "enforce".into()
}
pub(super) fn store_path() -> std::path::PathBuf {
    "mayfly-leases.redb".into()
}
pub(super) fn store_cache_bytes() -> u64 {
    crate::lease::embedded::DEFAULT_CACHE_BYTES as u64
}
pub(super) fn key_prefix() -> String {
    "mayfly".into()
}
pub(super) fn durability() -> String {
    "server".into()
}
pub(super) fn wait_replicas() -> u32 {
    1
}
pub(super) fn wait_timeout() -> String {
    "1s".into()
}
pub(super) fn verify_durability() -> bool {
    true
}
pub(super) fn op_timeout() -> String {
    "2s".into()
}
pub(super) fn listen() -> String {
    "127.0.0.1:8443".into()
}
pub(super) fn node_id() -> String {
    "mayfly-0".into()
}
pub(super) fn leeway() -> String {
    "30s".into()
}
pub(super) fn jwks_ttl() -> String {
    "10m".into()
}
pub(super) fn refetch_cooldown() -> String {
    "30s".into()
}
pub(super) fn max_keys() -> usize {
    32
}
pub(super) fn max_exchange_ttl() -> String {
    "1h".into()
}
pub(super) fn svid_algorithms() -> Vec<String> {
    [
        "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    ]
    .map(String::from)
    .to_vec()
}
pub(super) fn wapi_initial_timeout() -> String {
    "10s".into()
}
pub(super) fn wapi_backoff_min() -> String {
    "500ms".into()
}
pub(super) fn wapi_backoff_max() -> String {
    "30s".into()
}
pub(super) fn oidc_algorithms() -> Vec<String> {
    ["RS256", "ES256"].map(String::from).to_vec()
}
