//! Connecting (single server, Sentinel, Cluster), running one operation within the
//! timeout, and making a write durable.

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use std::time::Duration;
use tokio::sync::Mutex;

use super::{Durability, RedisConfig, RedisStore, decode, unavailable};
use crate::lease::StoreError;

pub(super) enum Backend {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel {
        client: Box<Mutex<SentinelClient>>,
        conn: Mutex<Option<MultiplexedConnection>>,
    },
}

#[derive(Clone)]
pub(super) enum Conn {
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

/// The credentials and trust a connection needs, read from their files once.
struct Auth {
    username: Option<String>,
    password: Option<String>,
    tls_ca: Option<Vec<u8>>,
}

impl Auth {
    fn read(cfg: &RedisConfig) -> Result<Self, StoreError> {
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
        Ok(Self {
            username: cfg.username.clone(),
            password,
            tls_ca,
        })
    }

    fn certs(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: self.tls_ca.clone(),
        }
    }

    fn apply(&self, info: redis::ConnectionInfo) -> redis::ConnectionInfo {
        let mut settings = info.redis_settings().clone();
        if let Some(pw) = &self.password {
            settings = settings.set_password(pw);
        }
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        info.set_redis_settings(settings)
    }
}

/// `h1:p1,h2:p2/MASTER`: the master is found through the sentinels at first use.
fn sentinel(rest: &str, auth: &Auth) -> Result<Backend, StoreError> {
    let (hosts, master) = rest
        .split_once('/')
        .ok_or_else(|| unavailable("sentinel URL needs /MASTER_NAME"))?;
    let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
    let mut node = SentinelNodeConnectionInfo::default();
    let base = auth.apply(
        "redis://127.0.0.1"
            .into_connection_info()
            .map_err(unavailable)?,
    );
    node = node.set_redis_connection_info(base.redis_settings().clone());
    let client = SentinelClient::build(sentinels, master, Some(node), SentinelServerType::Master)
        .map_err(unavailable)?;
    Ok(Backend::Sentinel {
        client: Box::new(Mutex::new(client)),
        conn: Mutex::new(None),
    })
}

/// `h1:p1,h2:p2`: the seed nodes of a Redis Cluster.
async fn cluster(rest: &str, auth: &Auth, op_timeout: Duration) -> Result<Backend, StoreError> {
    let nodes: Vec<redis::ConnectionInfo> = rest
        .split(',')
        .map(|h| {
            format!("redis://{h}")
                .into_connection_info()
                .map(|i| auth.apply(i))
        })
        .collect::<Result<_, _>>()
        .map_err(unavailable)?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes);
    if auth.tls_ca.is_some() {
        builder = builder.certs(auth.certs());
    }
    let client = builder
        .response_timeout(op_timeout)
        .connection_timeout(op_timeout)
        .build()
        .map_err(unavailable)?;
    let conn = tokio::time::timeout(op_timeout, client.get_async_connection())
        .await
        .map_err(|_| unavailable("cluster connection timed out"))?
        .map_err(unavailable)?;
    Ok(Backend::Cluster(conn))
}

/// One server (`redis://`, `rediss://`), reconnected by the connection manager.
async fn single(url: &str, auth: &Auth, op_timeout: Duration) -> Result<Backend, StoreError> {
    let info = auth.apply(url.into_connection_info().map_err(unavailable)?);
    let client = if auth.tls_ca.is_some() {
        redis::Client::build_with_tls(info, auth.certs()).map_err(unavailable)?
    } else {
        redis::Client::open(info).map_err(unavailable)?
    };
    let mc = ConnectionManagerConfig::new()
        .set_response_timeout(Some(op_timeout))
        .set_connection_timeout(Some(op_timeout))
        .set_number_of_retries(2);
    let conn = tokio::time::timeout(op_timeout, ConnectionManager::new_with_config(client, mc))
        .await
        .map_err(|_| unavailable("connection timed out"))?
        .map_err(unavailable)?;
    Ok(Backend::Single(conn))
}

impl RedisStore {
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let auth = Auth::read(cfg)?;
        let backend = if let Some(rest) = cfg.url.strip_prefix("redis+sentinel://") {
            sentinel(rest, &auth)?
        } else if let Some(rest) = cfg.url.strip_prefix("redis+cluster://") {
            cluster(rest, &auth, cfg.op_timeout).await?
        } else {
            single(&cfg.url, &auth, cfg.op_timeout).await?
        };
        let store = Self {
            backend,
            prefix: cfg.key_prefix.clone(),
            durability: cfg.durability.clone(),
            op_timeout: cfg.op_timeout,
        };
        // Fail at start-up, not at the first request, on a wrong password or address.
        ping(&store).await?;
        store.check_durability().await?;
        Ok(store)
    }

    /// Refuses to start on a Redis that would lose acknowledged leases in a crash.
    pub(super) async fn check_durability(&self) -> Result<(), StoreError> {
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

    pub(super) async fn conn(&self) -> Result<Conn, StoreError> {
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
    pub(super) async fn forget_connection(&self) {
        if let Backend::Sentinel { conn, .. } = &self.backend {
            *conn.lock().await = None;
        }
    }

    /// Runs `f` with a connection, bounded by the op timeout; errors fail closed.
    pub(super) async fn with<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
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
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
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

    pub(super) async fn get_str(&self, key: String) -> Result<Option<String>, StoreError> {
        self.with(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    pub(super) async fn mget<T: serde::de::DeserializeOwned>(
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
}

pub(super) async fn ping(store: &RedisStore) -> Result<(), StoreError> {
    let pong: String = store
        .with(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
        .await?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(unavailable(format!("unexpected PING reply {pong}")))
    }
}
