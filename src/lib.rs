//! Mayfly — a just-in-time credential broker for autonomous agents and CI.
//!
//! The module map is the architecture. Modules are layered: each imports only modules
//! below it (`scripts/structure-check.py`, run by `make test`, refuses an import cycle,
//! a file over 800 lines or a function over 80, tests excluded).
//!
//! ```text
//! cli        `mayfly serve | dev | config check | audit verify | policy check`;
//!            operator commands; agent helpers `exec`, `credential-process`, `dpop`
//! app        builds the running components from a `Config` (store, audit log,
//!            providers, verifiers, bundle sources, `Broker`, TLS) and serves them
//!            with the reaper and the reloaders
//! api        HTTP edge: rustls accept loop (`tls`), admission (`shed`), one file per
//!            resource (tasks, leases, approvals, token, introspection, signals,
//!            discovery), problem+json (`error`: the only place an error becomes a
//!            status), the per-request audit middleware (`request_audit`), which hands
//!            each request's record to `Broker::commit`
//! config     parsers, one per table: `Raw*` (serde) → validated `Config`; builds nothing
//! broker     the flow: authorize → `AuthorizedMint` (the witness) → issue → commit
//!            (audit record, or undo and fail); beside it tasks, the CI job's implicit
//!            task and RFC 8693 exchange, approvals, anomaly verdicts, operator
//!            revocation and listings, the token surface (introspection, JWKS, DPoP)
//! revocation revoke leases / task trees at the provider; the reaper for due leases
//! provider   CredentialProvider trait; `jwt` signs Mayfly access tokens, `vault`
//!            (Vault/OpenBao tokens, dynamic secrets), `aws` (STS, the deny policy)
//! anomaly    rules over windows per task and per principal; risk; quotas
//! policy     Cedar policies + schema, strict validation, hot reload; `Decision`
//! audit      hash-chained JSON-lines audit trail with group commit; anchors; verify
//! lease      Lease records, the LeaseStore trait and its two stores (`embedded`:
//!            redb; `redis`), each split by concern: tasks and leases, control state
//!            (single-use jtis, windows, risk, deny flags, buckets), approvals, deny
//!            sets, anchors; `ending`, the stores' use of `Task::end`
//! approval   step-up approval records and their compare-and-set transitions (pure)
//! action     the typed `Action` of every request and the `Undo` of each state change
//! task       tasks, grants, scopes and their containment rules; `Task::end`
//! identity   X.509-SVID / JWT-SVID / OIDC / DPoP verification; the only constructor
//!            of VerifiedCaller; trust bundles from files, SPIFFE bundle endpoints and
//!            the Workload API; `OnceKey`, a proof's jti left for the store to consume
//! net, ratelimit, duration, secret, pki, metrics, error, webhook   leaves
//! ```
//!
//! Domain modules never import `api`, `app` or `cli`.

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
