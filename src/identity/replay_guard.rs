//! The one thing identity needs from shared state: remembering a single-use key (a
//! DPoP proof's `jti`) until it could no longer pass anyway, on every replica at once.
//! The lease store implements it; identity names only this capability, so it sits below
//! `lease` (which imports `identity::Principal`).

use async_trait::async_trait;
use time::OffsetDateTime;

/// Records single-use keys, atomically across replicas.
#[async_trait]
pub trait ReplayGuard: Send + Sync + 'static {
    /// Inserts `key` unless it is present and unexpired: `true` when inserted now (first
    /// use), `false` when it was already there (a replay). The entry lives until
    /// `expires_at`.
    async fn insert_once(
        &self,
        key: &str,
        expires_at: OffsetDateTime,
    ) -> Result<bool, ReplayGuardError>;
}

/// A single-use key still to be recorded, and until when it must be remembered: a
/// checked DPoP proof's `jti`, consumed in the same store write as the lease of the
/// credential it asked for (`LeaseStore::put_new_once`), so a replay is refused without
/// a write of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnceKey {
    pub key: String,
    pub until: OffsetDateTime,
}

/// The store behind a [`ReplayGuard`] could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplayGuardError(pub String);
