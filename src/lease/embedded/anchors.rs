//! Audit anchors: each node's published chain head, which only moves forward.

use redb::{ReadableDatabase, ReadableTable};

use super::{ANCHORS, EmbeddedStore, db_err, decode, encode};
use crate::lease::{AuditAnchor, StoreError};

pub(super) async fn put_anchor(
    store: &EmbeddedStore,
    anchor: &AuditAnchor,
) -> Result<bool, StoreError> {
    let anchor = anchor.clone();
    store
        .write(move |tx| {
            let mut t = tx.open_table(ANCHORS).map_err(db_err)?;
            let stored: Option<AuditAnchor> = t
                .get(anchor.node.as_str())
                .map_err(db_err)?
                .map(|v| decode(v.value()))
                .transpose()?;
            if !crate::lease::anchor_advances(stored.as_ref(), &anchor) {
                return Ok(false);
            }
            let bytes = encode(&anchor)?;
            t.insert(anchor.node.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            Ok(true)
        })
        .await
}

pub(super) async fn anchors(store: &EmbeddedStore) -> Result<Vec<AuditAnchor>, StoreError> {
    store
        .run(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(ANCHORS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
}
