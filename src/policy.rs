//! Policy-as-code with Cedar. Policies are validated in strict mode against the schema
//! compiled into the binary (`config/schema.cedarschema`); a bad file stops start-up with
//! its path and line. Deny by default. Reload keeps the last good set when a new one fails.

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Effect, Entities, Entity,
    EntityId, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;

use crate::identity::{Principal, VerifiedCaller};
use crate::task::{Grant, Task, TaskRequest};

pub const SCHEMA_SRC: &str = include_str!("../config/schema.cedarschema");

#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policies from {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("no *.cedar policy file in {0}")]
    NoPolicies(PathBuf),
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}: policy {policy}: {message}")]
    Validation {
        file: PathBuf,
        line: usize,
        policy: String,
        message: String,
    },
    #[error("{file}: policy id {id:?} is used twice")]
    DuplicateId { file: PathBuf, id: String },
    #[error("{file}: policy templates are not supported")]
    Template { file: PathBuf },
    #[error("built-in Cedar schema is invalid: {0}")]
    Schema(String),
    #[error("cannot build the authorization request: {0}")]
    Request(String),
}

/// What Cedar answered, with the step-up folded in: an allow whose deciding policy
/// carries `@approval("required")` is a different answer, not an allow with a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed once an operator approves (step-up) before the credential is minted.
    AllowAfterApproval,
    Deny,
}

/// The answer for one authorization question, with what explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    pub decision: Decision,
    /// Ids of the policies that determined the answer (empty for a default deny).
    pub policies: Vec<String>,
    /// Policies skipped because evaluating them failed (the answer then leans to deny).
    pub errors: Vec<String>,
    /// For a denial, why, in words a caller can act on: the forbid policies that
    /// decided it, or (default deny) that no permit matched and which permit policies
    /// for the action were considered, with their `@description` rules. Empty when allowed.
    pub why: String,
}

impl PolicyDecision {
    /// Allowed, now or after approval.
    pub fn is_allowed(&self) -> bool {
        self.decision != Decision::Deny
    }
}

/// What `MintCredential` is asked about, beside the caller.
#[derive(Clone, Copy)]
pub struct MintContext<'a> {
    pub task: &'a Task,
    pub request: &'a Grant,
    pub ttl: Duration,
    pub risk: u8,
    pub signals: &'a std::collections::BTreeSet<String>,
}

/// A permit policy as a denial explains it: its id and `@description`, if any.
#[derive(Debug, Clone)]
struct Permit {
    id: String,
    description: Option<String>,
    action: ActionConstraint,
}

struct Loaded {
    set: PolicySet,
    /// Every permit policy, found once at load, for explaining a default deny.
    permits: Vec<Permit>,
    /// Policies annotated `@approval("required")`, found once at load: Cedar parses an
    /// annotation's key on every `Policy::annotation` lookup.
    approval: HashSet<PolicyId>,
    stamp: Vec<(PathBuf, SystemTime, u64)>,
}

/// Entity types and actions of the schema, parsed once.
struct Names {
    workload: EntityTypeName,
    target: EntityTypeName,
    declare: EntityUid,
    delegate: EntityUid,
    mint: EntityUid,
}

impl Names {
    fn new() -> Result<Self, PolicyError> {
        let bad = |e: &dyn std::fmt::Display| PolicyError::Schema(e.to_string());
        let ty = |n: &str| n.parse::<EntityTypeName>().map_err(|e| bad(&e));
        let action = |n: &str| {
            format!(r#"Mayfly::Action::"{n}""#)
                .parse::<EntityUid>()
                .map_err(|e| bad(&e))
        };
        Ok(Self {
            workload: ty("Mayfly::Workload")?,
            target: ty("Mayfly::Target")?,
            declare: action("DeclareTask")?,
            delegate: action("DelegateTask")?,
            mint: action("MintCredential")?,
        })
    }
}

pub struct PolicyEngine {
    dir: PathBuf,
    schema: Schema,
    names: Names,
    authorizer: Authorizer,
    current: RwLock<Arc<Loaded>>,
    /// `ip(...)` values by address: Cedar parses the extension's name on every
    /// `new_ip` (its lexer builds a regex cache each time), a few % of a credential.
    ips: Mutex<HashMap<IpAddr, Re>>,
    /// The workload and target entities of `DeclareTask` and `MintCredential` requests,
    /// by principal and grant. Both are functions of those alone (the schema is built
    /// in), and building them — Cedar evaluates every attribute, then indexes the set —
    /// cost about a tenth of a credential. Holds entities, never decisions: every
    /// request is still decided by the policies in force.
    entities: Mutex<HashMap<(Principal, String), Arc<RequestEntities>>>,
    /// Check each request's entities and context against the schema before deciding.
    /// Requests are built here from typed values, never from client JSON, so the check
    /// can only catch a construction bug in this file; it costs 20–30 µs, about half of a
    /// decision. It runs in debug builds (every integration test drives the debug binary)
    /// and in `every_request_shape_conforms_to_the_schema` for every action and caller
    /// kind; release builds skip it.
    check_requests: bool,
}

/// Distinct source addresses kept in `PolicyEngine::ips` before it starts over.
const IP_CACHE: usize = 4096;

/// Distinct (principal, grant) pairs kept in `PolicyEngine::entities` before it starts
/// over: bounded whatever callers present.
const ENTITY_CACHE: usize = 4096;

/// A request's principal and resource, and the entity set holding both.
struct RequestEntities {
    principal: EntityUid,
    resource: EntityUid,
    set: Entities,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("dir", &self.dir)
            .finish()
    }
}

fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA_SRC)
        .map(|(s, _warnings)| s)
        .map_err(|e| PolicyError::Schema(e.to_string()))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn first_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels()
        .and_then(|mut l| l.next())
        .map(|l| l.offset())
        .or_else(|| {
            d.related()
                .and_then(|mut r| r.next())
                .and_then(first_offset)
        })
}

fn stamp(dir: &Path) -> Result<Vec<(PathBuf, SystemTime, u64)>, PolicyError> {
    let io = |e: std::io::Error| PolicyError::Io {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let meta = entry.metadata().map_err(io)?;
            out.push((path, meta.modified().map_err(io)?, meta.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Where each policy came from: its id, file and text (for a validation error's line).
type Sources = Vec<(String, PathBuf, String)>;

/// Parses and strictly validates every `*.cedar` file in `dir`.
fn load_dir(dir: &Path, schema: &Schema) -> Result<Loaded, PolicyError> {
    let files = stamp(dir)?;
    if files.is_empty() {
        return Err(PolicyError::NoPolicies(dir.to_path_buf()));
    }
    let mut set = PolicySet::new();
    let mut sources = Sources::new();
    for (path, _, _) in &files {
        add_file(path, &mut set, &mut sources)?;
    }
    validate(&set, schema, &sources)?;
    let approval = set
        .policies()
        .filter(|p| p.annotation("approval") == Some("required"))
        .map(|p| p.id().clone())
        .collect();
    let permits = set
        .policies()
        .filter(|p| p.effect() == Effect::Permit)
        .map(|p| Permit {
            id: p.id().to_string(),
            description: p.annotation("description").map(str::to_string),
            action: p.action_constraint(),
        })
        .collect();
    Ok(Loaded {
        set,
        permits,
        approval,
        stamp: files,
    })
}

/// Parses one file and adds its policies to `set`, each under its `@id` or
/// `<file>#<n>` (its position in the file).
fn add_file(path: &Path, set: &mut PolicySet, sources: &mut Sources) -> Result<(), PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let parsed: PolicySet = text.parse().map_err(|e: cedar_policy::ParseErrors| {
        let (line, column) = first_offset(&e).map_or((0, 0), |o| line_col(&text, o));
        PolicyError::Parse {
            file: path.to_path_buf(),
            line,
            column,
            message: e.to_string(),
        }
    })?;
    if parsed.templates().next().is_some() {
        return Err(PolicyError::Template {
            file: path.to_path_buf(),
        });
    }
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut policies: Vec<&Policy> = parsed.policies().collect();
    // Parsed ids are policy0, policy1… in source order; keep that order for naming.
    policies.sort_by_key(|p| {
        p.id()
            .to_string()
            .trim_start_matches("policy")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    for (n, p) in policies.into_iter().enumerate() {
        let id = p
            .annotation("id")
            .map(str::to_string)
            .unwrap_or_else(|| format!("{stem}#{n}"));
        set.add(p.new_id(PolicyId::new(&id)))
            .map_err(|_| PolicyError::DuplicateId {
                file: path.to_path_buf(),
                id: id.clone(),
            })?;
        sources.push((id, path.to_path_buf(), text.clone()));
    }
    Ok(())
}

/// Strict validation against the schema; the first error names its file and line.
fn validate(set: &PolicySet, schema: &Schema, sources: &Sources) -> Result<(), PolicyError> {
    let result = Validator::new(schema.clone()).validate(set, ValidationMode::Strict);
    let Some(err) = result.validation_errors().next() else {
        return Ok(());
    };
    let pid = err.policy_id().to_string();
    let (file, line) = sources
        .iter()
        .find(|(id, _, _)| *id == pid)
        .map(|(_, f, text)| {
            (
                f.clone(),
                first_offset(err).map_or(0, |o| line_col(text, o).0),
            )
        })
        .unwrap_or_default();
    Err(PolicyError::Validation {
        file,
        line,
        policy: pid,
        message: err.to_string(),
    })
}

// Requests are built as Cedar values directly, not as JSON for Cedar to parse: its JSON
// path (untagged-enum probing that formats a serde error per attempt, `__extn` values)
// was a third of the broker's CPU per credential. Whether the schema checks each request:
// see `PolicyEngine::check_requests`.
type Re = RestrictedExpression;

fn string(v: impl Into<String>) -> Re {
    Re::new_string(v.into())
}

fn long(v: i64) -> Re {
    Re::new_long(v)
}

fn count(n: usize) -> Re {
    long(i64::try_from(n).unwrap_or(i64::MAX))
}

fn strings<'a>(items: impl IntoIterator<Item = &'a String>) -> Re {
    Re::new_set(items.into_iter().map(|s| string(s.as_str())))
}

fn record(fields: Vec<(&'static str, Re)>) -> Result<Re, PolicyError> {
    Re::new_record(fields.into_iter().map(|(k, v)| (k.to_string(), v)))
        .map_err(|e| PolicyError::Request(e.to_string()))
}

fn grant_record(g: &Grant) -> Result<Re, PolicyError> {
    record(vec![
        ("provider", string(g.provider.as_str())),
        ("target", string(g.target.as_str())),
        ("actions", strings(&g.actions)),
        ("resources", strings(&g.resources)),
    ])
}

fn labels_set(labels: &std::collections::BTreeMap<String, String>) -> Re {
    Re::new_set(labels.iter().map(|(k, v)| string(format!("{k}={v}"))))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The action's name (`MintCredential`) from its uid (`Mayfly::Action::"MintCredential"`).
fn action_name(action: &EntityUid) -> String {
    action.id().unescaped().to_string()
}

/// Why a request was denied. `forbids` are the policies that decided it (Cedar's
/// reasons for a deny are the satisfied forbids); none means a default deny.
fn explain_denial(
    permits: &[Permit],
    action: &EntityUid,
    forbids: &[String],
    errors: usize,
) -> String {
    let name = action_name(action);
    let mut why = if forbids.is_empty() {
        let considered: Vec<&Permit> = permits
            .iter()
            .filter(|p| match &p.action {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(a) => a == action,
                ActionConstraint::In(list) => list.contains(action),
            })
            .collect();
        if considered.is_empty() {
            format!("no permit policy exists for {name} (deny by default)")
        } else {
            let ids: Vec<&str> = considered.iter().map(|p| p.id.as_str()).collect();
            let mut s = format!(
                "no permit policy matched (deny by default); permit policies for {name} considered: {}",
                ids.join(", ")
            );
            for p in &considered {
                if let Some(d) = &p.description {
                    s.push_str(&format!("; {}: {d}", p.id));
                }
            }
            s
        }
    } else {
        format!("forbidden by policy {}", forbids.join(", "))
    };
    if errors > 0 {
        why.push_str(&format!(
            "; {errors} policies could not be evaluated for this request and were skipped"
        ));
    }
    why
}

impl PolicyEngine {
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let schema = schema()?;
        let loaded = load_dir(dir, &schema)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            schema,
            names: Names::new()?,
            authorizer: Authorizer::new(),
            current: RwLock::new(Arc::new(loaded)),
            ips: Mutex::default(),
            entities: Mutex::default(),
            check_requests: cfg!(debug_assertions),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn policy_count(&self) -> usize {
        self.current().set.policies().count()
    }

    /// Have the policy files changed since the last successful load (or failed attempt)?
    pub fn changed_on_disk(&self) -> bool {
        stamp(&self.dir).map_or(true, |s| s != self.current().stamp)
    }

    /// Loads the directory again. On error the previous set stays in force.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let loaded = load_dir(&self.dir, &self.schema)?;
        let n = loaded.set.policies().count();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(n)
    }

    fn ip(&self, ip: IpAddr) -> Re {
        let mut ips = self.ips.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = ips.get(&ip) {
            return v.clone();
        }
        if ips.len() >= IP_CACHE {
            ips.clear();
        }
        let v = Re::new_ip(ip.to_string());
        ips.insert(ip, v.clone());
        v
    }

    fn posture(&self, caller: &VerifiedCaller, now: OffsetDateTime) -> Result<Re, PolicyError> {
        let p = caller.posture();
        let ip = self.ip(p
            .source
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)));
        let claims = Re::new_record(
            p.claims
                .iter()
                .map(|(k, v)| (k.clone(), string(v.as_str()))),
        )
        .map_err(|e| PolicyError::Request(e.to_string()))?;
        let mut fields = vec![
            ("method", string(p.method.as_str())),
            ("trust_domain", string(p.trust_domain.as_str())),
            ("source_ip", ip),
            (
                "credential_remaining_seconds",
                long(p.credential_remaining_secs(now)),
            ),
            ("claims", claims),
        ];
        if let Some(iss) = &p.issuer {
            fields.push(("issuer", string(iss.as_str())));
        }
        record(fields)
    }

    fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }

    fn workload(&self, principal: &Principal) -> Result<Entity, PolicyError> {
        let mut attrs = HashMap::from([
            ("id".to_string(), string(principal.as_str())),
            ("trust_domain".to_string(), string(principal.trust_domain())),
            ("path".to_string(), string(principal.path())),
        ]);
        if let (Some(iss), Some(sub)) = (principal.issuer(), principal.subject()) {
            attrs.insert("issuer".into(), string(iss));
            attrs.insert("sub".into(), string(sub));
        }
        Entity::new(
            Self::uid(&self.names.workload, principal.as_str()),
            attrs,
            HashSet::new(),
        )
        .map_err(|e| PolicyError::Request(e.to_string()))
    }

    fn target(&self, g: &Grant) -> Result<Entity, PolicyError> {
        let attrs = HashMap::from([
            ("provider".to_string(), string(g.provider.as_str())),
            ("uri".to_string(), string(g.target.as_str())),
        ]);
        Entity::new(
            Self::uid(&self.names.target, &g.key()),
            attrs,
            HashSet::new(),
        )
        .map_err(|e| PolicyError::Request(e.to_string()))
    }

    /// The entity set of a request from `principal` to `resource`.
    fn request_entities(
        &self,
        principal: Entity,
        resource: Entity,
    ) -> Result<RequestEntities, PolicyError> {
        let (p_uid, r_uid) = (principal.uid(), resource.uid());
        // A delegation may name the caller as its own delegatee: one entity, not two.
        let entities = if p_uid == r_uid {
            vec![principal]
        } else {
            vec![principal, resource]
        };
        let schema = self.check_requests.then_some(&self.schema);
        let set = Entities::from_entities(entities, schema)
            .map_err(|e| PolicyError::Request(e.to_string()))?;
        Ok(RequestEntities {
            principal: p_uid,
            resource: r_uid,
            set,
        })
    }

    /// The entities of a request from `principal` to `grant`'s target, built once per
    /// pair (see `PolicyEngine::entities`).
    fn grant_entities(
        &self,
        principal: &Principal,
        grant: &Grant,
    ) -> Result<Arc<RequestEntities>, PolicyError> {
        let key = (principal.clone(), grant.key());
        if let Some(e) = self
            .entities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(e.clone());
        }
        let built =
            Arc::new(self.request_entities(self.workload(principal)?, self.target(grant)?)?);
        let mut cache = self.entities.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= ENTITY_CACHE {
            cache.clear();
        }
        cache.insert(key, built.clone());
        Ok(built)
    }

    fn decide(
        &self,
        action: &EntityUid,
        entities: &RequestEntities,
        context: Vec<(&'static str, Re)>,
    ) -> Result<PolicyDecision, PolicyError> {
        let req_err = |e: &dyn std::fmt::Display| PolicyError::Request(e.to_string());
        let schema = self.check_requests.then_some(&self.schema);
        let context = Context::from_pairs(context.into_iter().map(|(k, v)| (k.to_string(), v)))
            .map_err(|e| req_err(&e))?;
        let request = Request::new(
            entities.principal.clone(),
            action.clone(),
            entities.resource.clone(),
            context,
            schema,
        )
        .map_err(|e| req_err(&e))?;
        let current = self.current();
        let response = self
            .authorizer
            .is_authorized(&request, &current.set, &entities.set);
        let diag = response.diagnostics();
        let decision = match response.decision() {
            CedarDecision::Deny => Decision::Deny,
            CedarDecision::Allow if diag.reason().any(|id| current.approval.contains(id)) => {
                Decision::AllowAfterApproval
            }
            CedarDecision::Allow => Decision::Allow,
        };
        let policies: Vec<String> = diag.reason().map(ToString::to_string).collect();
        let errors: Vec<String> = diag.errors().map(ToString::to_string).collect();
        let why = if decision != Decision::Deny {
            String::new()
        } else {
            explain_denial(&current.permits, action, &policies, errors.len())
        };
        Ok(PolicyDecision {
            decision,
            policies,
            errors,
            why,
        })
    }

    /// `DeclareTask`, asked for every grant of the declared scope; all must be allowed.
    pub fn declare_task(
        &self,
        caller: &VerifiedCaller,
        req: &TaskRequest,
        grant: &Grant,
        now: OffsetDateTime,
    ) -> Result<PolicyDecision, PolicyError> {
        let context = vec![
            ("purpose", string(req.purpose.as_str())),
            ("ttl_seconds", long(secs(req.ttl))),
            ("grant", grant_record(grant)?),
            ("grant_count", count(req.scope.grants().len())),
            ("labels", labels_set(&req.labels)),
            ("posture", self.posture(caller, now)?),
        ];
        self.decide(
            &self.names.declare,
            &*self.grant_entities(caller.principal(), grant)?,
            context,
        )
    }

    /// `DelegateTask`: may the caller hand a slice of `parent` to `to`?
    pub fn delegate(
        &self,
        caller: &VerifiedCaller,
        to: &crate::identity::Principal,
        req: &TaskRequest,
        depth: usize,
        now: OffsetDateTime,
    ) -> Result<PolicyDecision, PolicyError> {
        let context = vec![
            ("purpose", string(req.purpose.as_str())),
            ("ttl_seconds", long(secs(req.ttl))),
            ("depth", count(depth)),
            ("grant_count", count(req.scope.grants().len())),
            ("posture", self.posture(caller, now)?),
        ];
        self.decide(
            &self.names.delegate,
            &self.request_entities(self.workload(caller.principal())?, self.workload(to)?)?,
            context,
        )
    }

    /// `MintCredential` for one concrete request under `task`.
    pub fn mint(
        &self,
        caller: &VerifiedCaller,
        m: &MintContext<'_>,
        now: OffsetDateTime,
    ) -> Result<PolicyDecision, PolicyError> {
        let MintContext {
            task,
            request,
            ttl,
            risk,
            signals,
        } = *m;
        let context = vec![
            ("purpose", string(task.purpose.as_str())),
            ("task_id", string(task.id.as_str())),
            ("ttl_seconds", long(secs(ttl))),
            ("task_remaining_seconds", long(secs(task.remaining(now)))),
            ("request", grant_record(request)?),
            ("labels", labels_set(&task.labels)),
            ("posture", self.posture(caller, now)?),
            ("risk", long(i64::from(risk))),
            ("signals", strings(signals)),
        ];
        self.decide(
            &self.names.mint,
            &*self.grant_entities(caller.principal(), request)?,
            context,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    /// A MintCredential decision for an http:// target, with an empty context (the
    /// policies below read none; the schema check of the request is off for that).
    fn decide_mint(mut engine: PolicyEngine) -> PolicyDecision {
        use crate::identity::{AuthMethod, Posture, Principal, VerifiedCaller};
        engine.check_requests = false;
        let now = OffsetDateTime::now_utc();
        let caller = VerifiedCaller::for_tests(
            Principal::parse("spiffe://dev.mayfly.local/agent/a").expect("id"),
            Posture {
                method: AuthMethod::X509Svid,
                trust_domain: "dev.mayfly.local".into(),
                source: None,
                credential_not_after: now + time::Duration::minutes(5),
                credential_fingerprint: "sha256:00".into(),
                issuer: None,
                claims: Default::default(),
            },
        );
        let entities = engine
            .grant_entities(
                caller.principal(),
                &Grant {
                    provider: crate::task::ProviderKind::Jwt,
                    target: "http://not-https.example".into(),
                    actions: ["read".to_string()].into(),
                    resources: Default::default(),
                },
            )
            .expect("entities");
        engine
            .decide(&engine.names.mint, &entities, vec![])
            .expect("decide")
    }

    /// The entity cache holds each principal's own entities: a decision for one
    /// principal never sees another's attributes, whatever the order of requests, and
    /// the cache stays bounded however many principals and targets call.
    #[test]
    fn cached_request_entities_belong_to_their_principal_and_stay_bounded() {
        let dir = dir_with(&[(
            "p.cedar",
            r#"permit (principal, action == Mayfly::Action::"MintCredential", resource)
               when { principal.path == "/agent/a" && resource.uri == "https://a.example" };"#,
        )]);
        let mut engine = PolicyEngine::load(dir.path()).expect("load");
        engine.check_requests = false;
        let grant = |uri: &str| Grant {
            provider: crate::task::ProviderKind::Jwt,
            target: uri.into(),
            actions: ["read".to_string()].into(),
            resources: Default::default(),
        };
        let decide = |who: &str, uri: &str| {
            let p = Principal::parse(&format!("spiffe://dev.mayfly.local{who}")).expect("id");
            let e = engine.grant_entities(&p, &grant(uri)).expect("entities");
            engine
                .decide(&engine.names.mint, &e, vec![])
                .expect("decide")
                .decision
        };
        for _ in 0..2 {
            assert_eq!(decide("/agent/a", "https://a.example"), Decision::Allow);
            assert_eq!(decide("/agent/b", "https://a.example"), Decision::Deny);
            assert_eq!(decide("/agent/a", "https://b.example"), Decision::Deny);
        }
        for i in 0..ENTITY_CACHE + 10 {
            decide(&format!("/agent/n{i}"), "https://a.example");
            let held = engine.entities.lock().expect("lock").len();
            assert!(held <= ENTITY_CACHE, "{held} cached entity sets");
        }
        assert_eq!(decide("/agent/a", "https://a.example"), Decision::Allow);
    }

    #[test]
    fn a_default_deny_names_the_permits_considered_and_their_rules() {
        let dir = dir_with(&[(
            "p.cedar",
            r#"@id("mint-https") @description("jwt credentials for https:// targets only")
permit (principal, action == Mayfly::Action::"MintCredential", resource)
when { resource.uri like "https://*" };
@id("declare-any") permit (principal, action == Mayfly::Action::"DeclareTask", resource);"#,
        )]);
        let d = decide_mint(PolicyEngine::load(dir.path()).expect("load"));
        assert_eq!(d.decision, Decision::Deny);
        assert_eq!(
            d.why,
            "no permit policy matched (deny by default); permit policies for MintCredential \
             considered: mint-https; mint-https: jwt credentials for https:// targets only"
        );
    }

    #[test]
    fn a_forbid_names_the_deciding_policy() {
        let dir = dir_with(&[(
            "p.cedar",
            r#"@id("all") permit (principal, action, resource);
@id("no-plain-http") forbid (principal, action == Mayfly::Action::"MintCredential", resource)
when { resource.uri like "http://*" };"#,
        )]);
        let d = decide_mint(PolicyEngine::load(dir.path()).expect("load"));
        assert_eq!(d.decision, Decision::Deny);
        assert_eq!(d.why, "forbidden by policy no-plain-http");
    }

    #[test]
    fn a_deny_without_any_permit_for_the_action_says_so() {
        let dir = dir_with(&[(
            "p.cedar",
            r#"@id("declare") permit (principal, action == Mayfly::Action::"DeclareTask", resource);"#,
        )]);
        let d = decide_mint(PolicyEngine::load(dir.path()).expect("load"));
        assert_eq!(
            d.why,
            "no permit policy exists for MintCredential (deny by default)"
        );
    }

    #[test]
    fn cached_ip_values_are_the_address_asked_for_also_after_the_cache_starts_over() {
        let dir = dir_with(&[("p.cedar", "permit (principal, action, resource);")]);
        let engine = PolicyEngine::load(dir.path()).expect("load");
        let fresh = |ip: IpAddr| format!("{:?}", Re::new_ip(ip.to_string()));
        let a: IpAddr = "10.1.2.3".parse().expect("ip");
        let b: IpAddr = "2001:db8::1".parse().expect("ip");
        for _ in 0..2 {
            assert_eq!(format!("{:?}", engine.ip(a)), fresh(a));
            assert_eq!(format!("{:?}", engine.ip(b)), fresh(b));
        }
        for i in 0..(IP_CACHE as u32 + 10) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(format!("{:?}", engine.ip(ip)), fresh(ip));
        }
        assert!(engine.ips.lock().expect("lock").len() <= IP_CACHE);
        assert_eq!(format!("{:?}", engine.ip(b)), fresh(b));
    }

    /// The requests `declare_task`, `delegate` and `mint` build conform to the schema, for
    /// each kind of caller (an X.509-SVID without issuer or claims, a JWT-SVID with an
    /// issuer, an OIDC token carrying every posture claim): the guarantee that lets
    /// release builds skip the per-request check.
    #[test]
    fn every_request_shape_conforms_to_the_schema() {
        use crate::identity::{AuthMethod, Posture, Principal, VerifiedCaller};
        use crate::task::{Scope, TaskState};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
        let mut engine = PolicyEngine::load(&dir).expect("dev policies load");
        engine.check_requests = true;
        let now = OffsetDateTime::now_utc();
        let posture = |method, issuer: Option<&str>, claims: &[&str]| Posture {
            method,
            trust_domain: "dev.mayfly.local".into(),
            source: Some("192.0.2.7".parse().expect("ip")),
            credential_not_after: now + time::Duration::minutes(5),
            credential_fingerprint: "sha256:00".into(),
            issuer: issuer.map(str::to_string),
            claims: claims
                .iter()
                .map(|c| (c.to_string(), "v".to_string()))
                .collect(),
        };
        let callers = [
            VerifiedCaller::for_tests(
                Principal::parse("spiffe://dev.mayfly.local/agent/a").expect("id"),
                posture(AuthMethod::X509Svid, None, &[]),
            ),
            VerifiedCaller::for_tests(
                Principal::parse("spiffe://dev.mayfly.local/agent/b").expect("id"),
                posture(AuthMethod::JwtSvid, Some("https://spire.test"), &[]),
            ),
            VerifiedCaller::for_tests(
                Principal::parse(
                    "https://token.actions.githubusercontent.com#repo:o/r:ref:refs/heads/main",
                )
                .expect("id"),
                posture(
                    AuthMethod::Oidc,
                    Some("https://token.actions.githubusercontent.com"),
                    crate::identity::bearer::POSTURE_CLAIMS,
                ),
            ),
        ];
        let grant = Grant {
            provider: crate::task::ProviderKind::Aws,
            target: "arn:aws:iam::123456789012:role/deploy".into(),
            actions: ["s3:GetObject".to_string()].into(),
            resources: ["arn:aws:s3:::b/*".to_string()].into(),
        };
        let req = TaskRequest {
            purpose: "shape".into(),
            scope: Scope::new(vec![grant.clone()]).expect("scope"),
            ttl: Duration::from_secs(600),
            labels: [("env".to_string(), "prod".to_string())].into(),
        };
        let to = Principal::parse("spiffe://dev.mayfly.local/agent/sub").expect("id");
        for caller in &callers {
            let task = Task {
                id: crate::task::TaskId::generate(),
                owner: caller.principal().clone(),
                purpose: req.purpose.clone(),
                scope: req.scope.clone(),
                created_at: now,
                expires_at: now + time::Duration::minutes(10),
                parent: None,
                labels: req.labels.clone(),
                state: TaskState::Active,
                ended_at: None,
                end_reason: None,
                origin: None,
            };
            let signals = ["new_source".to_string()].into();
            let m = MintContext {
                task: &task,
                request: &grant,
                ttl: Duration::from_secs(60),
                risk: 40,
                signals: &signals,
            };
            let who = caller.principal().as_str();
            engine
                .declare_task(caller, &req, &grant, now)
                .unwrap_or_else(|e| panic!("declare as {who}: {e}"));
            engine
                .delegate(caller, &to, &req, 1, now)
                .unwrap_or_else(|e| panic!("delegate as {who}: {e}"));
            engine
                .mint(caller, &m, now)
                .unwrap_or_else(|e| panic!("mint as {who}: {e}"));
            // A delegation to oneself: one entity, not two.
            engine
                .delegate(caller, caller.principal(), &req, 1, now)
                .unwrap_or_else(|e| panic!("self-delegate as {who}: {e}"));
        }
        // The check is live: a context the schema does not know is refused.
        let caller = &callers[0];
        let bad = engine.decide(
            &engine.names.mint,
            &engine
                .grant_entities(caller.principal(), &grant)
                .expect("entities"),
            vec![("no_such_field", long(1))],
        );
        assert!(matches!(bad, Err(PolicyError::Request(_))), "{bad:?}");
    }

    #[test]
    fn the_builtin_schema_is_valid() {
        assert!(schema().is_ok());
    }

    #[test]
    fn the_shipped_dev_policies_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
        let engine = PolicyEngine::load(&dir).expect("dev policies load");
        assert!(engine.policy_count() >= 2);
    }

    #[test]
    fn a_syntax_error_names_file_and_line() {
        let dir = dir_with(&[(
            "a.cedar",
            "permit(principal, action, resource);\n\npermit(principal action, resource);\n",
        )]);
        match PolicyEngine::load(dir.path()) {
            Err(PolicyError::Parse { file, line, .. }) => {
                assert!(file.ends_with("a.cedar"));
                assert_eq!(line, 3);
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn a_policy_that_does_not_type_check_is_rejected_with_its_line() {
        let dir = dir_with(&[(
            "b.cedar",
            "// ok\npermit(principal, action == Mayfly::Action::\"DeclareTask\", resource)\nwhen { resource.no_such_attr == \"x\" };\n",
        )]);
        match PolicyEngine::load(dir.path()) {
            Err(PolicyError::Validation { file, line, .. }) => {
                assert!(file.ends_with("b.cedar"));
                assert!(line == 2 || line == 3, "line {line}");
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_directory_is_an_error_not_an_open_door() {
        let dir = dir_with(&[]);
        assert!(matches!(
            PolicyEngine::load(dir.path()),
            Err(PolicyError::NoPolicies(_))
        ));
    }

    #[test]
    fn reload_keeps_the_last_good_set() {
        let dir = dir_with(&[(
            "p.cedar",
            "@id(\"all\") permit(principal, action == Mayfly::Action::\"DeclareTask\", resource);",
        )]);
        let engine = PolicyEngine::load(dir.path()).expect("load");
        std::fs::write(dir.path().join("p.cedar"), "permit(").expect("write");
        assert!(matches!(engine.reload(), Err(PolicyError::Parse { .. })));
        assert_eq!(engine.policy_count(), 1);
        std::fs::write(
            dir.path().join("q.cedar"),
            "@id(\"x\") forbid(principal, action, resource);",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("p.cedar"),
            "@id(\"y\") forbid(principal, action, resource);",
        )
        .expect("write");
        assert_eq!(engine.reload().expect("reload"), 2);
    }
}
