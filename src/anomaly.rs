//! Behaviour-aware control: the broker reports what it sees (requests, refusals, posture
//! changes, external signals); rules count them per task (or per principal) in a sliding
//! window and, at a threshold, act: record, deny, revoke the task tree or everything of
//! the principal. Each rule can run in `audit` mode (record what it would have done)
//! before `enforce`. Recent signals also raise a risk score that Cedar policies read.
//!
//! State lives in the lease store (`LeaseStore::observe`, `flags`, `risk_events`), so
//! every replica counts the same windows, reads the same risk and honours the same deny
//! flags: on Redis at once, atomically, one script round trip per observation; on the
//! embedded store risk events and deny flags are durable (redb) and the short windows are
//! in memory. Each rule counts per task *and* per principal, so declaring fresh tasks
//! does not reset a principal's count. Every entry expires on its own; nothing is ever
//! cleared wholesale. Per-principal quotas bound how many tasks and requests one agent
//! may make in a window, so it cannot exhaust shared capacity.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use crate::identity::Principal;
use crate::lease::{ControlRead, LeaseStore, Observation, RiskEvent, StoreError, WindowHit};
use crate::task::TaskId;

/// What the broker observed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// Any credential request (rate rules count these).
    Request,
    OutOfScope,
    PolicyDenied,
    PostureChange,
    EndedTaskUse,
    DelegationWider,
    /// From `POST /v1/signals`.
    External {
        kind: String,
        severity: Severity,
    },
}

impl Signal {
    pub fn name(&self) -> &str {
        match self {
            Signal::Request => "request",
            Signal::OutOfScope => "out_of_scope",
            Signal::PolicyDenied => "policy_denied",
            Signal::PostureChange => "posture_change",
            Signal::EndedTaskUse => "ended_task_use",
            Signal::DelegationWider => "delegation_wider",
            Signal::External { .. } => "external",
        }
    }

    /// Contribution to the risk score while the signal is recent.
    fn weight(&self) -> u32 {
        match self {
            Signal::Request => 0,
            Signal::OutOfScope => 20,
            Signal::PolicyDenied => 10,
            Signal::PostureChange => 30,
            Signal::EndedTaskUse => 10,
            Signal::DelegationWider => 30,
            Signal::External { severity, .. } => match severity {
                Severity::Low => 10,
                Severity::Medium => 30,
                Severity::High => 60,
                Severity::Critical => 100,
            },
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "low" => Ok(Self::Low),
            "medium" => Ok(Self::Medium),
            "high" => Ok(Self::High),
            "critical" => Ok(Self::Critical),
            o => Err(format!(
                "unknown severity {o:?} (low, medium, high, critical)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Audit,
    Deny,
    RevokeTask,
    RevokePrincipal,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Audit => "audit",
            Action::Deny => "deny",
            Action::RevokeTask => "revoke_task",
            Action::RevokePrincipal => "revoke_principal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Record what the rule would do; do not do it.
    Audit,
    Enforce,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// Signal name it counts (`Signal::name`).
    pub signal: String,
    /// For external signals: only these severities and above count.
    pub min_severity: Option<Severity>,
    pub threshold: u32,
    pub window: Duration,
    pub action: Action,
    pub mode: Mode,
    /// Workload class: applies only to principals whose path starts with this.
    pub class: Option<String>,
}

/// What a rule decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub rule: String,
    pub signal: String,
    pub action: Action,
    pub mode: Mode,
    pub count: u32,
    /// The principal's window reached the threshold (across its tasks), not the task's.
    pub per_principal: bool,
}

/// Per-principal quotas: at most this many in each `window` (0: no quota).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas {
    pub tasks: u32,
    pub requests: u32,
    pub window: Duration,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            tasks: 120,
            requests: 3000,
            window: Duration::from_secs(60),
        }
    }
}

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Tasks,
    Requests,
    /// Live approvals held at once (`approval::MAX_LIVE_PER_PRINCIPAL`).
    Approvals,
}

impl Quota {
    pub fn as_str(self) -> &'static str {
        match self {
            Quota::Tasks => "tasks",
            Quota::Requests => "requests",
            Quota::Approvals => "approvals",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AnomalyConfig {
    pub rules: Vec<Rule>,
    /// How long a signal counts toward the risk score.
    pub risk_window: Duration,
    /// How long a `deny` verdict blocks the task.
    pub deny_for: Duration,
    pub quotas: Quotas,
}

fn rule(name: &str, signal: &str, threshold: u32, window: u64, action: Action, mode: Mode) -> Rule {
    Rule {
        name: name.into(),
        signal: signal.into(),
        min_severity: None,
        threshold,
        window: Duration::from_secs(window),
        action,
        mode,
        class: None,
    }
}

impl Default for AnomalyConfig {
    /// Sane defaults: repeated scope probing or policy denials revoke the task; a flood
    /// is denied; a posture change or reuse of ended tasks is recorded (audit mode) —
    /// SVIDs rotate, so enforcing that needs a deployment's own judgement; a high or
    /// critical external signal revokes at once.
    fn default() -> Self {
        let mut external = rule(
            "external-high",
            "external",
            1,
            60,
            Action::RevokeTask,
            Mode::Enforce,
        );
        external.min_severity = Some(Severity::High);
        Self {
            rules: vec![
                rule(
                    "out-of-scope",
                    "out_of_scope",
                    3,
                    60,
                    Action::RevokeTask,
                    Mode::Enforce,
                ),
                rule(
                    "policy-denials",
                    "policy_denied",
                    5,
                    60,
                    Action::RevokeTask,
                    Mode::Enforce,
                ),
                rule(
                    "request-flood",
                    "request",
                    600,
                    60,
                    Action::Deny,
                    Mode::Enforce,
                ),
                rule(
                    "posture-change",
                    "posture_change",
                    1,
                    3600,
                    Action::RevokeTask,
                    Mode::Audit,
                ),
                rule(
                    "ended-task-use",
                    "ended_task_use",
                    3,
                    60,
                    Action::RevokePrincipal,
                    Mode::Audit,
                ),
                rule(
                    "delegation-wider",
                    "delegation_wider",
                    1,
                    60,
                    Action::RevokeTask,
                    Mode::Audit,
                ),
                external,
            ],
            risk_window: Duration::from_secs(600),
            deny_for: Duration::from_secs(60),
            quotas: Quotas::default(),
        }
    }
}

pub struct AnomalyEngine {
    config: AnomalyConfig,
    store: Arc<dyn LeaseStore>,
}

impl std::fmt::Debug for AnomalyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnomalyEngine")
            .field("rules", &self.config.rules.len())
            .finish()
    }
}

fn task_window(rule: &str, task: &TaskId) -> String {
    format!("w:{rule}:task:{task}")
}

fn principal_window(rule: &str, principal: &Principal) -> String {
    format!("w:{rule}:principal:{principal}")
}

fn deny_key(task: &TaskId) -> String {
    format!("deny:task:{task}")
}

fn risk_key(principal: &Principal) -> String {
    format!("principal:{principal}")
}

fn risk_name(signal: &Signal) -> String {
    match signal {
        Signal::External { kind, .. } => format!("external:{kind}"),
        other => other.name().to_string(),
    }
}

/// Risk 0..=100 and the signal names of recent events.
fn score(events: Vec<RiskEvent>) -> (u8, BTreeSet<String>) {
    let mut score = 0u32;
    let mut names = BTreeSet::new();
    for e in events {
        score = score.saturating_add(e.weight);
        names.insert(e.name);
    }
    (u8::try_from(score.min(100)).unwrap_or(100), names)
}

/// What `AnomalyEngine::request_gate` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestGate {
    pub over_quota: bool,
    pub denied: bool,
    pub risk: u8,
    pub signals: BTreeSet<String>,
}

fn std_to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

impl AnomalyEngine {
    pub fn new(config: AnomalyConfig, store: Arc<dyn LeaseStore>) -> Self {
        Self { config, store }
    }

    fn matching<'a>(
        &'a self,
        principal: &'a Principal,
        signal: &'a Signal,
    ) -> impl Iterator<Item = &'a Rule> + 'a {
        self.config.rules.iter().filter(move |r| {
            if r.signal != signal.name()
                || r.class
                    .as_deref()
                    .is_some_and(|c| !principal.path().starts_with(c))
            {
                return false;
            }
            !matches!(
                (r.min_severity, signal),
                (Some(min), Signal::External { severity, .. }) if *severity < min
            )
        })
    }

    /// Records `signal` for the task (if any) and its principal, and returns the rules
    /// it made fire. A rule fires when its count reaches the threshold within its window,
    /// counted per task and per principal; the window that fired then starts over.
    pub async fn observe(
        &self,
        principal: &Principal,
        task: Option<&TaskId>,
        signal: Signal,
    ) -> Result<Vec<Verdict>, StoreError> {
        let rules: Vec<&Rule> = self.matching(principal, &signal).collect();
        let mut windows = Vec::new();
        for r in &rules {
            let threshold = u64::from(r.threshold.max(1));
            if let Some(t) = task {
                windows.push(WindowHit {
                    key: task_window(&r.name, t),
                    window: r.window,
                    threshold,
                    reset: true,
                });
            }
            windows.push(WindowHit {
                key: principal_window(&r.name, principal),
                window: r.window,
                threshold,
                reset: true,
            });
        }
        let now = OffsetDateTime::now_utc();
        let risk = (signal.weight() > 0).then(|| RiskEvent {
            at: now,
            weight: signal.weight(),
            name: risk_name(&signal),
        });
        if windows.is_empty() && risk.is_none() {
            return Ok(Vec::new());
        }
        let counts = self
            .store
            .observe(&Observation {
                at: now,
                windows,
                risk,
                risk_keys: vec![risk_key(principal)],
                risk_keep: self.config.risk_window,
            })
            .await?;
        let per_rule = if task.is_some() { 2 } else { 1 };
        let mut fired = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let threshold = u64::from(r.threshold.max(1));
            let mine = counts.get(i * per_rule..(i + 1) * per_rule).unwrap_or(&[]);
            let (task_count, principal_count) = match mine {
                [t, p] => (*t, *p),
                [p] => (0, *p),
                _ => (0, 0),
            };
            if task_count >= threshold || principal_count >= threshold {
                fired.push(Verdict {
                    rule: r.name.clone(),
                    signal: signal.name().to_string(),
                    action: r.action,
                    mode: r.mode,
                    count: u32::try_from(task_count.max(principal_count)).unwrap_or(u32::MAX),
                    per_principal: task_count < threshold,
                });
            }
        }
        Ok(fired)
    }

    /// Counts one more task (or request) against the principal's quota; `false` when it
    /// is over the quota.
    pub async fn admit(&self, principal: &Principal, quota: Quota) -> Result<bool, StoreError> {
        let q = &self.config.quotas;
        let limit = match quota {
            Quota::Tasks => q.tasks,
            Quota::Requests => q.requests,
            Quota::Approvals => return Ok(true),
        };
        if limit == 0 {
            return Ok(true);
        }
        let counts = self
            .store
            .observe(&Observation {
                at: OffsetDateTime::now_utc(),
                windows: vec![WindowHit {
                    key: format!("q:{}:{principal}", quota.as_str()),
                    window: q.window,
                    threshold: u64::MAX,
                    reset: false,
                }],
                risk: None,
                risk_keys: Vec::new(),
                risk_keep: Duration::ZERO,
            })
            .await?;
        Ok(counts.first().is_some_and(|c| *c <= u64::from(limit)))
    }

    /// What a credential request must know before it is authorized, in one store step
    /// (one round trip on Redis): one more request counted against the principal's quota,
    /// the task's deny flag, the principal's risk.
    pub async fn request_gate(
        &self,
        principal: &Principal,
        task: &TaskId,
    ) -> Result<RequestGate, StoreError> {
        let now = OffsetDateTime::now_utc();
        let q = &self.config.quotas;
        let windows = if q.requests > 0 {
            vec![WindowHit {
                key: format!("q:{}:{principal}", Quota::Requests.as_str()),
                window: q.window,
                threshold: u64::MAX,
                reset: false,
            }]
        } else {
            Vec::new()
        };
        let got = self
            .store
            .observe_and_read(
                &Observation {
                    at: now,
                    windows,
                    risk: None,
                    risk_keys: Vec::new(),
                    risk_keep: Duration::ZERO,
                },
                &ControlRead {
                    flags: vec![deny_key(task)],
                    risk_keys: vec![risk_key(principal)],
                    risk_since: Some(now - std_to_time(self.config.risk_window)),
                },
            )
            .await?;
        let (risk, signals) = score(got.risk);
        Ok(RequestGate {
            over_quota: q.requests > 0
                && got
                    .counts
                    .first()
                    .is_none_or(|c| *c > u64::from(q.requests)),
            // A flag the store did not answer for counts as set: fail closed.
            denied: got.flags.first().copied().unwrap_or(true),
            risk,
            signals,
        })
    }

    /// Blocks credential requests under `task` for the configured time, on every replica.
    pub async fn deny(&self, task: &TaskId) -> Result<(), StoreError> {
        let until = OffsetDateTime::now_utc() + std_to_time(self.config.deny_for);
        self.store.set_flag(&deny_key(task), until).await
    }

    pub async fn is_denied(&self, task: &TaskId) -> Result<bool, StoreError> {
        let flags = self
            .store
            .flags(&[deny_key(task)], OffsetDateTime::now_utc())
            .await?;
        Ok(flags.first().copied().unwrap_or(true))
    }

    /// Risk 0..=100 from the principal's recent signals (on any of its tasks, or about
    /// it), and their names.
    pub async fn risk(&self, principal: &Principal) -> Result<(u8, BTreeSet<String>), StoreError> {
        let since = OffsetDateTime::now_utc() - std_to_time(self.config.risk_window);
        let events = self
            .store
            .risk_events(&[risk_key(principal)], since)
            .await?;
        Ok(score(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Principal {
        Principal::parse("spiffe://t/agent/a").expect("id")
    }

    fn engine(cfg: AnomalyConfig) -> (AnomalyEngine, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tmp");
        let store =
            crate::lease::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).expect("store");
        (AnomalyEngine::new(cfg, Arc::new(store)), dir)
    }

    async fn obs(
        e: &AnomalyEngine,
        who: &Principal,
        t: Option<&TaskId>,
        s: Signal,
    ) -> Vec<Verdict> {
        e.observe(who, t, s).await.expect("observe")
    }

    #[tokio::test]
    async fn the_third_out_of_scope_request_fires_revoke_task() {
        let (e, _d) = engine(AnomalyConfig::default());
        let t = TaskId::generate();
        assert!(obs(&e, &p(), Some(&t), Signal::OutOfScope).await.is_empty());
        assert!(obs(&e, &p(), Some(&t), Signal::OutOfScope).await.is_empty());
        let fired = obs(&e, &p(), Some(&t), Signal::OutOfScope).await;
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].action, Action::RevokeTask);
        assert_eq!(fired[0].mode, Mode::Enforce);
        assert_eq!(fired[0].rule, "out-of-scope");
        assert!(!fired[0].per_principal);
        // Another principal's task is counted on its own.
        let other = Principal::parse("spiffe://t/agent/b").expect("id");
        assert!(
            obs(&e, &other, Some(&TaskId::generate()), Signal::OutOfScope)
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn declaring_fresh_tasks_does_not_reset_the_principals_count() {
        let (e, _d) = engine(AnomalyConfig::default());
        let (a, b) = (TaskId::generate(), TaskId::generate());
        assert!(obs(&e, &p(), Some(&a), Signal::OutOfScope).await.is_empty());
        assert!(obs(&e, &p(), Some(&a), Signal::OutOfScope).await.is_empty());
        let fired = obs(&e, &p(), Some(&b), Signal::OutOfScope).await;
        assert_eq!(fired.len(), 1, "the third probe of the principal fires");
        assert!(fired[0].per_principal);
        assert_eq!(fired[0].count, 3);
    }

    #[tokio::test]
    async fn risk_rises_with_recent_signals_and_is_capped() {
        let (e, _d) = engine(AnomalyConfig::default());
        let t = TaskId::generate();
        assert_eq!(e.risk(&p()).await.expect("risk").0, 0);
        obs(&e, &p(), Some(&t), Signal::PolicyDenied).await;
        let (r, names) = e.risk(&p()).await.expect("risk");
        assert_eq!(r, 10);
        assert!(names.contains("policy_denied"));
        obs(
            &e,
            &p(),
            None,
            Signal::External {
                kind: "edr".into(),
                severity: Severity::Critical,
            },
        )
        .await;
        assert_eq!(e.risk(&p()).await.expect("risk").0, 100);
    }

    #[tokio::test]
    async fn external_signals_below_the_rule_severity_only_raise_risk() {
        let (e, _d) = engine(AnomalyConfig::default());
        let t = TaskId::generate();
        let low = Signal::External {
            kind: "x".into(),
            severity: Severity::Medium,
        };
        assert!(obs(&e, &p(), Some(&t), low).await.is_empty());
        let high = Signal::External {
            kind: "x".into(),
            severity: Severity::High,
        };
        assert_eq!(
            obs(&e, &p(), Some(&t), high).await[0].action,
            Action::RevokeTask
        );
    }

    #[tokio::test]
    async fn workload_classes_scope_rules() {
        let cfg = AnomalyConfig {
            rules: vec![Rule {
                class: Some("/ci/".into()),
                ..rule("ci", "out_of_scope", 1, 60, Action::Deny, Mode::Enforce)
            }],
            ..AnomalyConfig::default()
        };
        let (e, _d) = engine(cfg);
        let t = TaskId::generate();
        assert!(obs(&e, &p(), Some(&t), Signal::OutOfScope).await.is_empty());
        let ci = Principal::parse("spiffe://t/ci/build").expect("id");
        assert_eq!(obs(&e, &ci, Some(&t), Signal::OutOfScope).await.len(), 1);
    }

    #[tokio::test]
    async fn deny_blocks_for_a_while() {
        let (e, _d) = engine(AnomalyConfig::default());
        let t = TaskId::generate();
        assert!(!e.is_denied(&t).await.expect("read"));
        e.deny(&t).await.expect("deny");
        assert!(e.is_denied(&t).await.expect("read"));
        assert!(!e.is_denied(&TaskId::generate()).await.expect("read"));
    }

    #[tokio::test]
    async fn the_request_gate_reads_quota_deny_flag_and_risk_in_one_step() {
        let cfg = AnomalyConfig {
            quotas: Quotas {
                tasks: 0,
                requests: 2,
                window: Duration::from_secs(60),
            },
            ..AnomalyConfig::default()
        };
        let (e, _d) = engine(cfg);
        let t = TaskId::generate();
        obs(&e, &p(), Some(&t), Signal::PolicyDenied).await;
        let g = e.request_gate(&p(), &t).await.expect("gate");
        assert_eq!((g.over_quota, g.denied, g.risk), (false, false, 10));
        assert!(g.signals.contains("policy_denied"));
        e.deny(&t).await.expect("deny");
        let g = e.request_gate(&p(), &t).await.expect("gate");
        assert_eq!((g.over_quota, g.denied), (false, true));
        let g = e.request_gate(&p(), &t).await.expect("gate");
        assert!(
            g.over_quota,
            "the third request in the window is over a quota of 2"
        );
    }

    #[tokio::test]
    async fn a_principal_over_its_task_quota_is_refused_and_others_are_not() {
        let cfg = AnomalyConfig {
            quotas: Quotas {
                tasks: 3,
                requests: 0,
                window: Duration::from_secs(60),
            },
            ..AnomalyConfig::default()
        };
        let (e, _d) = engine(cfg);
        for _ in 0..3 {
            assert!(e.admit(&p(), Quota::Tasks).await.expect("admit"));
        }
        assert!(!e.admit(&p(), Quota::Tasks).await.expect("admit"));
        let other = Principal::parse("spiffe://t/agent/b").expect("id");
        assert!(e.admit(&other, Quota::Tasks).await.expect("admit"));
        assert!(
            e.admit(&p(), Quota::Requests).await.expect("admit"),
            "0 means no quota"
        );
    }
}
