//! Control state: single-use keys and flags (`expiring`), risk events, sliding windows
//! (in memory) and token buckets (in memory: one node).

use redb::{ReadableDatabase, ReadableTable};
use std::sync::Arc;
use time::OffsetDateTime;

use super::{
    EXPIRING, EXPIRY, EmbeddedStore, PURGE_BATCH, RISK, RISK_EXPIRY, SECRETS, db_err, nanos,
};
use crate::lease::{ControlRead, Observation, Observed, RiskEvent, StoreError};

/// Sliding windows kept in memory at most; past it the least recently used goes.
pub const MAX_WINDOWS: usize = 1_000_000;

/// Removes up to `PURGE_BATCH` entries expired at `now` from `expiring` / `risk`.
fn purge(tx: &redb::WriteTransaction, now: u64) -> Result<(), StoreError> {
    let mut index = tx.open_table(EXPIRY).map_err(db_err)?;
    let mut table = tx.open_table(EXPIRING).map_err(db_err)?;
    let mut gone = Vec::new();
    for entry in index.range((0u64, "")..).map_err(db_err)? {
        let (k, _) = entry.map_err(db_err)?;
        let (at, key) = k.value();
        if at > now || gone.len() >= PURGE_BATCH {
            break;
        }
        gone.push((at, key.to_string()));
    }
    for (at, key) in gone {
        index.remove((at, key.as_str())).map_err(db_err)?;
        if table.get(key.as_str()).map_err(db_err)?.map(|v| v.value()) == Some(at) {
            table.remove(key.as_str()).map_err(db_err)?;
        }
    }
    let mut risk_index = tx.open_table(RISK_EXPIRY).map_err(db_err)?;
    let mut risk = tx.open_table(RISK).map_err(db_err)?;
    let mut gone = Vec::new();
    for entry in risk_index.range((0u64, "", "")..).map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        let (drop_at, subject, unique) = k.value();
        if drop_at > now || gone.len() >= PURGE_BATCH {
            break;
        }
        gone.push((drop_at, subject.to_string(), unique.to_string(), v.value()));
    }
    for (drop_at, subject, unique, at) in gone {
        risk_index
            .remove((drop_at, subject.as_str(), unique.as_str()))
            .map_err(db_err)?;
        risk.remove((subject.as_str(), at, unique.as_str()))
            .map_err(db_err)?;
    }
    Ok(())
}

/// Writes `key` → `until` in `expiring`, keeping the index in step.
fn put_expiring(tx: &redb::WriteTransaction, key: &str, until: u64) -> Result<(), StoreError> {
    let mut table = tx.open_table(EXPIRING).map_err(db_err)?;
    let mut index = tx.open_table(EXPIRY).map_err(db_err)?;
    if let Some(old) = table.insert(key, until).map_err(db_err)? {
        index.remove((old.value(), key)).map_err(db_err)?;
    }
    index.insert((until, key), ()).map_err(db_err)?;
    Ok(())
}

/// In-memory sliding windows with least-recently-used eviction.
#[derive(Default)]
pub(super) struct Windows {
    events: std::collections::HashMap<String, (u64, std::collections::VecDeque<u64>)>,
    /// (last use sequence, key): the eviction order.
    lru: std::collections::BTreeSet<(u64, String)>,
    seq: u64,
}

impl Windows {
    pub(super) fn hit(
        &mut self,
        key: &str,
        now: u64,
        window: u64,
        threshold: u64,
        reset: bool,
    ) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        if !self.events.contains_key(key)
            && self.events.len() >= MAX_WINDOWS
            && let Some((_, oldest)) = self.lru.pop_first()
        {
            self.events.remove(&oldest);
        }
        let entry = self
            .events
            .entry(key.to_string())
            .or_insert_with(|| (0, std::collections::VecDeque::new()));
        self.lru.remove(&(entry.0, key.to_string()));
        entry.0 = seq;
        self.lru.insert((seq, key.to_string()));
        let q = &mut entry.1;
        q.push_back(now);
        let floor = now.saturating_sub(window);
        while q.front().is_some_and(|t| *t < floor) {
            q.pop_front();
        }
        let count = q.len() as u64;
        if reset && count >= threshold {
            q.clear();
        }
        count
    }
}

/// Whether the single-use `key` is present and unexpired at `now` (nanoseconds).
pub(super) fn once_is_live(
    tx: &redb::WriteTransaction,
    key: &str,
    now: u64,
) -> Result<bool, StoreError> {
    let table = tx.open_table(EXPIRING).map_err(db_err)?;
    let got = table.get(format!("once:{key}").as_str()).map_err(db_err)?;
    Ok(got.is_some_and(|v| v.value() > now))
}

/// Records the single-use `key` until `expires_at`, and purges what has expired.
pub(super) fn put_once(
    tx: &redb::WriteTransaction,
    key: &str,
    expires_at: OffsetDateTime,
    now: u64,
) -> Result<(), StoreError> {
    put_expiring(tx, &format!("once:{key}"), nanos(expires_at))?;
    purge(tx, now)
}

pub(super) async fn insert_once(
    store: &EmbeddedStore,
    key: &str,
    expires_at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let key = key.to_string();
    store
        .write(move |tx| {
            let now = nanos(OffsetDateTime::now_utc());
            if once_is_live(tx, &key, now)? {
                return Ok(false);
            }
            put_once(tx, &key, expires_at, now)?;
            Ok(true)
        })
        .await
}

pub(super) async fn set_flag(
    store: &EmbeddedStore,
    key: &str,
    until: OffsetDateTime,
) -> Result<(), StoreError> {
    let key = format!("flag:{key}");
    let until = nanos(until);
    store
        .write(move |tx| {
            let now = nanos(OffsetDateTime::now_utc());
            let current = {
                let table = tx.open_table(EXPIRING).map_err(db_err)?;
                let got = table.get(key.as_str()).map_err(db_err)?;
                got.map_or(0, |v| v.value())
            };
            if until > current && until > now {
                put_expiring(tx, &key, until)?;
            }
            purge(tx, now)
        })
        .await
}

pub(super) async fn flags(
    store: &EmbeddedStore,
    keys: &[String],
    now: OffsetDateTime,
) -> Result<Vec<bool>, StoreError> {
    read(store, |tx| flags_in(tx, keys, nanos(now)))
}

/// `f` over one read transaction of the store.
fn read<T>(
    store: &EmbeddedStore,
    f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    store.get(|db| f(&db.begin_read().map_err(db_err)?))
}

fn flags_in(
    tx: &redb::ReadTransaction,
    keys: &[String],
    now: u64,
) -> Result<Vec<bool>, StoreError> {
    let table = tx.open_table(EXPIRING).map_err(db_err)?;
    keys.iter()
        .map(|k| {
            let got = table.get(format!("flag:{k}").as_str()).map_err(db_err)?;
            Ok(got.is_some_and(|v| v.value() > now))
        })
        .collect()
}

/// The request path's reads (`LeaseStore::observe_and_read`): after the observation, the
/// flags and the risk events in one read transaction.
pub(super) async fn observe_and_read(
    store: &EmbeddedStore,
    obs: &Observation,
    wanted: &ControlRead,
) -> Result<Observed, StoreError> {
    let counts = observe(store, obs).await?;
    read(store, |tx| {
        let flags = flags_in(tx, &wanted.flags, nanos(obs.at))?;
        let risk = match wanted.risk_since {
            Some(since) => risk_in(tx, &wanted.risk_keys, nanos(since))?,
            None => Vec::new(),
        };
        Ok(Observed {
            counts,
            flags,
            risk,
        })
    })
}

pub(super) async fn observe(
    store: &EmbeddedStore,
    obs: &Observation,
) -> Result<Vec<u64>, StoreError> {
    let now = nanos(obs.at);
    let counts = {
        let mut w = store.windows.lock().unwrap_or_else(|p| p.into_inner());
        obs.windows
            .iter()
            .map(|h| {
                let span = u64::try_from(h.window.as_nanos()).unwrap_or(u64::MAX);
                w.hit(&h.key, now, span, h.threshold, h.reset)
            })
            .collect()
    };
    if let Some(r) = &obs.risk
        && !obs.risk_keys.is_empty()
    {
        let payload = crate::lease::risk_payload(r);
        let unique = payload.rsplit('|').next().unwrap_or_default().to_string();
        let keys = obs.risk_keys.clone();
        let keep = u64::try_from(obs.risk_keep.as_nanos()).unwrap_or(u64::MAX);
        let at = nanos(r.at);
        store
            .write(move |tx| {
                {
                    let mut risk = tx.open_table(RISK).map_err(db_err)?;
                    let mut index = tx.open_table(RISK_EXPIRY).map_err(db_err)?;
                    for k in &keys {
                        risk.insert((k.as_str(), at, unique.as_str()), payload.as_str())
                            .map_err(db_err)?;
                        index
                            .insert((at.saturating_add(keep), k.as_str(), unique.as_str()), at)
                            .map_err(db_err)?;
                    }
                }
                purge(tx, nanos(OffsetDateTime::now_utc()))
            })
            .await?;
    }
    Ok(counts)
}

pub(super) async fn risk_events(
    store: &EmbeddedStore,
    keys: &[String],
    since: OffsetDateTime,
) -> Result<Vec<RiskEvent>, StoreError> {
    read(store, |tx| risk_in(tx, keys, nanos(since)))
}

fn risk_in(
    tx: &redb::ReadTransaction,
    keys: &[String],
    since: u64,
) -> Result<Vec<RiskEvent>, StoreError> {
    let risk = tx.open_table(RISK).map_err(db_err)?;
    let mut out = Vec::new();
    for k in keys {
        for entry in risk
            .range((k.as_str(), since, "")..(k.as_str(), u64::MAX, ""))
            .map_err(db_err)?
        {
            let (key, v) = entry.map_err(db_err)?;
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(key.value().1))
                .map_err(|_| StoreError::Corrupt("risk time".into()))?;
            out.push(crate::lease::parse_risk_payload(at, v.value())?);
        }
    }
    Ok(out)
}

pub(super) async fn take_token(
    store: &EmbeddedStore,
    key: &str,
    limit: crate::ratelimit::RateLimit,
) -> Result<Result<(), std::time::Duration>, StoreError> {
    let bucket = {
        let mut all = store.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() >= MAX_WINDOWS && !all.contains_key(key) {
            // A full bucket decides exactly as a missing one: dropping those is safe.
            all.retain(|_, b| !b.is_full());
        }
        all.entry(key.to_string())
            .or_insert_with(|| Arc::new(crate::ratelimit::TokenBucket::new(limit)))
            .clone()
    };
    Ok(bucket.try_take())
}

/// A stored secret read back must be the 32 bytes written; anything else is corrupt.
fn secret_bytes(name: &str, v: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(v).map_err(|_| StoreError::Corrupt(format!("secret {name}: not 32 bytes")))
}

pub(super) async fn shared_secret(
    store: &EmbeddedStore,
    name: &str,
    candidate: [u8; 32],
) -> Result<[u8; 32], StoreError> {
    let name = name.to_string();
    store
        .write(move |tx| {
            let mut table = tx.open_table(SECRETS).map_err(db_err)?;
            let kept = match table.get(name.as_str()).map_err(db_err)? {
                Some(v) => Some(secret_bytes(&name, v.value())?),
                None => None,
            };
            if let Some(k) = kept {
                return Ok(k);
            }
            table
                .insert(name.as_str(), candidate.as_slice())
                .map_err(db_err)?;
            Ok(candidate)
        })
        .await
}
