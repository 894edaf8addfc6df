//! The crate error: every module's error, wrapped, for start-up and the CLI.
//! (Request errors are `broker::BrokerError`, mapped to HTTP in `api::error`.)

use crate::audit::AuditError;
use crate::config::ConfigError;
use crate::identity::BundleError;
use crate::lease::StoreError;
use crate::policy::PolicyError;
use crate::provider::ProviderError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}
