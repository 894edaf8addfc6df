//! Leases: the durable record of every credential Mayfly mints, written *before* the
//! credential exists upstream (`pending`) so that a crash at any point leaves something
//! the reaper can revoke, or, for a credential that exists only in the broker's memory
//! until returned (a Mayfly-signed JWT), written once as `active` before it is returned.
//! One trait, [`LeaseStore`]; the embedded (redb) implementation lives here.
//!
//! The same trait holds the *control state* every security decision reads, so that a
//! decision made on one replica holds on all of them and across restarts: single-use
//! keys (`insert_once`), expiring flags (`set_flag`/`flags`), sliding windows and risk
//! events (`observe`/`risk_events`). Keys are namespaced by the caller
//! (`jti:bearer:<iss>:<jti>`, `deny:task:<id>`, `w:<rule>:task:<id>`, ...).

pub mod embedded;
mod ending;
pub mod journal;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::str::FromStr;
use time::OffsetDateTime;

use crate::approval::{Approval, ApprovalState, ApprovalTransition, TransitionOutcome};
use crate::identity::Principal;
use crate::task::{LeaseId, ProviderKind, Task, TaskId, TaskState};

pub use journal::{AuditJournal, Joined, JournalSignal, NewLease};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Recorded; the provider may or may not have minted yet.
    Pending,
    /// Minted and handed out.
    Active,
    /// Revocation requested; the reaper retries until the provider confirms.
    Revoking,
    Revoked,
    /// Ended by its TTL.
    Expired,
    /// Every revocation attempt failed; an operator must act (alerted by metric).
    Irrevocable,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Pending => "pending",
            LeaseState::Active => "active",
            LeaseState::Revoking => "revoking",
            LeaseState::Revoked => "revoked",
            LeaseState::Expired => "expired",
            LeaseState::Irrevocable => "irrevocable",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            LeaseState::Revoked | LeaseState::Expired | LeaseState::Irrevocable
        )
    }
}

impl FromStr for LeaseState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "pending" => Self::Pending,
            "active" => Self::Active,
            "revoking" => Self::Revoking,
            "revoked" => Self::Revoked,
            "expired" => Self::Expired,
            "irrevocable" => Self::Irrevocable,
            _ => return Err(()),
        })
    }
}

/// Provider-specific data needed to revoke a credential (e.g. a Vault accessor).
/// Never the credential itself.
pub type RevocationHandle = serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub task_id: TaskId,
    pub principal: Principal,
    pub provider: ProviderKind,
    pub target: String,
    pub actions: BTreeSet<String>,
    pub resources: BTreeSet<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub state: LeaseState,
    pub handle: Option<RevocationHandle>,
    /// Fingerprint of the minted credential, once minted.
    pub fingerprint: Option<String>,
    pub reason: Option<String>,
    /// When the credential stops working on its own even if it was "revoked"
    /// (providers that cannot revoke one by one). `None` when revocation is immediate.
    #[serde(with = "time::serde::rfc3339::option")]
    pub dies_at: Option<OffsetDateTime>,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Lease {
    /// A new `pending` lease for `grant` under `task`, from `issued_at` to `expires_at`.
    pub fn pending(
        task: &TaskId,
        principal: &Principal,
        grant: &crate::task::Grant,
        issued_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Self {
        Self {
            id: LeaseId::generate(),
            task_id: task.clone(),
            principal: principal.clone(),
            provider: grant.provider,
            target: grant.target.clone(),
            actions: grant.actions.clone(),
            resources: grant.resources.clone(),
            issued_at,
            expires_at,
            state: LeaseState::Pending,
            handle: None,
            fingerprint: None,
            reason: None,
            dies_at: None,
            attempts: 0,
            updated_at: issued_at,
        }
    }

    /// Active and inside its lifetime at `now`.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.state == LeaseState::Active && now < self.expires_at
    }

    /// A lease minted in process, recorded once already `active` (see
    /// `Broker::mint_in_process`): only a `pending` lease not yet written can become one.
    pub fn activate(
        &mut self,
        fingerprint: String,
        handle: Option<RevocationHandle>,
    ) -> Result<(), StoreError> {
        if self.state != LeaseState::Pending {
            return Err(StoreError::InvalidTransition {
                id: self.id.to_string(),
                current: self.state,
                to: LeaseState::Active,
            });
        }
        self.state = LeaseState::Active;
        self.fingerprint = Some(fingerprint);
        self.handle = handle;
        Ok(())
    }

    /// Applies a checked transition (the rule every store shares). `Ok(false)` when the
    /// lease is already in the target state (idempotent no-op).
    pub fn apply(&mut self, t: &Transition) -> Result<bool, StoreError> {
        if self.state == t.to && !t.from.contains(&self.state) {
            return Ok(false);
        }
        if !t.from.contains(&self.state) {
            return Err(StoreError::InvalidTransition {
                id: self.id.to_string(),
                current: self.state,
                to: t.to,
            });
        }
        self.state = t.to;
        self.updated_at = t.at;
        if let Some(r) = &t.reason {
            self.reason = Some(r.clone());
        }
        if let Some(h) = &t.handle {
            self.handle = Some(h.clone());
        }
        if let Some(f) = &t.fingerprint {
            self.fingerprint = Some(f.clone());
        }
        if t.dies_at.is_some() {
            self.dies_at = t.dies_at;
        }
        if t.count_attempt {
            self.attempts = self.attempts.saturating_add(1);
        }
        Ok(true)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("record {0} already exists")]
    AlreadyExists(String),
    #[error("no such record {0}")]
    NotFound(String),
    #[error("lease {id} is {current:?}, cannot move to {to:?}")]
    InvalidTransition {
        id: String,
        current: LeaseState,
        to: LeaseState,
    },
    #[error("task {id} is {current:?}, cannot end it as {to:?}")]
    TaskEnded {
        id: String,
        current: TaskState,
        to: TaskState,
    },
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
    #[error("lease store record is corrupt: {0}")]
    Corrupt(String),
}

impl From<crate::task::TaskEndError> for StoreError {
    fn from(e: crate::task::TaskEndError) -> Self {
        StoreError::TaskEnded {
            id: e.id.to_string(),
            current: e.current,
            to: e.to,
        }
    }
}

/// A state change checked against the current state. Moving to the state the lease is
/// already in succeeds without change (revocation is idempotent).
#[derive(Debug, Clone)]
pub struct Transition {
    pub lease: LeaseId,
    pub from: &'static [LeaseState],
    pub to: LeaseState,
    pub at: OffsetDateTime,
    pub reason: Option<String>,
    pub handle: Option<RevocationHandle>,
    pub fingerprint: Option<String>,
    pub dies_at: Option<OffsetDateTime>,
    /// When the reaper must next look at the lease; `None` removes it from the due index.
    pub due_at: Option<OffsetDateTime>,
    pub count_attempt: bool,
}

impl Transition {
    pub fn new(
        lease: LeaseId,
        from: &'static [LeaseState],
        to: LeaseState,
        at: OffsetDateTime,
    ) -> Self {
        Self {
            lease,
            from,
            to,
            at,
            reason: None,
            handle: None,
            fingerprint: None,
            dies_at: None,
            due_at: None,
            count_attempt: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LeaseQuery {
    pub task: Option<TaskId>,
    pub principal: Option<String>,
    pub provider: Option<ProviderKind>,
    pub state: Option<LeaseState>,
    /// Return leases with ids strictly after this one (pagination cursor).
    pub after: Option<LeaseId>,
    pub limit: usize,
}

#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub principal: Option<String>,
    /// Matched against the state at `now` (an overdue active task is expired).
    pub state: Option<TaskState>,
    pub after: Option<TaskId>,
    pub limit: usize,
    pub now: Option<OffsetDateTime>,
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Cursor for the next page, if there may be one.
    pub next: Option<String>,
}

/// One entry of a deny set (see [`LeaseStore::deny_add`]): `member` must stay denied
/// until `until`; `seq` is the order in which members were first added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyEntry {
    pub member: String,
    pub until: OffsetDateTime,
    pub seq: u64,
}

/// The head of one replica's audit chain, published off-host so that a truncated or
/// rewritten tail of its log is detected (`mayfly audit verify --anchors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    pub node: String,
    pub seq: u64,
    pub hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Whether a stored anchor may be replaced by `new`: anchors only move forward.
pub(crate) fn anchor_advances(stored: Option<&AuditAnchor>, new: &AuditAnchor) -> bool {
    stored.is_none_or(|s| new.seq > s.seq || (new.seq == s.seq && new.hash == s.hash))
}

/// One sliding-window count to update: one event at the observation's time, counted
/// over the last `window`; when the count reaches `threshold` and `reset` is set, the
/// window starts over (the event that fired is the last one counted).
#[derive(Debug, Clone)]
pub struct WindowHit {
    pub key: String,
    pub window: std::time::Duration,
    pub threshold: u64,
    pub reset: bool,
}

/// A signal that raises the risk of some subjects while it is recent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskEvent {
    pub at: OffsetDateTime,
    pub weight: u32,
    /// The signal's name as policies see it (`out_of_scope`, `external:edr`, ...).
    pub name: String,
}

/// Everything one request changes in the control state, applied in one step (one Lua
/// script round trip on Redis): window counts and, optionally, one risk event recorded
/// under each of `risk_keys`, kept for `risk_keep`.
#[derive(Debug, Clone)]
pub struct Observation {
    pub at: OffsetDateTime,
    pub windows: Vec<WindowHit>,
    pub risk: Option<RiskEvent>,
    pub risk_keys: Vec<String>,
    pub risk_keep: std::time::Duration,
}

/// Control state read in the same step as an observation.
#[derive(Debug, Clone, Default)]
pub struct ControlRead {
    /// Flags whose state at the observation's time is read.
    pub flags: Vec<String>,
    /// Risk events under these keys, at or after `risk_since`, are read.
    pub risk_keys: Vec<String>,
    pub risk_since: Option<OffsetDateTime>,
}

/// What `observe_and_read` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub counts: Vec<u64>,
    pub flags: Vec<bool>,
    pub risk: Vec<RiskEvent>,
}

/// A write a request will make soon: counted while held (`LeaseStore::expect_write`).
#[derive(Debug, Default)]
pub struct WriteIntent(Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>);

impl WriteIntent {
    pub(crate) fn counted(on: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        on.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(Some(on.clone()))
    }
}

impl Drop for WriteIntent {
    fn drop(&mut self) {
        if let Some(on) = self.0.take() {
            on.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Durable storage of tasks and leases. Every method is atomic; transitions are checked
/// against the current state inside the same transaction.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    async fn create_task(&self, task: &Task) -> Result<(), StoreError>;
    async fn task(&self, id: &TaskId) -> Result<Option<Task>, StoreError>;
    async fn tasks(&self, query: &TaskQuery) -> Result<Page<Task>, StoreError>;
    /// Ends an active task. Ending it again with the same state is a no-op returning it.
    async fn end_task(
        &self,
        id: &TaskId,
        to: TaskState,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<Task, StoreError>;
    async fn children(&self, id: &TaskId) -> Result<Vec<TaskId>, StoreError>;

    /// Records a new lease in the state it carries: `pending` (due for the reaper at
    /// `due_at` if never activated), or `active` for a credential minted in process and
    /// not yet returned (due at its expiry).
    async fn put_new(&self, lease: &Lease, due_at: OffsetDateTime) -> Result<(), StoreError>;
    /// `put_new` and `insert_once(once)` as one: `Ok(false)`, and nothing written, when
    /// `once` is already present and unexpired (a replayed proof). This default makes
    /// two writes, the single-use key first; a store that can makes them one (the
    /// embedded store: one transaction, one fsync).
    async fn put_new_once(
        &self,
        lease: &Lease,
        due_at: OffsetDateTime,
        once: &crate::identity::OnceKey,
    ) -> Result<bool, StoreError> {
        if !self.insert_once(&once.key, once.until).await? {
            return Ok(false);
        }
        self.put_new(lease, due_at).await?;
        Ok(true)
    }
    async fn lease(&self, id: &LeaseId) -> Result<Option<Lease>, StoreError>;
    async fn leases(&self, query: &LeaseQuery) -> Result<Page<Lease>, StoreError>;
    /// Every lease of `task`, whatever its state.
    async fn task_leases(&self, task: &TaskId) -> Result<Vec<Lease>, StoreError> {
        let q = LeaseQuery {
            task: Some(task.clone()),
            limit: usize::MAX,
            ..Default::default()
        };
        Ok(self.leases(&q).await?.items)
    }
    async fn transition(&self, t: Transition) -> Result<Lease, StoreError>;
    /// Claims up to `limit` leases due at `now`: their due time moves to `hold_until`, so
    /// a claimant that dies leaves them to be claimed again afterwards.
    async fn claim_due(
        &self,
        now: OffsetDateTime,
        hold_until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError>;
    /// Leases by `provider/state` (kept by every transition, O(1) to read).
    async fn lease_counts(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Number of leases in the due index with a due time at or before `now`.
    async fn due_count(&self, now: OffsetDateTime) -> Result<usize, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    /// Says a request has started that will write soon (its audit record's commit), so
    /// a store that groups writes can wait for it when many are coming. Dropping the
    /// intent says the write was queued, or will not come. Stores that do not group
    /// writes ignore it.
    fn expect_write(&self) -> WriteIntent {
        WriteIntent::default()
    }

    /// Publishes `anchor` as its node's audit chain head. Anchors only move forward:
    /// `Ok(false)` (nothing stored) when the stored anchor has a higher seq, or the same
    /// seq with another hash — the node's log went back, which is what anchors detect.
    async fn put_anchor(&self, anchor: &AuditAnchor) -> Result<bool, StoreError>;
    /// The latest anchor of every node.
    async fn anchors(&self) -> Result<Vec<AuditAnchor>, StoreError>;

    // --- Deny sets and role locks (provider revocation state shared by every replica) ---

    /// Adds `member` to the deny set `set` until `until`, durably. Adding it again keeps
    /// its place in the set's order and extends `until` if the new one is later.
    async fn deny_add(
        &self,
        set: &str,
        member: &str,
        until: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// The members of `set` still denied at `now` (`until > now`), in the order they
    /// were first added.
    async fn deny_list(&self, set: &str, now: OffsetDateTime)
    -> Result<Vec<DenyEntry>, StoreError>;
    /// Drops the members of `set` whose `until` is at or before `now`; returns how many.
    async fn deny_prune(&self, set: &str, now: OffsetDateTime) -> Result<usize, StoreError>;
    /// Takes the lock `name` for `ttl` if no one holds it. Returns a fencing token, larger
    /// than every token issued for `name` before, or `None` when the lock is held.
    async fn lock_acquire(
        &self,
        name: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError>;
    /// Whether `token` still holds the lock `name` (it was not released, did not lapse,
    /// and no later holder took it).
    async fn lock_holds(&self, name: &str, token: u64) -> Result<bool, StoreError>;
    /// Releases the lock `name` if `token` still holds it.
    async fn lock_release(&self, name: &str, token: u64) -> Result<(), StoreError>;

    // Control state.

    /// Inserts `key` unless it is present and unexpired: `true` when inserted now,
    /// `false` when it was already there. The entry lives until `expires_at` (then it
    /// is purged). Atomic across replicas (Redis `SET NX PXAT`), durable on both backends.
    async fn insert_once(&self, key: &str, expires_at: OffsetDateTime) -> Result<bool, StoreError>;
    /// The 32-byte secret named `name` that every replica on this store shares: the
    /// first caller's `candidate` is kept (insert-if-absent), and every later call, on
    /// any replica and after restarts, returns that one. Never expires.
    async fn shared_secret(&self, name: &str, candidate: [u8; 32]) -> Result<[u8; 32], StoreError>;
    /// Sets the flag `key` until `until`; an existing later expiry is kept.
    async fn set_flag(&self, key: &str, until: OffsetDateTime) -> Result<(), StoreError>;
    /// For each of `keys`, whether its flag is set at `now`.
    async fn flags(&self, keys: &[String], now: OffsetDateTime) -> Result<Vec<bool>, StoreError>;
    /// Applies an observation; returns each window's count including this event (before
    /// any reset), in the order of `obs.windows`.
    async fn observe(&self, obs: &Observation) -> Result<Vec<u64>, StoreError>;
    /// Risk events recorded under any of `keys` at or after `since`.
    async fn risk_events(
        &self,
        keys: &[String],
        since: OffsetDateTime,
    ) -> Result<Vec<RiskEvent>, StoreError>;
    /// `observe`, then the reads of `read`, as one step: one script round trip on Redis
    /// (the request path's quota, deny flag and risk). The default runs them in turn.
    async fn observe_and_read(
        &self,
        obs: &Observation,
        read: &ControlRead,
    ) -> Result<Observed, StoreError> {
        let counts = self.observe(obs).await?;
        let flags = self.flags(&read.flags, obs.at).await?;
        let risk = match read.risk_since {
            Some(since) => self.risk_events(&read.risk_keys, since).await?,
            None => Vec::new(),
        };
        Ok(Observed {
            counts,
            flags,
            risk,
        })
    }

    /// Takes one token from the bucket `key` (GCRA: `limit.per_second` sustained, bursts
    /// of `limit.burst`), or says how long until one is free. On Redis one script on the
    /// server's clock, so the budget is global across replicas; in memory on the embedded
    /// store (one node).
    async fn take_token(
        &self,
        key: &str,
        limit: crate::ratelimit::RateLimit,
    ) -> Result<Result<(), std::time::Duration>, StoreError>;

    /// Records a new approval unless its requester already holds `cap` live ones
    /// (`false`). It is findable by id and by fingerprint until `keep_until`.
    async fn create_approval(&self, a: &Approval, cap: usize) -> Result<bool, StoreError>;
    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError>;
    /// The latest approval made for this request fingerprint.
    async fn approval_for(&self, fingerprint: &str) -> Result<Option<Approval>, StoreError>;
    /// Compare-and-set: `Ok(Ok(new))` when applied, `Ok(Err(current))` when the approval
    /// is no longer in `t.from` (or has expired). Exactly one of concurrent callers wins.
    async fn transition_approval(
        &self,
        t: &ApprovalTransition,
    ) -> Result<TransitionOutcome, StoreError>;
    /// Approvals (in `state`, if given), oldest first, at most `limit`.
    async fn approvals(
        &self,
        state: Option<ApprovalState>,
        limit: usize,
    ) -> Result<Vec<Approval>, StoreError>;
}

/// The stored form of a risk event's payload: `weight|name|unique`.
pub(crate) fn risk_payload(e: &RiskEvent) -> String {
    format!("{}|{}|{}", e.weight, e.name, uuid::Uuid::new_v4().simple())
}

pub(crate) fn parse_risk_payload(at: OffsetDateTime, s: &str) -> Result<RiskEvent, StoreError> {
    let Some((w, (name, _))) = s
        .split_once('|')
        .and_then(|(w, rest)| Some((w, rest.rsplit_once('|')?)))
    else {
        return Err(StoreError::Corrupt(format!("risk event {s:?}")));
    };
    Ok(RiskEvent {
        at,
        weight: w
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("risk weight {w:?}")))?,
        name: name.to_string(),
    })
}

/// Applies a checked transition to a lease value (shared by every store implementation).
/// Returns `Ok(false)` when the lease is already in the target state (idempotent no-op).
pub(crate) fn apply_transition(lease: &mut Lease, t: &Transition) -> Result<bool, StoreError> {
    lease.apply(t)
}

/// The `provider/state` key of the per-state lease counts.
pub(crate) fn count_key(provider: crate::task::ProviderKind, state: LeaseState) -> String {
    format!("{provider}/{}", state.as_str())
}

pub(crate) fn lease_matches(l: &Lease, q: &LeaseQuery) -> bool {
    q.task.as_ref().is_none_or(|t| &l.task_id == t)
        && q.principal
            .as_deref()
            .is_none_or(|p| l.principal.as_str() == p)
        && q.provider.is_none_or(|p| l.provider == p)
        && q.state.is_none_or(|s| l.state == s)
}

pub(crate) fn task_matches(t: &Task, q: &TaskQuery) -> bool {
    let now = q.now.unwrap_or_else(OffsetDateTime::now_utc);
    q.principal.as_deref().is_none_or(|p| t.owner.as_str() == p)
        && q.state.is_none_or(|s| t.state_at(now) == s)
}
