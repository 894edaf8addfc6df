//! Mayfly — a just-in-time credential broker for autonomous agents and CI.
//!
//! The module map is the architecture:
//!
//! ```text
//! api        HTTP edge: rustls accept loop, routes, problem+json (the only place an
//!            error becomes a status code), the per-request audit middleware.
//!   └─ broker    the whole flow, top to bottom:
//!                verify → authorize → record (pending lease) → mint → activate → audit
//!        ├─ identity    X.509-SVID verification; the only constructor of VerifiedCaller
//!        ├─ task        tasks, grants, scopes and their containment rules
//!        ├─ policy      Cedar policies + schema, strict validation, hot reload
//!        ├─ lease       Lease records and the LeaseStore trait (embedded redb store)
//!        ├─ provider    CredentialProvider trait; `jwt` signs Mayfly access tokens
//!        ├─ revocation  revoke leases / task trees; the reaper for due leases
//!        └─ audit       hash-chained JSON-lines audit trail with group commit
//! config     Raw (serde) → validated Config → built components
//! cli        `mayfly serve | dev | audit verify | policy check`
//! ```
//!
//! Domain modules never import `api` or `cli`.

//TMP pub mod api;
pub mod audit;
//TMP pub mod broker;
//TMP pub mod cli;
//TMP pub mod config;
pub mod duration;
//TMP pub mod error;
pub mod identity;
pub mod lease;
pub mod policy;
//TMP pub mod provider;
//TMP pub mod revocation;
pub mod secret;
pub mod task;

//TMP pub use error::Error;

/// Installs the one crypto provider (aws-lc-rs) used by rustls, rcgen and JWT.
/// Idempotent: a second call is a no-op.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
