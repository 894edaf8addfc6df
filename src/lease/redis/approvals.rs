//! Approvals: records, the fingerprint alias, the requester's live set (its cap).

use redis::Script;
use std::sync::LazyLock;
use time::OffsetDateTime;

use super::{CAS_RETRIES, RedisStore, SCAN_BATCH, decode, encode, ms};
use crate::approval::{Approval, ApprovalState, ApprovalTransition, TransitionOutcome};
use crate::lease::StoreError;

/// KEYS: record, fingerprint alias, requester's live set, the listing index.
/// ARGV: json, id, now ms, live-until ms, keep-until ms, cap.
static CREATE_APPROVAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[5])
redis.call('SET', KEYS[2], ARGV[2], 'PXAT', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('PEXPIREAT', KEYS[3], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[2])
return 1",
    )
});

/// Compare-and-set of an approval. KEYS: record, requester's live set.
/// ARGV: old json, new json, live (1/0), live-until ms, id.
static CAS_APPROVAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
else
  redis.call('ZREM', KEYS[2], ARGV[5])
end
return 1",
    )
});

pub(super) async fn create_approval(
    store: &RedisStore,
    a: &Approval,
    cap: usize,
) -> Result<bool, StoreError> {
    let json = encode(a)?;
    let keys = (
        store.key("apr", &a.id),
        store.key("aprfp", &a.fingerprint),
        store.key("aprlive", a.requester.as_str()),
        store.index("aprs"),
    );
    let args = (
        a.id.clone(),
        ms(OffsetDateTime::now_utc()),
        ms(a.expires_at),
        ms(a.keep_until),
    );
    let created: i64 = store
        .with(|mut c| async move {
            CREATE_APPROVAL
                .key(keys.0)
                .key(keys.1)
                .key(keys.2)
                .key(keys.3)
                .arg(json)
                .arg(args.0)
                .arg(args.1)
                .arg(args.2)
                .arg(args.3)
                .arg(cap)
                .invoke_async(&mut c)
                .await
        })
        .await?;
    if created == 1 {
        store.durable().await?;
    }
    Ok(created == 1)
}

pub(super) async fn approval(store: &RedisStore, id: &str) -> Result<Option<Approval>, StoreError> {
    store
        .get_str(store.key("apr", id))
        .await?
        .map(|s| decode(&s))
        .transpose()
}

pub(super) async fn approval_for(
    store: &RedisStore,
    fingerprint: &str,
) -> Result<Option<Approval>, StoreError> {
    match store.get_str(store.key("aprfp", fingerprint)).await? {
        Some(id) => approval(store, &id).await,
        None => Ok(None),
    }
}

pub(super) async fn transition_approval(
    store: &RedisStore,
    t: &ApprovalTransition,
) -> Result<TransitionOutcome, StoreError> {
    let key = store.key("apr", &t.id);
    for _ in 0..CAS_RETRIES {
        let Some(old) = store.get_str(key.clone()).await? else {
            return Err(StoreError::NotFound(t.id.clone()));
        };
        let current: Approval = decode(&old)?;
        let next = match crate::approval::apply(&current, t) {
            Ok(n) => n,
            Err(c) => return Ok(Err(c)),
        };
        let (k, live_key) = (
            key.clone(),
            store.key("aprlive", current.requester.as_str()),
        );
        let (new, live, until, id) = (
            encode(&next)?,
            if next.state.is_live() { "1" } else { "0" },
            ms(next.expires_at),
            next.id.clone(),
        );
        let done: i64 = store
            .with(|mut c| async move {
                CAS_APPROVAL
                    .key(k)
                    .key(live_key)
                    .arg(old)
                    .arg(new)
                    .arg(live)
                    .arg(until)
                    .arg(id)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if done == 1 {
            store.durable().await?;
            return Ok(Ok(next));
        }
    }
    Err(StoreError::Unavailable(format!(
        "approval {}: too much contention",
        t.id
    )))
}

pub(super) async fn approvals(
    store: &RedisStore,
    state: Option<ApprovalState>,
    limit: usize,
) -> Result<Vec<Approval>, StoreError> {
    let index = store.index("aprs");
    let now = ms(OffsetDateTime::now_utc());
    let ids: Vec<String> = store
        .with(|mut c| async move {
            redis::cmd("ZRANGEBYSCORE")
                .arg(index)
                .arg(now)
                .arg("+inf")
                .query_async(&mut c)
                .await
        })
        .await?;
    let mut out = Vec::new();
    for chunk in ids.chunks(SCAN_BATCH) {
        let keys = chunk.iter().map(|i| store.key("apr", i)).collect();
        for a in store.mget::<Approval>(keys).await? {
            if state.is_none_or(|s| a.state == s) {
                out.push(a);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}
