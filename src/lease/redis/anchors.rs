//! Audit anchors: each replica's published chain head, which only moves forward.

use redis::Script;
use std::sync::LazyLock;

use super::{RedisStore, decode, encode};
use crate::lease::{AuditAnchor, StoreError};

/// Stores an audit anchor only if it moves forward (see `LeaseStore::put_anchor`).
/// KEYS: the node's anchor hash, the set of anchored nodes. ARGV: seq, hash, JSON, node.
static PUT_ANCHOR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local seq = redis.call('HGET', KEYS[1], 'seq')
if seq then
  local cur, new = tonumber(seq), tonumber(ARGV[1])
  if cur > new then return 0 end
  if cur == new and redis.call('HGET', KEYS[1], 'hash') ~= ARGV[2] then return 0 end
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'hash', ARGV[2], 'json', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1",
    )
});

pub(super) async fn put_anchor(
    store: &RedisStore,
    anchor: &AuditAnchor,
) -> Result<bool, StoreError> {
    let json = encode(anchor)?;
    let keys = (store.key("anchor", &anchor.node), store.index("anchors"));
    let (seq, hash, node) = (anchor.seq, anchor.hash.clone(), anchor.node.clone());
    let stored: i64 = store
        .with(|mut c| async move {
            PUT_ANCHOR
                .key(keys.0)
                .key(keys.1)
                .arg(seq)
                .arg(hash)
                .arg(json)
                .arg(node)
                .invoke_async(&mut c)
                .await
        })
        .await?;
    if stored == 0 {
        return Ok(false);
    }
    store.durable().await?;
    Ok(true)
}

pub(super) async fn anchors(store: &RedisStore) -> Result<Vec<AuditAnchor>, StoreError> {
    let set = store.index("anchors");
    let nodes: Vec<String> = store
        .with(|mut c| async move { redis::cmd("SMEMBERS").arg(set).query_async(&mut c).await })
        .await?;
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let key = store.key("anchor", &node);
        let json: Option<String> = store
            .with(|mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg("json")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if let Some(j) = json {
            out.push(decode(&j)?);
        }
    }
    Ok(out)
}
