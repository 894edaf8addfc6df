//! Token buckets: mints beyond a provider's configured rate fail fast with 429 and
//! `Retry-After` instead of queueing into an upstream that throttles (STS allows about
//! 600 requests/s per account and region). The buckets live in the store
//! (`LeaseStore::take_token`): on Redis one GCRA script shared by every replica, so the
//! rate holds globally; this in-memory bucket serves the embedded store (one node).
//! Besides the provider's bucket each principal has its own, a share of it, so one agent
//! cannot starve the others.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `per_second` requests sustained, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            state: Mutex::new((limit.burst, Instant::now())),
        }
    }

    /// Whether the bucket has refilled to its burst (then it decides as a new one would).
    pub fn is_full(&self) -> bool {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = Instant::now().saturating_duration_since(g.1).as_secs_f64();
        g.0 + elapsed * self.limit.per_second >= self.limit.burst
    }

    /// Takes one token, or returns how long until one is available.
    pub fn try_take(&self) -> Result<(), Duration> {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> Result<(), Duration> {
        // A poisoned lock only means another thread panicked mid-update; the pair is
        // still a valid bucket state.
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = *g;
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        let tokens = (tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        if tokens >= 1.0 {
            *g = (tokens - 1.0, now);
            Ok(())
        } else {
            *g = (tokens, now);
            Err(Duration::from_secs_f64(
                (1.0 - tokens) / self.limit.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let b = TokenBucket::new(RateLimit {
            per_second: 10.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.try_take_at(t0).is_ok());
        }
        let wait = b.try_take_at(t0).expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // 100 ms later exactly one token has come back.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.try_take_at(t1).is_ok());
        let wait = b.try_take_at(t1).expect_err("the refilled token is spent");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.try_take_at(t2).is_ok());
        }
        let wait = b.try_take_at(t2).expect_err("refilled to the burst only");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
    }
}
