//! `[limits]`: what the broker allows (task and lease lifetimes, delegation depth, page
//! size, rate shares) and what a client may hold at the HTTP edge (bodies, connections,
//! timeouts).

use serde::Deserialize;
use std::time::Duration;

use super::{ConfigError, dur, invalid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_task_ttl: String,
    pub max_lease_ttl: String,
    pub default_lease_ttl: String,
    pub pending_timeout: String,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub handshake_timeout: String,
    pub max_page: usize,
    pub max_delegation_depth: usize,
    pub header_read_timeout: String,
    pub body_read_timeout: String,
    pub idle_timeout: String,
    pub h2_keepalive_interval: String,
    pub h2_keepalive_timeout: String,
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_bytes: u32,
    pub max_connections_per_source: usize,
    pub unauth_rate_per_source: u32,
    pub unauth_burst_per_source: u32,
    /// Fraction of a provider's rate budget one principal may use (0 < share ≤ 1).
    pub principal_rate_share: f64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_task_ttl: "24h".into(),
            max_lease_ttl: "1h".into(),
            default_lease_ttl: "15m".into(),
            pending_timeout: "60s".into(),
            max_body_bytes: 64 * 1024,
            max_connections: 4096,
            max_in_flight: 256,
            handshake_timeout: "10s".into(),
            max_page: 500,
            max_delegation_depth: 3,
            header_read_timeout: "10s".into(),
            body_read_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            h2_keepalive_interval: "20s".into(),
            h2_keepalive_timeout: "10s".into(),
            max_header_bytes: 16 * 1024,
            h2_max_concurrent_streams: 64,
            h2_max_header_list_bytes: 16 * 1024,
            max_connections_per_source: 64,
            unauth_rate_per_source: 20,
            unauth_burst_per_source: 40,
            principal_rate_share: 0.5,
        }
    }
}

/// The broker's limits on tasks, leases and delegation (`[limits]`).
pub use crate::broker::Limits as BrokerLimits;

/// `[limits]`, validated: the broker's part and the server's.
pub(super) struct ServerLimits {
    pub limits: BrokerLimits,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub handshake_timeout: Duration,
    pub edge: EdgeLimits,
}

pub(super) fn server_limits(l: RawLimits) -> Result<ServerLimits, ConfigError> {
    let limits = broker_limits(&l)?;
    if !(1024..=16 * 1024 * 1024).contains(&l.max_body_bytes) {
        return Err(invalid("limits.max_body_bytes", "must be 1 KiB..=16 MiB"));
    }
    if l.max_connections == 0 {
        return Err(invalid("limits.max_connections", "must be positive"));
    }
    if l.max_in_flight == 0 {
        return Err(invalid("limits.max_in_flight", "must be positive"));
    }
    Ok(ServerLimits {
        limits,
        max_body_bytes: l.max_body_bytes,
        max_connections: l.max_connections,
        max_in_flight: l.max_in_flight,
        edge: edge_limits(&l)?,
        handshake_timeout: dur("limits.handshake_timeout", &l.handshake_timeout)?,
    })
}

fn broker_limits(l: &RawLimits) -> Result<BrokerLimits, ConfigError> {
    let limits = BrokerLimits {
        max_task_ttl: dur("limits.max_task_ttl", &l.max_task_ttl)?,
        max_lease_ttl: dur("limits.max_lease_ttl", &l.max_lease_ttl)?,
        default_lease_ttl: dur("limits.default_lease_ttl", &l.default_lease_ttl)?,
        pending_timeout: dur("limits.pending_timeout", &l.pending_timeout)?,
        max_page: l.max_page.clamp(1, 10_000),
        max_delegation_depth: l.max_delegation_depth.min(16),
        principal_rate_share: l.principal_rate_share,
    };
    if !(limits.principal_rate_share > 0.0 && limits.principal_rate_share <= 1.0) {
        return Err(invalid(
            "limits.principal_rate_share",
            "must be > 0 and <= 1",
        ));
    }
    if limits.default_lease_ttl > limits.max_lease_ttl {
        return Err(invalid(
            "limits.default_lease_ttl",
            "exceeds limits.max_lease_ttl",
        ));
    }
    Ok(limits)
}

/// Timeouts and limits of the HTTP edge (`[limits]`): what a slow, idle or flooding
/// client may hold. Every one has a safe default (config/mayfly.full.toml).
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// A request's headers must arrive within this (HTTP/1.1; also closes idle
    /// keep-alive connections that start a request and stall).
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this, before any work is admitted.
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    /// Largest request head (HTTP/1.1 read buffer).
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_bytes: u32,
    /// Connections open at once from one source address; past it new ones are dropped.
    pub max_connections_per_source: usize,
    /// Unauthenticated refusals per second a source may cause before its requests without
    /// a verified client certificate are refused unverified (`unauthenticated_rate_limited`).
    pub unauth_rate_per_source: u32,
    pub unauth_burst_per_source: u32,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        // The documented defaults are valid by construction.
        edge_limits(&RawLimits::default()).unwrap_or_else(|_| unreachable!())
    }
}

fn edge_limits(l: &RawLimits) -> Result<EdgeLimits, ConfigError> {
    let positive = |key: &'static str, s: &str| -> Result<Duration, ConfigError> {
        let d = dur(key, s)?;
        if d.is_zero() {
            return Err(invalid(key, "must be positive"));
        }
        Ok(d)
    };
    // hyper refuses a read buffer under 8 KiB.
    if !(8 * 1024..=1024 * 1024).contains(&l.max_header_bytes) {
        return Err(invalid("limits.max_header_bytes", "must be 8 KiB..=1 MiB"));
    }
    if !(1..=1024).contains(&l.h2_max_concurrent_streams) {
        return Err(invalid(
            "limits.h2_max_concurrent_streams",
            "must be 1..=1024",
        ));
    }
    if !(1024..=1024 * 1024).contains(&l.h2_max_header_list_bytes) {
        return Err(invalid(
            "limits.h2_max_header_list_bytes",
            "must be 1 KiB..=1 MiB",
        ));
    }
    if l.max_connections_per_source == 0 {
        return Err(invalid(
            "limits.max_connections_per_source",
            "must be positive",
        ));
    }
    if l.unauth_rate_per_source == 0 || l.unauth_burst_per_source == 0 {
        return Err(invalid(
            "limits.unauth_rate_per_source",
            "rate and burst must be positive",
        ));
    }
    Ok(EdgeLimits {
        header_read_timeout: positive("limits.header_read_timeout", &l.header_read_timeout)?,
        body_read_timeout: positive("limits.body_read_timeout", &l.body_read_timeout)?,
        idle_timeout: positive("limits.idle_timeout", &l.idle_timeout)?,
        h2_keepalive_interval: positive("limits.h2_keepalive_interval", &l.h2_keepalive_interval)?,
        h2_keepalive_timeout: positive("limits.h2_keepalive_timeout", &l.h2_keepalive_timeout)?,
        max_header_bytes: l.max_header_bytes,
        h2_max_concurrent_streams: l.h2_max_concurrent_streams,
        h2_max_header_list_bytes: l.h2_max_header_list_bytes,
        max_connections_per_source: l.max_connections_per_source,
        unauth_rate_per_source: l.unauth_rate_per_source,
        unauth_burst_per_source: l.unauth_burst_per_source,
    })
}
