//! Provider revocation state shared by every replica: deny sets and fenced locks.

use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;
use time::OffsetDateTime;

use super::RedisStore;
use crate::lease::{DenyEntry, StoreError};

/// Adds a member to a deny set, keeping its first `seq` and the later `until`.
static DENY_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local seq, old = string.match(cur, '^(%d+):(%-?%d+)$')
  if seq and tonumber(ARGV[2]) > tonumber(old) then
    redis.call('HSET', KEYS[1], ARGV[1], seq .. ':' .. ARGV[2])
  end
  if seq then return 0 end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], seq .. ':' .. ARGV[2])
return 1",
    )
});

/// Drops deny-set members whose `until` is at or before ARGV[1].
static DENY_PRUNE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local all = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #all, 2 do
  local _, untl = string.match(all[i + 1], '^(%d+):(%-?%d+)$')
  if untl and tonumber(untl) <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
    n = n + 1
  end
end
return n",
    )
});

/// Takes a lock if free: the token comes from a counter that only grows, so a holder
/// whose lock lapsed can tell that a later one exists.
static LOCK_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], t, 'PX', ARGV[1])
return t",
    )
});

static LOCK_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

pub(super) async fn deny_add(
    store: &RedisStore,
    set: &str,
    member: &str,
    until: OffsetDateTime,
) -> Result<(), StoreError> {
    let keys = (store.key("deny", set), store.key("denyseq", set));
    let (member, until) = (member.to_string(), until.unix_timestamp());
    let _: i64 = store
        .with(|mut c| async move {
            DENY_ADD
                .key(keys.0)
                .key(keys.1)
                .arg(member)
                .arg(until)
                .invoke_async(&mut c)
                .await
        })
        .await?;
    store.durable().await
}

pub(super) async fn deny_list(
    store: &RedisStore,
    set: &str,
    now: OffsetDateTime,
) -> Result<Vec<DenyEntry>, StoreError> {
    let key = store.key("deny", set);
    let all: std::collections::HashMap<String, String> = store
        .with(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
        .await?;
    let now = now.unix_timestamp();
    let mut out = Vec::with_capacity(all.len());
    for (member, v) in all {
        let parsed = v
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<i64>().ok()?)));
        let Some((seq, until)) = parsed else {
            return Err(StoreError::Corrupt(format!("deny entry {member}: {v:?}")));
        };
        if until > now {
            out.push(DenyEntry {
                member,
                until: OffsetDateTime::from_unix_timestamp(until)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                seq,
            });
        }
    }
    out.sort_by_key(|e| e.seq);
    Ok(out)
}

pub(super) async fn deny_prune(
    store: &RedisStore,
    set: &str,
    now: OffsetDateTime,
) -> Result<usize, StoreError> {
    let key = store.key("deny", set);
    let now = now.unix_timestamp();
    let n: i64 = store
        .with(|mut c| async move { DENY_PRUNE.key(key).arg(now).invoke_async(&mut c).await })
        .await?;
    Ok(usize::try_from(n).unwrap_or(0))
}

pub(super) async fn lock_acquire(
    store: &RedisStore,
    name: &str,
    ttl: Duration,
) -> Result<Option<u64>, StoreError> {
    let keys = (store.key("lock", name), store.key("fence", name));
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    let token: u64 = store
        .with(|mut c| async move {
            LOCK_ACQUIRE
                .key(keys.0)
                .key(keys.1)
                .arg(ms)
                .invoke_async(&mut c)
                .await
        })
        .await?;
    Ok((token > 0).then_some(token))
}

pub(super) async fn lock_holds(
    store: &RedisStore,
    name: &str,
    token: u64,
) -> Result<bool, StoreError> {
    let key = store.key("lock", name);
    let cur: Option<u64> = store
        .with(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
        .await?;
    Ok(cur == Some(token))
}

pub(super) async fn lock_release(
    store: &RedisStore,
    name: &str,
    token: u64,
) -> Result<(), StoreError> {
    let key = store.key("lock", name);
    let _: i64 = store
        .with(|mut c| async move { LOCK_RELEASE.key(key).arg(token).invoke_async(&mut c).await })
        .await?;
    Ok(())
}
