//! Mayfly — a just-in-time credential broker for autonomous agents and CI.
//!
//! The module map is the architecture:
//!
//! ```text
//! api        HTTP edge: rustls accept loop, routes, problem+json (the only place an
//!            error becomes a status code), the per-request audit middleware, which
//!            hands each request's record to `Broker::commit`.
//! action     the typed `Action` of every request and the `Undo` of each state change
//!   └─ broker    the whole flow, top to bottom:
//!                verify → authorize → record (pending lease) → mint → activate → audit
//!                (a JWT Mayfly signs: sign → record (active lease) → audit)
//!        ├─ identity    X.509-SVID / JWT-SVID / OIDC verification; the only constructor
//!        │              of VerifiedCaller; trust bundles from files, SPIFFE bundle
//!        │              endpoints and the Workload API, swapped in while running
//!        ├─ task        tasks, grants, scopes and their containment rules
//!        ├─ policy      Cedar policies + schema, strict validation, hot reload
//!        ├─ lease       Lease records and the LeaseStore trait (embedded redb store),
//!        │              plus the control state every replica shares: single-use
//!        │              jtis, anomaly windows, risk, deny flags, approvals, buckets
//!        ├─ anomaly     rules over windows per task and per principal; risk; quotas
//!        ├─ approval    step-up approvals: durable records, compare-and-set states
//!        ├─ provider    CredentialProvider trait; `jwt` signs Mayfly access tokens,
//!        │              `vault` (Vault/OpenBao tokens, dynamic secrets), `aws` (STS)
//!        ├─ revocation  revoke leases / task trees; the reaper for due leases
//!        └─ audit       hash-chained JSON-lines audit trail with group commit
//! config     Raw (serde) → validated Config → built components
//! net        HTTP-client helpers: bounded body reads, error chains
//! cli        `mayfly serve | dev | audit verify | policy check`; operator commands;
//!            agent helpers `exec` and `credential-process`
//! ```
//!
//! Domain modules never import `api` or `cli`.

pub mod action;
pub mod anomaly;
pub mod api;
pub mod app;
pub mod approval;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod config;
pub mod duration;
pub mod error;
pub mod identity;
pub mod lease;
pub mod metrics;
pub mod net;
pub mod pki;
pub mod policy;
pub mod provider;
pub mod ratelimit;
pub mod revocation;
pub mod secret;
pub mod task;
pub mod webhook;

pub use error::Error;

/// Installs the one crypto provider (aws-lc-rs) used by rustls, rcgen and JWT.
/// Idempotent: a second call is a no-op.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// RFC 3339 form used for every time in the API and the audit trail.
pub fn api_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
