//! Control state: single-use keys, flags, sliding windows, risk events and token buckets.

use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;
use time::OffsetDateTime;

use super::{RedisStore, ms};
use crate::lease::{ControlRead, Observation, Observed, RiskEvent, StoreError};

/// Sets a flag to an expiry, never shortening a later one. KEYS[1] flag; ARGV[1] until ms.
static SET_FLAG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local untl = tonumber(ARGV[1])
if untl > cur then redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[1]) end
return 1",
    )
});

/// One request's control-state updates and reads in one round trip. KEYS: n window
/// keys, m risk keys to record under, f flags to read, r risk keys to read. ARGV: now ms,
/// n, m, f, r, a unique event member, the risk payload, how long risk events are kept
/// (ms), the risk read's lower bound (ms), then per window (window ms, threshold, reset
/// 0/1). Returns {window counts including this event, flags 1/0, risk (payload, ms)…}.
static OBSERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local n, m, f, r = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local member = ARGV[6]
local counts = {}
for i = 1, n do
  local k = KEYS[i]
  local w = tonumber(ARGV[10 + 3 * (i - 1)])
  local threshold = tonumber(ARGV[11 + 3 * (i - 1)])
  redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. (now - w))
  redis.call('ZADD', k, now, member)
  local c = redis.call('ZCARD', k)
  counts[i] = c
  if ARGV[12 + 3 * (i - 1)] == '1' and c >= threshold then
    redis.call('DEL', k)
  else
    redis.call('PEXPIRE', k, w + 1000)
  end
end
if m > 0 then
  local keep = tonumber(ARGV[8])
  for i = n + 1, n + m do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. (now - keep))
    redis.call('ZADD', KEYS[i], now, ARGV[7])
    redis.call('PEXPIRE', KEYS[i], keep + 1000)
  end
end
local flags = {}
for i = 1, f do
  local v = redis.call('GET', KEYS[n + m + i])
  if v and tonumber(v) and tonumber(v) > now then flags[i] = 1 else flags[i] = 0 end
end
local risk = {}
for i = 1, r do
  local got = redis.call('ZRANGEBYSCORE', KEYS[n + m + f + i], ARGV[9], '+inf', 'WITHSCORES')
  for j = 1, #got do risk[#risk + 1] = got[j] end
end
return {counts, flags, risk}",
    )
});

/// Live risk events under several keys: a flat list of (score ms, payload) pairs.
static RISK_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for i = 1, #KEYS do
  local got = redis.call('ZRANGEBYSCORE', KEYS[i], ARGV[1], '+inf', 'WITHSCORES')
  for j = 1, #got do out[#out + 1] = got[j] end
end
return out",
    )
});

/// GCRA on the server's clock. KEYS[1]: the bucket's theoretical arrival time (µs).
/// ARGV: emission interval µs, burst. Returns {1, 0} or {0, wait µs}.
static TAKE_TOKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + interval
local allow_at = next_tat - burst * interval
if now < allow_at then return {0, math.ceil(allow_at - now)} end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return {1, 0}",
    )
});

/// Risk events from a flat `payload, score` reply.
fn risk_pairs(flat: &[String]) -> Result<Vec<RiskEvent>, StoreError> {
    flat.chunks(2)
        .map(|pair| {
            let (payload, score) = match pair {
                [p, s] => (p, s),
                _ => return Err(StoreError::Corrupt("risk reply".into())),
            };
            let at_ms = score
                .parse::<f64>()
                .map_err(|_| StoreError::Corrupt(format!("risk score {score:?}")))?
                as i64;
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
                .map_err(|_| StoreError::Corrupt(format!("risk time {at_ms}")))?;
            crate::lease::parse_risk_payload(at, payload)
        })
        .collect()
}

pub(super) async fn insert_once(
    store: &RedisStore,
    key: &str,
    expires_at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let key = store.key("once", key);
    // PXAT in the past is an error in Redis; such an entry would be gone at once.
    let at = ms(expires_at).max(ms(OffsetDateTime::now_utc()) + 1);
    let set: Option<String> = store
        .with(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("PXAT")
                .arg(at)
                .query_async(&mut c)
                .await
        })
        .await?;
    if set.is_some() {
        store.durable().await?;
    }
    Ok(set.is_some())
}

pub(super) async fn set_flag(
    store: &RedisStore,
    key: &str,
    until: OffsetDateTime,
) -> Result<(), StoreError> {
    let key = store.key("flag", key);
    let at = ms(until);
    if at <= ms(OffsetDateTime::now_utc()) {
        return Ok(());
    }
    let _: i64 = store
        .with(|mut c| async move { SET_FLAG.key(key).arg(at).invoke_async(&mut c).await })
        .await?;
    store.durable().await
}

pub(super) async fn flags(
    store: &RedisStore,
    keys: &[String],
    now: OffsetDateTime,
) -> Result<Vec<bool>, StoreError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = keys.iter().map(|k| store.key("flag", k)).collect();
    let raw: Vec<Option<i64>> = store
        .with(|mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
        .await?;
    let now = ms(now);
    Ok(raw
        .into_iter()
        .map(|v| v.is_some_and(|u| u > now))
        .collect())
}

pub(super) async fn observe(store: &RedisStore, obs: &Observation) -> Result<Vec<u64>, StoreError> {
    Ok(observe_and_read(store, obs, &ControlRead::default())
        .await?
        .counts)
}

pub(super) async fn observe_and_read(
    store: &RedisStore,
    obs: &Observation,
    read: &ControlRead,
) -> Result<Observed, StoreError> {
    let mut inv = OBSERVE.prepare_invoke();
    for w in &obs.windows {
        inv.key(store.key("win", &w.key));
    }
    let risk = obs.risk.as_ref().filter(|_| !obs.risk_keys.is_empty());
    let m = if risk.is_some() {
        obs.risk_keys.len()
    } else {
        0
    };
    for k in obs.risk_keys.iter().take(m) {
        inv.key(store.key("risk", k));
    }
    for k in &read.flags {
        inv.key(store.key("flag", k));
    }
    let r = if read.risk_since.is_some() {
        read.risk_keys.len()
    } else {
        0
    };
    for k in read.risk_keys.iter().take(r) {
        inv.key(store.key("risk", k));
    }
    let keep = u64::try_from(obs.risk_keep.as_millis()).unwrap_or(u64::MAX);
    inv.arg(ms(obs.at))
        .arg(obs.windows.len())
        .arg(m)
        .arg(read.flags.len())
        .arg(r)
        .arg(uuid::Uuid::new_v4().simple().to_string())
        .arg(risk.map(crate::lease::risk_payload).unwrap_or_default())
        .arg(keep)
        .arg(read.risk_since.map_or(0, ms));
    for w in &obs.windows {
        let wms = u64::try_from(w.window.as_millis()).unwrap_or(u64::MAX);
        inv.arg(wms)
            .arg(w.threshold)
            .arg(if w.reset { "1" } else { "0" });
    }
    let (counts, flags, flat): (Vec<u64>, Vec<i64>, Vec<String>) = store
        .with(|mut c| async move { inv.invoke_async(&mut c).await })
        .await?;
    Ok(Observed {
        counts,
        flags: flags.into_iter().map(|f| f == 1).collect(),
        risk: risk_pairs(&flat)?,
    })
}

pub(super) async fn risk_events(
    store: &RedisStore,
    keys: &[String],
    since: OffsetDateTime,
) -> Result<Vec<RiskEvent>, StoreError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = RISK_READ.prepare_invoke();
    for k in keys {
        inv.key(store.key("risk", k));
    }
    inv.arg(ms(since));
    let flat: Vec<String> = store
        .with(|mut c| async move { inv.invoke_async(&mut c).await })
        .await?;
    risk_pairs(&flat)
}

pub(super) async fn take_token(
    store: &RedisStore,
    key: &str,
    limit: crate::ratelimit::RateLimit,
) -> Result<Result<(), Duration>, StoreError> {
    let key = store.key("bucket", key);
    let interval = (1_000_000.0 / limit.per_second).max(1.0).round() as u64;
    let burst = limit.burst.max(1.0).floor() as u64;
    let (ok, wait): (i64, i64) = store
        .with(|mut c| async move {
            TAKE_TOKEN
                .key(key)
                .arg(interval)
                .arg(burst)
                .invoke_async(&mut c)
                .await
        })
        .await?;
    Ok(if ok == 1 {
        Ok(())
    } else {
        Err(Duration::from_micros(u64::try_from(wait).unwrap_or(0)))
    })
}

pub(super) async fn shared_secret(
    store: &RedisStore,
    name: &str,
    candidate: [u8; 32],
) -> Result<[u8; 32], StoreError> {
    let key = store.key("secret", name);
    let value = hex::encode(candidate);
    // Insert-if-absent, then read whichever value won (another replica's, possibly).
    let k = key.clone();
    let set: Option<String> = store
        .with(|mut c| async move {
            redis::cmd("SET")
                .arg(k)
                .arg(value)
                .arg("NX")
                .query_async(&mut c)
                .await
        })
        .await?;
    if set.is_some() {
        store.durable().await?;
    }
    let got: Option<String> = store
        .with(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
        .await?;
    let got = got.ok_or_else(|| StoreError::Unavailable(format!("secret {name} vanished")))?;
    hex::decode(&got)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("secret {name}: not 32 hex-encoded bytes")))
}
