//! The Redis lease store, shared by every broker replica.
//!
//! Every key carries the hash tag `{prefix}`, so all of Mayfly's keys live in one hash
//! slot: multi-key Lua scripts stay atomic on Redis Cluster too (at the price of one
//! shard holding all lease state — a lease is ~1 KiB, so 1M leases ≈ 1 GiB).
//!
//! Keys: `{p}:task:ID` and `{p}:lease:ID` (JSON), `{p}:tl:TASK` (set: the task's leases),
//! `{p}:ch:TASK` (set: sub-tasks), `{p}:tasks` and `{p}:leases` (sorted sets by id for
//! pagination), `{p}:due` (sorted set: lease id by due time in ms — the reaper's O(log n)
//! expiry index). Provider revocation state: `{p}:deny:SET` (hash: member → `seq:until`)
//! with `{p}:denyseq:SET` (its counter), `{p}:lock:NAME` (the holder's fencing token, with
//! a TTL) with `{p}:fence:NAME` (the last token given out, never reset). Audit anchors:
//! `{p}:anchor:NODE` (hash: each replica's published chain head), `{p}:anchors` (set of
//! anchored nodes). Control state, each key with its own Redis expiry (no clear-all):
//! `{p}:once:KEY` (single-use keys, `SET NX PXAT`), `{p}:flag:KEY` (value: expiry ms),
//! `{p}:win:KEY` (sorted set of events by ms: one sliding window), `{p}:risk:KEY`
//! (sorted set of `weight|name|unique` by ms). Approvals: `{p}:apr:ID` (JSON, expiring
//! at its `keep_until`), `{p}:aprfp:FINGERPRINT` (→ id), `{p}:aprlive:PRINCIPAL`
//! (sorted set: the requester's live approvals by deadline, for its cap), `{p}:aprs`
//! (sorted set: every approval by `keep_until`, for listing). Buckets: `{p}:bucket:KEY`
//! (GCRA theoretical arrival time, µs on the server's clock).
//!
//! State transitions are compare-and-set: the new record is computed by the same Rust
//! code as the embedded store (`apply_transition`) and written by a Lua script only if
//! the stored record is still the one it was computed from; otherwise it is re-read and
//! re-checked. Claims on due leases are one Lua script, so a lease is claimed by exactly
//! one replica per claim period.

use async_trait::async_trait;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Script, Value};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::{
    AuditAnchor, ControlRead, DenyEntry, Lease, LeaseQuery, LeaseStore, Observation, Observed,
    Page, RiskEvent, StoreError, TaskQuery, Transition, apply_transition, lease_matches,
    task_matches,
};
use crate::approval::{Approval, ApprovalState, ApprovalTransition, TransitionOutcome};
use crate::task::{LeaseId, Task, TaskId, TaskState};

/// What a write must reach before Mayfly treats it as durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// Whatever the server does (fine for dev; a crash of Redis may lose recent leases).
    Server,
    /// The server must run with `appendonly yes` and `appendfsync always`; checked at
    /// start-up with `CONFIG GET` unless `verify` is false (managed Redis without CONFIG).
    Aof { verify: bool },
    /// After each write, `WAIT replicas timeout`: fewer acknowledgements fail the write.
    Wait { replicas: u32, timeout: Duration },
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://`, `redis+sentinel://h1:p1,h2:p2/master`, `redis+cluster://h1:p1,h2:p2`
    pub url: String,
    pub key_prefix: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) to verify a `rediss://` server; the system roots otherwise.
    pub tls_ca_file: Option<PathBuf>,
    pub durability: Durability,
    /// Upper bound on any single store operation; past it the request fails closed.
    pub op_timeout: Duration,
}

enum Backend {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel {
        client: Box<Mutex<SentinelClient>>,
        conn: Mutex<Option<MultiplexedConnection>>,
    },
}

#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
    Mux(MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Mux(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Mux(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Mux(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    backend: Backend,
    prefix: String,
    durability: Durability,
    op_timeout: Duration,
}

static CREATE_TASK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
if ARGV[3] == '1' then redis.call('SADD', KEYS[3], ARGV[2]) end
return 1",
    )
});

static PUT_NEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
redis.call('HINCRBY', KEYS[5], ARGV[4], 1)
return 1",
    )
});

/// Compare-and-set a record; optionally move it in the due index.
static CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[3] == 'del' then
  redis.call('ZREM', KEYS[2], ARGV[4])
elseif ARGV[3] ~= 'keep' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
end
if ARGV[5] ~= ARGV[6] then
  redis.call('HINCRBY', KEYS[3], ARGV[5], -1)
  redis.call('HINCRBY', KEYS[3], ARGV[6], 1)
end
return 1",
    )
});

static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids",
    )
});

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
            super::parse_risk_payload(at, payload)
        })
        .collect()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// How many CAS retries before giving up under contention (each retry re-reads).
const CAS_RETRIES: usize = 16;

impl RedisStore {
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let password = match &cfg.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| {
                        StoreError::Unavailable(format!("redis password file {}: {e}", p.display()))
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => None,
        };
        let tls_ca = match &cfg.tls_ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                StoreError::Unavailable(format!("redis tls_ca_file {}: {e}", p.display()))
            })?),
            None => None,
        };
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: tls_ca.clone(),
        };
        let with_auth = |info: redis::ConnectionInfo| -> redis::ConnectionInfo {
            let mut settings = info.redis_settings().clone();
            if let Some(pw) = &password {
                settings = settings.set_password(pw);
            }
            if let Some(u) = &cfg.username {
                settings = settings.set_username(u);
            }
            info.set_redis_settings(settings)
        };
        let backend = if let Some(rest) = cfg.url.strip_prefix("redis+sentinel://") {
            let (hosts, master) = rest
                .split_once('/')
                .ok_or_else(|| unavailable("sentinel URL needs /MASTER_NAME"))?;
            let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
            let mut node = SentinelNodeConnectionInfo::default();
            let base = with_auth(
                "redis://127.0.0.1"
                    .into_connection_info()
                    .map_err(unavailable)?,
            );
            node = node.set_redis_connection_info(base.redis_settings().clone());
            let client =
                SentinelClient::build(sentinels, master, Some(node), SentinelServerType::Master)
                    .map_err(unavailable)?;
            Backend::Sentinel {
                client: Box::new(Mutex::new(client)),
                conn: Mutex::new(None),
            }
        } else if let Some(rest) = cfg.url.strip_prefix("redis+cluster://") {
            let nodes: Vec<redis::ConnectionInfo> = rest
                .split(',')
                .map(|h| format!("redis://{h}").into_connection_info().map(with_auth))
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes);
            if tls_ca.is_some() {
                builder = builder.certs(certs());
            }
            let client = builder
                .response_timeout(cfg.op_timeout)
                .connection_timeout(cfg.op_timeout)
                .build()
                .map_err(unavailable)?;
            let conn = tokio::time::timeout(cfg.op_timeout, client.get_async_connection())
                .await
                .map_err(|_| unavailable("cluster connection timed out"))?
                .map_err(unavailable)?;
            Backend::Cluster(conn)
        } else {
            let info = with_auth(
                cfg.url
                    .as_str()
                    .into_connection_info()
                    .map_err(unavailable)?,
            );
            let client = if tls_ca.is_some() {
                redis::Client::build_with_tls(info, certs()).map_err(unavailable)?
            } else {
                redis::Client::open(info).map_err(unavailable)?
            };
            let mc = ConnectionManagerConfig::new()
                .set_response_timeout(Some(cfg.op_timeout))
                .set_connection_timeout(Some(cfg.op_timeout))
                .set_number_of_retries(2);
            let conn = tokio::time::timeout(
                cfg.op_timeout,
                ConnectionManager::new_with_config(client, mc),
            )
            .await
            .map_err(|_| unavailable("connection timed out"))?
            .map_err(unavailable)?;
            Backend::Single(conn)
        };
        let store = Self {
            backend,
            prefix: cfg.key_prefix.clone(),
            durability: cfg.durability.clone(),
            op_timeout: cfg.op_timeout,
        };
        // Fail at start-up, not at the first request, on a wrong password or address.
        store.ping().await?;
        store.check_durability().await?;
        Ok(store)
    }

    /// Refuses to start on a Redis that would lose acknowledged leases in a crash.
    async fn check_durability(&self) -> Result<(), StoreError> {
        let Durability::Aof { verify: true } = self.durability else {
            return Ok(());
        };
        let mut c = self.conn().await?;
        let get = |param: &'static str| {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg(param);
            cmd
        };
        let aof: Vec<String> = get("appendonly")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let fsync: Vec<String> = get("appendfsync")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        if aof.get(1).map(String::as_str) != Some("yes")
            || fsync.get(1).map(String::as_str) != Some("always")
        {
            return Err(StoreError::Unavailable(format!(
                "redis durability \"aof\" needs appendonly yes and appendfsync always; server has appendonly={:?} appendfsync={:?}",
                aof.get(1),
                fsync.get(1)
            )));
        }
        Ok(())
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        match &self.backend {
            Backend::Single(c) => Ok(Conn::Manager(c.clone())),
            Backend::Cluster(c) => Ok(Conn::Cluster(c.clone())),
            Backend::Sentinel { client, conn } => {
                let mut slot = conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Mux(c.clone()));
                }
                let mut cl = client.lock().await;
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(self.op_timeout))
                    .set_connection_timeout(Some(self.op_timeout));
                let c = tokio::time::timeout(
                    self.op_timeout,
                    cl.get_async_connection_with_config(&cfg),
                )
                .await
                .map_err(|_| unavailable("sentinel: no master reachable in time"))?
                .map_err(unavailable)?;
                *slot = Some(c.clone());
                Ok(Conn::Mux(c))
            }
        }
    }

    /// After an error on a sentinel-managed connection, ask the sentinels again next time
    /// (the master may have changed).
    async fn forget_connection(&self) {
        if let Backend::Sentinel { conn, .. } = &self.backend {
            *conn.lock().await = None;
        }
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{{{}}}:{kind}:{id}", self.prefix)
    }

    fn index(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.prefix)
    }

    /// Runs `f` with a connection, bounded by the op timeout; errors fail closed.
    async fn with<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let c = self.conn().await?;
        match tokio::time::timeout(self.op_timeout, f(c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.forget_connection().await;
                Err(unavailable(e))
            }
            Err(_) => {
                self.forget_connection().await;
                Err(unavailable(format!(
                    "operation timed out after {:?}",
                    self.op_timeout
                )))
            }
        }
    }

    /// Makes a completed write durable per the configured mode.
    async fn durable(&self) -> Result<(), StoreError> {
        let Durability::Wait { replicas, timeout } = self.durability else {
            return Ok(());
        };
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let acked: i64 = self
            .with(|mut c| async move {
                redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(millis)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if acked < i64::from(replicas) {
            return Err(StoreError::Unavailable(format!(
                "redis write acknowledged by {acked} of {replicas} required replicas"
            )));
        }
        Ok(())
    }

    async fn get_str(&self, key: String) -> Result<Option<String>, StoreError> {
        self.with(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    async fn mget<T: serde::de::DeserializeOwned>(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<T>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = self
            .with(|mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
            .await?;
        raw.into_iter().flatten().map(|s| decode(&s)).collect()
    }

    async fn cas(
        &self,
        key: String,
        old: String,
        new: String,
        due: String,
        id: String,
        moved: (String, String),
    ) -> Result<bool, StoreError> {
        let due_key = self.index("due");
        let counts = self.index("counts");
        let done: i64 = self
            .with(|mut c| async move {
                CAS.key(key)
                    .key(due_key)
                    .key(counts)
                    .arg(old)
                    .arg(new)
                    .arg(due)
                    .arg(id)
                    .arg(moved.0)
                    .arg(moved.1)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(done == 1)
    }

    /// Ids from a lexicographic index, after `after`, in batches.
    async fn ids_after(
        &self,
        index: String,
        after: Option<String>,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        let start = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        self.with(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(index)
                .arg(start)
                .arg("+")
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(0)
                .arg(count)
                .query_async(&mut c)
                .await
        })
        .await
    }
}

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

const SCAN_BATCH: usize = 500;

#[async_trait]
impl LeaseStore for RedisStore {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError> {
        let json = encode(task)?;
        let keys = (
            self.key("task", task.id.as_str()),
            self.index("tasks"),
            self.key("ch", task.parent.as_ref().map_or("", TaskId::as_str)),
        );
        let (id, has_parent) = (
            task.id.to_string(),
            if task.parent.is_some() { "1" } else { "0" },
        );
        let created: i64 = self
            .with(|mut c| async move {
                CREATE_TASK
                    .key(keys.0)
                    .key(keys.1)
                    .key(keys.2)
                    .arg(json)
                    .arg(id)
                    .arg(has_parent)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if created == 0 {
            return Err(StoreError::AlreadyExists(task.id.to_string()));
        }
        self.durable().await
    }

    async fn task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        self.get_str(self.key("task", id.as_str()))
            .await?
            .map(|s| decode(&s))
            .transpose()
    }

    async fn tasks(&self, q: &TaskQuery) -> Result<Page<Task>, StoreError> {
        let mut items: Vec<Task> = Vec::new();
        let mut cursor = q.after.as_ref().map(ToString::to_string);
        loop {
            let ids = self
                .ids_after(self.index("tasks"), cursor.clone(), SCAN_BATCH)
                .await?;
            let Some(last) = ids.last().cloned() else {
                return Ok(Page { items, next: None });
            };
            let keys = ids.iter().map(|i| self.key("task", i)).collect();
            for t in self.mget::<Task>(keys).await? {
                if task_matches(&t, q) {
                    if items.len() == q.limit {
                        let next = items.last().map(|t| t.id.to_string());
                        return Ok(Page { items, next });
                    }
                    items.push(t);
                }
            }
            cursor = Some(last);
        }
    }

    async fn end_task(
        &self,
        id: &TaskId,
        to: TaskState,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<Task, StoreError> {
        let key = self.key("task", id.as_str());
        for _ in 0..CAS_RETRIES {
            let Some(old) = self.get_str(key.clone()).await? else {
                return Err(StoreError::NotFound(id.to_string()));
            };
            let mut task: Task = decode(&old)?;
            if task.state == to {
                return Ok(task);
            }
            if task.state != TaskState::Active {
                return Err(StoreError::TaskEnded {
                    id: id.to_string(),
                    current: task.state,
                    to,
                });
            }
            task.state = to;
            task.ended_at = Some(at);
            task.end_reason = Some(reason.to_string());
            if self
                .cas(
                    key.clone(),
                    old,
                    encode(&task)?,
                    "keep".into(),
                    id.to_string(),
                    (String::new(), String::new()),
                )
                .await?
            {
                self.durable().await?;
                return Ok(task);
            }
        }
        Err(StoreError::Unavailable(format!(
            "task {id}: too much contention"
        )))
    }

    async fn children(&self, id: &TaskId) -> Result<Vec<TaskId>, StoreError> {
        let key = self.key("ch", id.as_str());
        let mut ids: Vec<String> = self
            .with(|mut c| async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await })
            .await?;
        ids.sort();
        ids.iter()
            .map(|s| {
                s.parse()
                    .map_err(|_| StoreError::Corrupt(format!("child id {s}")))
            })
            .collect()
    }

    async fn put_new(&self, lease: &Lease, due_at: OffsetDateTime) -> Result<(), StoreError> {
        let json = encode(lease)?;
        let keys = (
            self.key("lease", lease.id.as_str()),
            self.key("tl", lease.task_id.as_str()),
            self.index("leases"),
            self.index("due"),
            self.index("counts"),
        );
        let id = lease.id.to_string();
        let due = ms(due_at);
        let field = super::count_key(lease.provider, lease.state);
        let created: i64 = self
            .with(|mut c| async move {
                PUT_NEW
                    .key(keys.0)
                    .key(keys.1)
                    .key(keys.2)
                    .key(keys.3)
                    .key(keys.4)
                    .arg(json)
                    .arg(id)
                    .arg(due)
                    .arg(field)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if created == 0 {
            return Err(StoreError::AlreadyExists(lease.id.to_string()));
        }
        self.durable().await
    }

    async fn lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
        self.get_str(self.key("lease", id.as_str()))
            .await?
            .map(|s| decode(&s))
            .transpose()
    }

    async fn leases(&self, q: &LeaseQuery) -> Result<Page<Lease>, StoreError> {
        let mut items: Vec<Lease> = Vec::new();
        let push = |items: &mut Vec<Lease>, l: Lease| -> Option<Page<Lease>> {
            if q.after.as_ref().is_some_and(|a| l.id <= *a) || !lease_matches(&l, q) {
                return None;
            }
            if items.len() == q.limit {
                let next = items.last().map(|l| l.id.to_string());
                return Some(Page {
                    items: std::mem::take(items),
                    next,
                });
            }
            items.push(l);
            None
        };
        if let Some(task) = &q.task {
            let key = self.key("tl", task.as_str());
            let mut ids: Vec<String> =
                self.with(|mut c| async move {
                    redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await
                })
                .await?;
            ids.sort();
            for chunk in ids.chunks(SCAN_BATCH) {
                let keys = chunk.iter().map(|i| self.key("lease", i)).collect();
                for l in self.mget::<Lease>(keys).await? {
                    if let Some(page) = push(&mut items, l) {
                        return Ok(page);
                    }
                }
            }
            return Ok(Page { items, next: None });
        }
        let mut cursor = q.after.as_ref().map(ToString::to_string);
        loop {
            let ids = self
                .ids_after(self.index("leases"), cursor.clone(), SCAN_BATCH)
                .await?;
            let Some(last) = ids.last().cloned() else {
                return Ok(Page { items, next: None });
            };
            let keys = ids.iter().map(|i| self.key("lease", i)).collect();
            for l in self.mget::<Lease>(keys).await? {
                if let Some(page) = push(&mut items, l) {
                    return Ok(page);
                }
            }
            cursor = Some(last);
        }
    }

    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let q = LeaseQuery {
            task: Some(task.clone()),
            limit: usize::MAX,
            ..Default::default()
        };
        Ok(self.leases(&q).await?.items)
    }

    async fn transition(&self, t: Transition) -> Result<Lease, StoreError> {
        let key = self.key("lease", t.lease.as_str());
        for _ in 0..CAS_RETRIES {
            let Some(old) = self.get_str(key.clone()).await? else {
                return Err(StoreError::NotFound(t.lease.to_string()));
            };
            let mut lease: Lease = decode(&old)?;
            let from = super::count_key(lease.provider, lease.state);
            if !apply_transition(&mut lease, &t)? {
                return Ok(lease);
            }
            let moved = (from, super::count_key(lease.provider, lease.state));
            let due = t
                .due_at
                .map_or_else(|| "del".to_string(), |d| ms(d).to_string());
            if self
                .cas(
                    key.clone(),
                    old,
                    encode(&lease)?,
                    due,
                    lease.id.to_string(),
                    moved,
                )
                .await?
            {
                self.durable().await?;
                return Ok(lease);
            }
        }
        Err(StoreError::Unavailable(format!(
            "lease {}: too much contention",
            t.lease
        )))
    }

    async fn claim_due(
        &self,
        now: OffsetDateTime,
        hold_until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let due_key = self.index("due");
        let (now_ms, hold_ms) = (ms(now), ms(hold_until));
        let ids: Vec<String> = self
            .with(|mut c| async move {
                CLAIM
                    .key(due_key)
                    .arg(now_ms)
                    .arg(hold_ms)
                    .arg(limit)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        self.durable().await?;
        let keys = ids.iter().map(|i| self.key("lease", i)).collect();
        self.mget(keys).await
    }

    async fn lease_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let key = self.index("counts");
        let map: std::collections::BTreeMap<String, i64> = self
            .with(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        Ok(map
            .into_iter()
            .map(|(k, v)| (k, u64::try_from(v).unwrap_or(0)))
            .collect())
    }

    async fn due_count(&self, now: OffsetDateTime) -> Result<usize, StoreError> {
        let key = self.index("due");
        let upto = ms(now);
        self.with(|mut c| async move {
            redis::cmd("ZCOUNT")
                .arg(key)
                .arg("-inf")
                .arg(upto)
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn insert_once(&self, key: &str, expires_at: OffsetDateTime) -> Result<bool, StoreError> {
        let key = self.key("once", key);
        // PXAT in the past is an error in Redis; such an entry would be gone at once.
        let at = ms(expires_at).max(ms(OffsetDateTime::now_utc()) + 1);
        let set: Option<String> = self
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
            self.durable().await?;
        }
        Ok(set.is_some())
    }

    async fn set_flag(&self, key: &str, until: OffsetDateTime) -> Result<(), StoreError> {
        let key = self.key("flag", key);
        let at = ms(until);
        if at <= ms(OffsetDateTime::now_utc()) {
            return Ok(());
        }
        let _: i64 = self
            .with(|mut c| async move { SET_FLAG.key(key).arg(at).invoke_async(&mut c).await })
            .await?;
        self.durable().await
    }

    async fn flags(&self, keys: &[String], now: OffsetDateTime) -> Result<Vec<bool>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = keys.iter().map(|k| self.key("flag", k)).collect();
        let raw: Vec<Option<i64>> = self
            .with(|mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
            .await?;
        let now = ms(now);
        Ok(raw
            .into_iter()
            .map(|v| v.is_some_and(|u| u > now))
            .collect())
    }

    async fn observe(&self, obs: &Observation) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .observe_and_read(obs, &ControlRead::default())
            .await?
            .counts)
    }

    async fn observe_and_read(
        &self,
        obs: &Observation,
        read: &ControlRead,
    ) -> Result<Observed, StoreError> {
        let mut inv = OBSERVE.prepare_invoke();
        for w in &obs.windows {
            inv.key(self.key("win", &w.key));
        }
        let risk = obs.risk.as_ref().filter(|_| !obs.risk_keys.is_empty());
        let m = if risk.is_some() {
            obs.risk_keys.len()
        } else {
            0
        };
        for k in obs.risk_keys.iter().take(m) {
            inv.key(self.key("risk", k));
        }
        for k in &read.flags {
            inv.key(self.key("flag", k));
        }
        let r = if read.risk_since.is_some() {
            read.risk_keys.len()
        } else {
            0
        };
        for k in read.risk_keys.iter().take(r) {
            inv.key(self.key("risk", k));
        }
        let keep = u64::try_from(obs.risk_keep.as_millis()).unwrap_or(u64::MAX);
        inv.arg(ms(obs.at))
            .arg(obs.windows.len())
            .arg(m)
            .arg(read.flags.len())
            .arg(r)
            .arg(uuid::Uuid::new_v4().simple().to_string())
            .arg(risk.map(super::risk_payload).unwrap_or_default())
            .arg(keep)
            .arg(read.risk_since.map_or(0, ms));
        for w in &obs.windows {
            let wms = u64::try_from(w.window.as_millis()).unwrap_or(u64::MAX);
            inv.arg(wms)
                .arg(w.threshold)
                .arg(if w.reset { "1" } else { "0" });
        }
        let (counts, flags, flat): (Vec<u64>, Vec<i64>, Vec<String>) = self
            .with(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(Observed {
            counts,
            flags: flags.into_iter().map(|f| f == 1).collect(),
            risk: risk_pairs(&flat)?,
        })
    }

    async fn risk_events(
        &self,
        keys: &[String],
        since: OffsetDateTime,
    ) -> Result<Vec<RiskEvent>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = RISK_READ.prepare_invoke();
        for k in keys {
            inv.key(self.key("risk", k));
        }
        inv.arg(ms(since));
        let flat: Vec<String> = self
            .with(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        risk_pairs(&flat)
    }

    async fn take_token(
        &self,
        key: &str,
        limit: crate::ratelimit::RateLimit,
    ) -> Result<Result<(), Duration>, StoreError> {
        let key = self.key("bucket", key);
        let interval = (1_000_000.0 / limit.per_second).max(1.0).round() as u64;
        let burst = limit.burst.max(1.0).floor() as u64;
        let (ok, wait): (i64, i64) = self
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

    async fn create_approval(&self, a: &Approval, cap: usize) -> Result<bool, StoreError> {
        let json = encode(a)?;
        let keys = (
            self.key("apr", &a.id),
            self.key("aprfp", &a.fingerprint),
            self.key("aprlive", a.requester.as_str()),
            self.index("aprs"),
        );
        let args = (
            a.id.clone(),
            ms(OffsetDateTime::now_utc()),
            ms(a.expires_at),
            ms(a.keep_until),
        );
        let created: i64 = self
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
            self.durable().await?;
        }
        Ok(created == 1)
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.get_str(self.key("apr", id))
            .await?
            .map(|s| decode(&s))
            .transpose()
    }

    async fn approval_for(&self, fingerprint: &str) -> Result<Option<Approval>, StoreError> {
        match self.get_str(self.key("aprfp", fingerprint)).await? {
            Some(id) => self.approval(&id).await,
            None => Ok(None),
        }
    }

    async fn transition_approval(
        &self,
        t: &ApprovalTransition,
    ) -> Result<TransitionOutcome, StoreError> {
        let key = self.key("apr", &t.id);
        for _ in 0..CAS_RETRIES {
            let Some(old) = self.get_str(key.clone()).await? else {
                return Err(StoreError::NotFound(t.id.clone()));
            };
            let current: Approval = decode(&old)?;
            let next = match crate::approval::apply(&current, t) {
                Ok(n) => n,
                Err(c) => return Ok(Err(c)),
            };
            let (k, live_key) = (key.clone(), self.key("aprlive", current.requester.as_str()));
            let (new, live, until, id) = (
                encode(&next)?,
                if next.state.is_live() { "1" } else { "0" },
                ms(next.expires_at),
                next.id.clone(),
            );
            let done: i64 = self
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
                self.durable().await?;
                return Ok(Ok(next));
            }
        }
        Err(StoreError::Unavailable(format!(
            "approval {}: too much contention",
            t.id
        )))
    }

    async fn approvals(
        &self,
        state: Option<ApprovalState>,
        limit: usize,
    ) -> Result<Vec<Approval>, StoreError> {
        let index = self.index("aprs");
        let now = ms(OffsetDateTime::now_utc());
        let ids: Vec<String> = self
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
            let keys = chunk.iter().map(|i| self.key("apr", i)).collect();
            for a in self.mget::<Approval>(keys).await? {
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

    async fn put_anchor(&self, anchor: &AuditAnchor) -> Result<bool, StoreError> {
        let json = encode(anchor)?;
        let keys = (self.key("anchor", &anchor.node), self.index("anchors"));
        let (seq, hash, node) = (anchor.seq, anchor.hash.clone(), anchor.node.clone());
        let stored: i64 = self
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
        self.durable().await?;
        Ok(true)
    }

    async fn anchors(&self) -> Result<Vec<AuditAnchor>, StoreError> {
        let set = self.index("anchors");
        let nodes: Vec<String> = self
            .with(|mut c| async move { redis::cmd("SMEMBERS").arg(set).query_async(&mut c).await })
            .await?;
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            let key = self.key("anchor", &node);
            let json: Option<String> = self
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

    async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = self
            .with(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(unavailable(format!("unexpected PING reply {pong}")))
        }
    }

    async fn deny_add(
        &self,
        set: &str,
        member: &str,
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let keys = (self.key("deny", set), self.key("denyseq", set));
        let (member, until) = (member.to_string(), until.unix_timestamp());
        let _: i64 = self
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
        self.durable().await
    }

    async fn deny_list(
        &self,
        set: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<DenyEntry>, StoreError> {
        let key = self.key("deny", set);
        let all: std::collections::HashMap<String, String> = self
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

    async fn deny_prune(&self, set: &str, now: OffsetDateTime) -> Result<usize, StoreError> {
        let key = self.key("deny", set);
        let now = now.unix_timestamp();
        let n: i64 = self
            .with(|mut c| async move { DENY_PRUNE.key(key).arg(now).invoke_async(&mut c).await })
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn lock_acquire(&self, name: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let keys = (self.key("lock", name), self.key("fence", name));
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let token: u64 = self
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

    async fn lock_holds(&self, name: &str, token: u64) -> Result<bool, StoreError> {
        let key = self.key("lock", name);
        let cur: Option<u64> = self
            .with(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        Ok(cur == Some(token))
    }

    async fn lock_release(&self, name: &str, token: u64) -> Result<(), StoreError> {
        let key = self.key("lock", name);
        let _: i64 = self
            .with(
                |mut c| async move { LOCK_RELEASE.key(key).arg(token).invoke_async(&mut c).await },
            )
            .await?;
        Ok(())
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("durability", &self.durability)
            .finish()
    }
}

/// Exposed for tests that need raw access (fault injection).
pub fn shared(store: RedisStore) -> Arc<dyn LeaseStore> {
    Arc::new(store)
}
