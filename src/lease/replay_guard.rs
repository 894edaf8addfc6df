//! A lease store is identity's [`ReplayGuard`]: single-use keys are control state, kept
//! where every replica sees them (`insert_once`).

use async_trait::async_trait;
use std::sync::Arc;
use time::OffsetDateTime;

use super::LeaseStore;
use crate::identity::{ReplayGuard, ReplayGuardError};

#[async_trait]
impl<S: LeaseStore + ?Sized> ReplayGuard for Arc<S> {
    async fn insert_once(
        &self,
        key: &str,
        expires_at: OffsetDateTime,
    ) -> Result<bool, ReplayGuardError> {
        LeaseStore::insert_once(&**self, key, expires_at)
            .await
            .map_err(|e| ReplayGuardError(e.to_string()))
    }
}
