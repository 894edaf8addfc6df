//! Behaviour-aware control: the broker reports what it sees (requests, refusals, posture
//! changes, external signals); rules count them per task (or per principal) in a sliding
//! window and, at a threshold, act: record, deny, revoke the task tree or everything of
//! the principal. Each rule can run in `audit` mode (record what it would have done)
//! before `enforce`. Recent signals also raise a risk score that Cedar policies read.
//!
//! State is in memory, per replica: with N replicas behind a load balancer a threshold is
//! reached per replica (documented; sharing counters through the store is future work).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::identity::Principal;
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
}

#[derive(Debug, Clone)]
pub struct AnomalyConfig {
    pub rules: Vec<Rule>,
    /// How long a signal counts toward the risk score.
    pub risk_window: Duration,
    /// How long a `deny` verdict blocks the task.
    pub deny_for: Duration,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Task(TaskId),
    Principal(String),
}

#[derive(Default)]
struct State {
    counts: HashMap<(Subject, String), VecDeque<Instant>>,
    recent: HashMap<Subject, VecDeque<(Instant, Signal)>>,
    denied: HashMap<TaskId, Instant>,
}

pub struct AnomalyEngine {
    config: AnomalyConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for AnomalyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnomalyEngine")
            .field("rules", &self.config.rules.len())
            .finish()
    }
}

/// Bound on tracked subjects: past it the oldest-looking entries are dropped, so a flood
/// of distinct ids cannot grow memory without limit.
const MAX_SUBJECTS: usize = 100_000;

impl AnomalyEngine {
    pub fn new(config: AnomalyConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `signal` for the task (or, without one, the principal) and returns the
    /// rules it made fire. A rule fires when its count reaches the threshold within its
    /// window; its count then starts over.
    pub fn observe(
        &self,
        principal: &Principal,
        task: Option<&TaskId>,
        signal: Signal,
    ) -> Vec<Verdict> {
        let now = Instant::now();
        let subject = task.map_or_else(
            || Subject::Principal(principal.to_string()),
            |t| Subject::Task(t.clone()),
        );
        let mut st = self.lock();
        if st.counts.len() > MAX_SUBJECTS {
            st.counts.clear();
        }
        if st.recent.len() > MAX_SUBJECTS {
            st.recent.clear();
        }
        if signal.weight() > 0 {
            let recent = st.recent.entry(subject.clone()).or_default();
            recent.push_back((now, signal.clone()));
            while recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > self.config.risk_window)
            {
                recent.pop_front();
            }
        }
        let mut fired = Vec::new();
        for r in &self.config.rules {
            if r.signal != signal.name()
                || r.class
                    .as_deref()
                    .is_some_and(|c| !principal.path().starts_with(c))
            {
                continue;
            }
            if let (Some(min), Signal::External { severity, .. }) = (r.min_severity, &signal)
                && *severity < min
            {
                continue;
            }
            let q = st
                .counts
                .entry((subject.clone(), r.name.clone()))
                .or_default();
            q.push_back(now);
            while q.front().is_some_and(|t| now.duration_since(*t) > r.window) {
                q.pop_front();
            }
            let count = u32::try_from(q.len()).unwrap_or(u32::MAX);
            if count >= r.threshold {
                q.clear();
                fired.push(Verdict {
                    rule: r.name.clone(),
                    signal: signal.name().to_string(),
                    action: r.action,
                    mode: r.mode,
                    count,
                });
            }
        }
        fired
    }

    /// Blocks credential requests under `task` for the configured time.
    pub fn deny(&self, task: &TaskId) {
        let until = Instant::now() + self.config.deny_for;
        self.lock().denied.insert(task.clone(), until);
    }

    pub fn is_denied(&self, task: &TaskId) -> bool {
        let mut st = self.lock();
        match st.denied.get(task) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                st.denied.remove(task);
                false
            }
            None => false,
        }
    }

    /// Risk 0..=100 from recent signals of the task and of its principal, and their names.
    pub fn risk(&self, principal: &Principal, task: &TaskId) -> (u8, BTreeSet<String>) {
        let now = Instant::now();
        let st = self.lock();
        let mut score = 0u32;
        let mut names = BTreeSet::new();
        for subject in [
            Subject::Task(task.clone()),
            Subject::Principal(principal.to_string()),
        ] {
            for (t, s) in st.recent.get(&subject).into_iter().flatten() {
                if now.duration_since(*t) <= self.config.risk_window {
                    score = score.saturating_add(s.weight());
                    names.insert(match s {
                        Signal::External { kind, .. } => format!("external:{kind}"),
                        other => other.name().to_string(),
                    });
                }
            }
        }
        (u8::try_from(score.min(100)).unwrap_or(100), names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Principal {
        Principal::parse("spiffe://t/agent/a").expect("id")
    }

    #[test]
    fn the_third_out_of_scope_request_fires_revoke_task() {
        let e = AnomalyEngine::new(AnomalyConfig::default());
        let t = TaskId::generate();
        assert!(e.observe(&p(), Some(&t), Signal::OutOfScope).is_empty());
        assert!(e.observe(&p(), Some(&t), Signal::OutOfScope).is_empty());
        let fired = e.observe(&p(), Some(&t), Signal::OutOfScope);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].action, Action::RevokeTask);
        assert_eq!(fired[0].mode, Mode::Enforce);
        assert_eq!(fired[0].rule, "out-of-scope");
        // Another task is counted on its own.
        assert!(
            e.observe(&p(), Some(&TaskId::generate()), Signal::OutOfScope)
                .is_empty()
        );
    }

    #[test]
    fn risk_rises_with_recent_signals_and_is_capped() {
        let e = AnomalyEngine::new(AnomalyConfig::default());
        let t = TaskId::generate();
        assert_eq!(e.risk(&p(), &t).0, 0);
        e.observe(&p(), Some(&t), Signal::PolicyDenied);
        let (r, names) = e.risk(&p(), &t);
        assert_eq!(r, 10);
        assert!(names.contains("policy_denied"));
        e.observe(
            &p(),
            None,
            Signal::External {
                kind: "edr".into(),
                severity: Severity::Critical,
            },
        );
        assert_eq!(e.risk(&p(), &t).0, 100);
    }

    #[test]
    fn external_signals_below_the_rule_severity_only_raise_risk() {
        let e = AnomalyEngine::new(AnomalyConfig::default());
        let t = TaskId::generate();
        let low = Signal::External {
            kind: "x".into(),
            severity: Severity::Medium,
        };
        assert!(e.observe(&p(), Some(&t), low).is_empty());
        let high = Signal::External {
            kind: "x".into(),
            severity: Severity::High,
        };
        assert_eq!(
            e.observe(&p(), Some(&t), high)[0].action,
            Action::RevokeTask
        );
    }

    #[test]
    fn workload_classes_scope_rules() {
        let cfg = AnomalyConfig {
            rules: vec![Rule {
                class: Some("/ci/".into()),
                ..rule("ci", "out_of_scope", 1, 60, Action::Deny, Mode::Enforce)
            }],
            ..AnomalyConfig::default()
        };
        let e = AnomalyEngine::new(cfg);
        let t = TaskId::generate();
        assert!(e.observe(&p(), Some(&t), Signal::OutOfScope).is_empty());
        let ci = Principal::parse("spiffe://t/ci/build").expect("id");
        assert_eq!(e.observe(&ci, Some(&t), Signal::OutOfScope).len(), 1);
    }

    #[test]
    fn deny_blocks_for_a_while() {
        let e = AnomalyEngine::new(AnomalyConfig::default());
        let t = TaskId::generate();
        assert!(!e.is_denied(&t));
        e.deny(&t);
        assert!(e.is_denied(&t));
    }
}
