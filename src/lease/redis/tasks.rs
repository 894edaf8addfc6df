//! Tasks and leases: records, their indexes, compare-and-set transitions and the
//! reaper's due index.

use redis::Script;
use std::sync::LazyLock;
use time::OffsetDateTime;

use super::{CAS_RETRIES, RedisStore, SCAN_BATCH, decode, encode, ms};
use crate::lease::ending::{self, Ending};
use crate::lease::{
    Lease, LeaseQuery, Page, StoreError, TaskQuery, Transition, apply_transition, lease_matches,
    task_matches,
};
use crate::task::{LeaseId, Task, TaskId, TaskState};

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

impl RedisStore {
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

pub(super) async fn create_task(store: &RedisStore, task: &Task) -> Result<(), StoreError> {
    let json = encode(task)?;
    let keys = (
        store.key("task", task.id.as_str()),
        store.index("tasks"),
        store.key("ch", task.parent.as_ref().map_or("", TaskId::as_str)),
    );
    let (id, has_parent) = (
        task.id.to_string(),
        if task.parent.is_some() { "1" } else { "0" },
    );
    let created: i64 = store
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
    store.durable().await
}

pub(super) async fn task(store: &RedisStore, id: &TaskId) -> Result<Option<Task>, StoreError> {
    store
        .get_str(store.key("task", id.as_str()))
        .await?
        .map(|s| decode(&s))
        .transpose()
}

pub(super) async fn tasks(store: &RedisStore, q: &TaskQuery) -> Result<Page<Task>, StoreError> {
    let mut items: Vec<Task> = Vec::new();
    let mut cursor = q.after.as_ref().map(ToString::to_string);
    loop {
        let ids = store
            .ids_after(store.index("tasks"), cursor.clone(), SCAN_BATCH)
            .await?;
        let Some(last) = ids.last().cloned() else {
            return Ok(Page { items, next: None });
        };
        let keys = ids.iter().map(|i| store.key("task", i)).collect();
        for t in store.mget::<Task>(keys).await? {
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

pub(super) async fn end_task(
    store: &RedisStore,
    id: &TaskId,
    to: TaskState,
    reason: &str,
    at: OffsetDateTime,
) -> Result<Task, StoreError> {
    let key = store.key("task", id.as_str());
    for _ in 0..CAS_RETRIES {
        let Some(old) = store.get_str(key.clone()).await? else {
            return Err(StoreError::NotFound(id.to_string()));
        };
        let task = match ending::end(decode(&old)?, to, reason, at)? {
            Ending::Unchanged(task) => return Ok(task),
            Ending::Ended(task) => task,
        };
        if store
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
            store.durable().await?;
            return Ok(task);
        }
    }
    Err(StoreError::Unavailable(format!(
        "task {id}: too much contention"
    )))
}

pub(super) async fn children(store: &RedisStore, id: &TaskId) -> Result<Vec<TaskId>, StoreError> {
    let key = store.key("ch", id.as_str());
    let mut ids: Vec<String> = store
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

pub(super) async fn put_new(
    store: &RedisStore,
    lease: &Lease,
    due_at: OffsetDateTime,
) -> Result<(), StoreError> {
    let json = encode(lease)?;
    let keys = (
        store.key("lease", lease.id.as_str()),
        store.key("tl", lease.task_id.as_str()),
        store.index("leases"),
        store.index("due"),
        store.index("counts"),
    );
    let id = lease.id.to_string();
    let due = ms(due_at);
    let field = crate::lease::count_key(lease.provider, lease.state);
    let created: i64 = store
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
    store.durable().await
}

pub(super) async fn lease(store: &RedisStore, id: &LeaseId) -> Result<Option<Lease>, StoreError> {
    store
        .get_str(store.key("lease", id.as_str()))
        .await?
        .map(|s| decode(&s))
        .transpose()
}

pub(super) async fn leases(store: &RedisStore, q: &LeaseQuery) -> Result<Page<Lease>, StoreError> {
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
        let key = store.key("tl", task.as_str());
        let mut ids: Vec<String> = store
            .with(|mut c| async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await })
            .await?;
        ids.sort();
        for chunk in ids.chunks(SCAN_BATCH) {
            let keys = chunk.iter().map(|i| store.key("lease", i)).collect();
            for l in store.mget::<Lease>(keys).await? {
                if let Some(page) = push(&mut items, l) {
                    return Ok(page);
                }
            }
        }
        return Ok(Page { items, next: None });
    }
    let mut cursor = q.after.as_ref().map(ToString::to_string);
    loop {
        let ids = store
            .ids_after(store.index("leases"), cursor.clone(), SCAN_BATCH)
            .await?;
        let Some(last) = ids.last().cloned() else {
            return Ok(Page { items, next: None });
        };
        let keys = ids.iter().map(|i| store.key("lease", i)).collect();
        for l in store.mget::<Lease>(keys).await? {
            if let Some(page) = push(&mut items, l) {
                return Ok(page);
            }
        }
        cursor = Some(last);
    }
}

pub(super) async fn transition(store: &RedisStore, t: Transition) -> Result<Lease, StoreError> {
    let key = store.key("lease", t.lease.as_str());
    for _ in 0..CAS_RETRIES {
        let Some(old) = store.get_str(key.clone()).await? else {
            return Err(StoreError::NotFound(t.lease.to_string()));
        };
        let mut lease: Lease = decode(&old)?;
        let from = crate::lease::count_key(lease.provider, lease.state);
        if !apply_transition(&mut lease, &t)? {
            return Ok(lease);
        }
        let moved = (from, crate::lease::count_key(lease.provider, lease.state));
        let due = t
            .due_at
            .map_or_else(|| "del".to_string(), |d| ms(d).to_string());
        if store
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
            store.durable().await?;
            return Ok(lease);
        }
    }
    Err(StoreError::Unavailable(format!(
        "lease {}: too much contention",
        t.lease
    )))
}

pub(super) async fn claim_due(
    store: &RedisStore,
    now: OffsetDateTime,
    hold_until: OffsetDateTime,
    limit: usize,
) -> Result<Vec<Lease>, StoreError> {
    let due_key = store.index("due");
    let (now_ms, hold_ms) = (ms(now), ms(hold_until));
    let ids: Vec<String> = store
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
    store.durable().await?;
    let keys = ids.iter().map(|i| store.key("lease", i)).collect();
    store.mget(keys).await
}

pub(super) async fn lease_counts(store: &RedisStore) -> Result<Vec<(String, u64)>, StoreError> {
    let key = store.index("counts");
    let map: std::collections::BTreeMap<String, i64> = store
        .with(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
        .await?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, u64::try_from(v).unwrap_or(0)))
        .collect())
}

pub(super) async fn due_count(
    store: &RedisStore,
    now: OffsetDateTime,
) -> Result<usize, StoreError> {
    let key = store.index("due");
    let upto = ms(now);
    store
        .with(|mut c| async move {
            redis::cmd("ZCOUNT")
                .arg(key)
                .arg("-inf")
                .arg(upto)
                .query_async(&mut c)
                .await
        })
        .await
}
