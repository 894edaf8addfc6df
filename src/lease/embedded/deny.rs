//! Provider revocation state: deny sets (durable) and named locks (in process: one
//! process owns the file).

use redb::{ReadableDatabase, ReadableTable};
use time::OffsetDateTime;

use super::{DENY, DENY_SEQ, EmbeddedStore, db_err, poisoned};
use crate::lease::{DenyEntry, StoreError};

#[derive(Default)]
pub(super) struct LocalLocks {
    next_token: u64,
    held: std::collections::HashMap<String, (u64, std::time::Instant)>,
}

pub(super) async fn deny_add(
    store: &EmbeddedStore,
    set: &str,
    member: &str,
    until: OffsetDateTime,
) -> Result<(), StoreError> {
    let (set, member, until) = (set.to_string(), member.to_string(), until.unix_timestamp());
    store
        .write(move |tx| {
            let mut deny = tx.open_table(DENY).map_err(db_err)?;
            let cur = deny
                .get((set.as_str(), member.as_str()))
                .map_err(db_err)?
                .map(|v| v.value());
            let entry = match cur {
                Some((seq, old)) => (seq, old.max(until)),
                None => {
                    let mut seqs = tx.open_table(DENY_SEQ).map_err(db_err)?;
                    let seq = seqs
                        .get(set.as_str())
                        .map_err(db_err)?
                        .map_or(0, |v| v.value())
                        .saturating_add(1);
                    seqs.insert(set.as_str(), seq).map_err(db_err)?;
                    (seq, until)
                }
            };
            deny.insert((set.as_str(), member.as_str()), entry)
                .map_err(db_err)?;
            Ok(())
        })
        .await
}

pub(super) async fn deny_list(
    store: &EmbeddedStore,
    set: &str,
    now: OffsetDateTime,
) -> Result<Vec<DenyEntry>, StoreError> {
    let set = set.to_string();
    let now = now.unix_timestamp();
    store
        .run(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let deny = tx.open_table(DENY).map_err(db_err)?;
            let mut out = Vec::new();
            for row in deny.range((set.as_str(), "")..).map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let (s, member) = k.value();
                if s != set {
                    break;
                }
                let (seq, until) = v.value();
                if until > now {
                    out.push(DenyEntry {
                        member: member.to_string(),
                        until: OffsetDateTime::from_unix_timestamp(until)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        seq,
                    });
                }
            }
            out.sort_by_key(|e| e.seq);
            Ok(out)
        })
        .await
}

pub(super) async fn deny_prune(
    store: &EmbeddedStore,
    set: &str,
    now: OffsetDateTime,
) -> Result<usize, StoreError> {
    let set = set.to_string();
    let now = now.unix_timestamp();
    store
        .write(move |tx| {
            let mut deny = tx.open_table(DENY).map_err(db_err)?;
            let mut gone = Vec::new();
            for row in deny.range((set.as_str(), "")..).map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let (s, member) = k.value();
                if s != set {
                    break;
                }
                if v.value().1 <= now {
                    gone.push(member.to_string());
                }
            }
            for m in &gone {
                deny.remove((set.as_str(), m.as_str())).map_err(db_err)?;
            }
            Ok(gone.len())
        })
        .await
}

pub(super) async fn lock_acquire(
    store: &EmbeddedStore,
    name: &str,
    ttl: std::time::Duration,
) -> Result<Option<u64>, StoreError> {
    let now = std::time::Instant::now();
    let mut l = store.locks.lock().map_err(|_| poisoned())?;
    if l.held.get(name).is_some_and(|(_, until)| *until > now) {
        return Ok(None);
    }
    l.next_token += 1;
    let token = l.next_token;
    l.held.insert(name.to_string(), (token, now + ttl));
    Ok(Some(token))
}

pub(super) async fn lock_holds(
    store: &EmbeddedStore,
    name: &str,
    token: u64,
) -> Result<bool, StoreError> {
    let now = std::time::Instant::now();
    let l = store.locks.lock().map_err(|_| poisoned())?;
    Ok(l.held
        .get(name)
        .is_some_and(|(t, until)| *t == token && *until > now))
}

pub(super) async fn lock_release(
    store: &EmbeddedStore,
    name: &str,
    token: u64,
) -> Result<(), StoreError> {
    let mut l = store.locks.lock().map_err(|_| poisoned())?;
    if l.held.get(name).is_some_and(|(t, _)| *t == token) {
        l.held.remove(name);
    }
    Ok(())
}
