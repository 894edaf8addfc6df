//! Credential providers: each mints one kind of credential for a lease and says how that
//! credential dies. Chosen by config, built once, held as `Arc<dyn CredentialProvider>`.

pub mod jwt;

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Arc;
use time::OffsetDateTime;

use crate::identity::VerifiedCaller;
use crate::lease::{Lease, RevocationHandle};
use crate::secret::Secret;
use crate::task::{ProviderKind, Task};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("provider {0} is not configured")]
    NotConfigured(ProviderKind),
    #[error("provider key error: {0}")]
    Key(String),
    #[error("provider could not mint: {0}")]
    Mint(String),
    #[error("provider could not revoke: {0}")]
    Revoke(String),
    #[error("provider unreachable: {0}")]
    Unavailable(String),
}

/// What Mayfly knows about how a credential died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The provider confirmed the credential no longer works.
    Revoked,
    /// The provider cannot revoke it one by one: it keeps working until `at`.
    ExpiresOnly { at: OffsetDateTime },
}

/// Everything a provider may use to cut a credential. The lease is already durable.
pub struct MintRequest<'a> {
    pub lease: &'a Lease,
    pub task: &'a Task,
    pub caller: &'a VerifiedCaller,
    /// Who delegated this task, nearest first (empty for a task declared by its owner).
    pub delegation: &'a [crate::identity::Principal],
}

/// A freshly minted credential. `credential` goes to the caller only; the audit trail and
/// the lease get `fingerprint` and `handle`.
#[derive(Debug)]
pub struct Minted {
    pub credential: Secret<serde_json::Value>,
    pub fingerprint: String,
    pub handle: Option<RevocationHandle>,
}

#[async_trait]
pub trait CredentialProvider: Send + Sync + 'static {
    fn kind(&self) -> ProviderKind;
    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError>;
    /// Revokes the credential of `lease`. Must be idempotent, and must work for a lease
    /// that stayed `pending` (the credential may or may not exist).
    async fn revoke(&self, lease: &Lease) -> Result<Revocation, ProviderError>;
    async fn ready(&self) -> Result<(), ProviderError>;
}

/// The configured providers, by kind.
#[derive(Clone, Default)]
pub struct Providers(HashMap<ProviderKind, Arc<dyn CredentialProvider>>);

impl Providers {
    pub fn insert(&mut self, p: Arc<dyn CredentialProvider>) {
        self.0.insert(p.kind(), p);
    }
    pub fn get(&self, kind: ProviderKind) -> Result<&Arc<dyn CredentialProvider>, ProviderError> {
        self.0.get(&kind).ok_or(ProviderError::NotConfigured(kind))
    }
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn CredentialProvider>> {
        self.0.values()
    }
}
