//! Approvals: records, the fingerprint alias, the requester's live set (its cap) and the
//! keep-until order they are purged in.

use redb::{ReadableDatabase, ReadableTable};
use time::OffsetDateTime;

use super::{
    APPROVAL_FP, APPROVAL_KEEP, APPROVAL_LIVE, APPROVALS, EmbeddedStore, PURGE_BATCH, db_err,
    decode, encode, nanos,
};
use crate::approval::{Approval, ApprovalState, ApprovalTransition, TransitionOutcome};
use crate::lease::StoreError;

/// Removes up to `PURGE_BATCH` approvals past their `keep_until`.
fn purge_approvals(tx: &redb::WriteTransaction, now: u64) -> Result<(), StoreError> {
    let mut keep = tx.open_table(APPROVAL_KEEP).map_err(db_err)?;
    let mut gone = Vec::new();
    for entry in keep.range((0u64, "")..).map_err(db_err)? {
        let (k, _) = entry.map_err(db_err)?;
        let (at, id) = k.value();
        if at > now || gone.len() >= PURGE_BATCH {
            break;
        }
        gone.push((at, id.to_string()));
    }
    let mut records = tx.open_table(APPROVALS).map_err(db_err)?;
    let mut fps = tx.open_table(APPROVAL_FP).map_err(db_err)?;
    let mut live = tx.open_table(APPROVAL_LIVE).map_err(db_err)?;
    for (at, id) in gone {
        keep.remove((at, id.as_str())).map_err(db_err)?;
        let old = records.remove(id.as_str()).map_err(db_err)?;
        if let Some(v) = old {
            let a: Approval = decode(v.value())?;
            drop(v);
            if fps
                .get(a.fingerprint.as_str())
                .map_err(db_err)?
                .map(|v| v.value().to_string())
                == Some(id.clone())
            {
                fps.remove(a.fingerprint.as_str()).map_err(db_err)?;
            }
            live.remove((a.requester.as_str(), id.as_str()))
                .map_err(db_err)?;
        }
    }
    Ok(())
}

pub(super) async fn create_approval(
    store: &EmbeddedStore,
    a: &Approval,
    cap: usize,
) -> Result<bool, StoreError> {
    let a = a.clone();
    store
        .write(move |tx| {
            let now = nanos(OffsetDateTime::now_utc());
            {
                let mut live = tx.open_table(APPROVAL_LIVE).map_err(db_err)?;
                let who = a.requester.as_str();
                let mut count = 0usize;
                let mut dead = Vec::new();
                for entry in live.range((who, "")..).map_err(db_err)? {
                    let (k, v) = entry.map_err(db_err)?;
                    let (p, id) = k.value();
                    if p != who {
                        break;
                    }
                    if v.value() > now {
                        count += 1;
                    } else {
                        dead.push(id.to_string());
                    }
                }
                for id in dead {
                    live.remove((who, id.as_str())).map_err(db_err)?;
                }
                if count >= cap {
                    return Ok(false);
                }
                live.insert((who, a.id.as_str()), nanos(a.expires_at))
                    .map_err(db_err)?;
                let mut records = tx.open_table(APPROVALS).map_err(db_err)?;
                records
                    .insert(a.id.as_str(), encode(&a)?.as_slice())
                    .map_err(db_err)?;
                let mut fps = tx.open_table(APPROVAL_FP).map_err(db_err)?;
                fps.insert(a.fingerprint.as_str(), a.id.as_str())
                    .map_err(db_err)?;
                let mut keep = tx.open_table(APPROVAL_KEEP).map_err(db_err)?;
                keep.insert((nanos(a.keep_until), a.id.as_str()), ())
                    .map_err(db_err)?;
            }
            purge_approvals(tx, now)?;
            Ok(true)
        })
        .await
}

pub(super) async fn approval(
    store: &EmbeddedStore,
    id: &str,
) -> Result<Option<Approval>, StoreError> {
    store.get(|db| {
        let tx = db.begin_read().map_err(db_err)?;
        let t = tx.open_table(APPROVALS).map_err(db_err)?;
        let got = t.get(id).map_err(db_err)?;
        let a: Option<Approval> = got.map(|v| decode(v.value())).transpose()?;
        // Past keep_until it is gone, purged or not.
        let now = OffsetDateTime::now_utc();
        Ok(a.filter(|a| a.keep_until > now))
    })
}

pub(super) async fn approval_for(
    store: &EmbeddedStore,
    fingerprint: &str,
) -> Result<Option<Approval>, StoreError> {
    let id = store.get(|db| {
        let tx = db.begin_read().map_err(db_err)?;
        let t = tx.open_table(APPROVAL_FP).map_err(db_err)?;
        let got = t.get(fingerprint).map_err(db_err)?;
        Ok(got.map(|v| v.value().to_string()))
    })?;
    match id {
        Some(id) => approval(store, &id).await,
        None => Ok(None),
    }
}

pub(super) async fn transition_approval(
    store: &EmbeddedStore,
    t: &ApprovalTransition,
) -> Result<TransitionOutcome, StoreError> {
    let t = t.clone();
    store
        .write(move |tx| {
            let mut records = tx.open_table(APPROVALS).map_err(db_err)?;
            let current: Approval = match records.get(t.id.as_str()).map_err(db_err)? {
                Some(v) => decode(v.value())?,
                None => return Err(StoreError::NotFound(t.id.clone())),
            };
            let next = match crate::approval::apply(&current, &t) {
                Ok(n) => n,
                Err(c) => return Ok(Err(c)),
            };
            records
                .insert(next.id.as_str(), encode(&next)?.as_slice())
                .map_err(db_err)?;
            let mut live = tx.open_table(APPROVAL_LIVE).map_err(db_err)?;
            let k = (next.requester.as_str(), next.id.as_str());
            if next.state.is_live() {
                live.insert(k, nanos(next.expires_at)).map_err(db_err)?;
            } else {
                live.remove(k).map_err(db_err)?;
            }
            Ok(Ok(next))
        })
        .await
}

pub(super) async fn approvals(
    store: &EmbeddedStore,
    state: Option<ApprovalState>,
    limit: usize,
) -> Result<Vec<Approval>, StoreError> {
    store
        .run(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let keep = tx.open_table(APPROVAL_KEEP).map_err(db_err)?;
            let records = tx.open_table(APPROVALS).map_err(db_err)?;
            let now = nanos(OffsetDateTime::now_utc());
            let mut out = Vec::new();
            for entry in keep.range((now, "")..).map_err(db_err)? {
                let (k, _) = entry.map_err(db_err)?;
                if let Some(v) = records.get(k.value().1).map_err(db_err)? {
                    let a: Approval = decode(v.value())?;
                    if state.is_none_or(|s| a.state == s) {
                        out.push(a);
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
}
