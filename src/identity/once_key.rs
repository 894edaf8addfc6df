//! A single-use key a verified proof leaves to be consumed (a DPoP proof's `jti`). The
//! lease store records it with the lease it pays for; identity names only the key, so it
//! sits below `lease` (which imports `identity::Principal`).

use time::OffsetDateTime;

/// A single-use key still to be recorded, and until when it must be remembered: a
/// checked DPoP proof's `jti`, consumed in the same store write as the lease of the
/// credential it asked for (`LeaseStore::put_new_once`), so a replay is refused without
/// a write of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnceKey {
    pub key: String,
    pub until: OffsetDateTime,
}
