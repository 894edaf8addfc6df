//! In-process before/after ratios for each hot-path change, measured in the same run:
//! the old way and the new way of doing the same work, back to back.

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request,
    RestrictedExpression as Re, Schema,
};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

/// Mean µs per call of `f` over `n` calls.
fn time_us(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let t0 = Instant::now();
    for _ in 0..n {
        f();
    }
    t0.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

async fn time_us_async<F: std::future::Future<Output = ()>>(
    n: u32,
    mut f: impl FnMut() -> F,
) -> f64 {
    for _ in 0..n / 10 {
        f().await;
    }
    let t0 = Instant::now();
    for _ in 0..n {
        f().await;
    }
    t0.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

pub struct Ratio {
    pub what: &'static str,
    pub before_us: f64,
    pub after_us: f64,
}

/// Access-token signing: jsonwebtoken's `encode` (re-parses the PKCS#8 key per call)
/// against the cached aws-lc-rs key pair.
fn signing() -> Ratio {
    use mayfly::provider::jwt::{AccessClaims, Audience, JwtIssuer, SigningAlg, SigningKey};
    let (key, pem) = SigningKey::generate(SigningAlg::ES256).expect("key");
    let issuer = JwtIssuer::new("https://bench".into(), key);
    let claims = AccessClaims {
        iss: "https://bench".into(),
        sub: "spiffe://dev.mayfly.local/agent/demo".into(),
        aud: Audience::one("https://api.example.com"),
        scope: "read".into(),
        exp: 2_000_000_000,
        iat: 1_000_000_000,
        nbf: 1_000_000_000,
        jti: "lse_0123456789abcdef".into(),
        task_id: "tsk_0123456789abcdef".into(),
        purpose: "bench".into(),
        resources: vec![],
        act: None,
        cnf: None,
    };
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(pem.expose().as_bytes()).expect("key");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.typ = Some("at+jwt".into());
    let before = time_us(2000, || {
        let _ = jsonwebtoken::encode(&header, &claims, &enc).expect("sign");
    });
    let after = time_us(2000, || {
        let _ = issuer.sign(&claims).expect("sign");
    });
    Ratio {
        what: "ES256 access-token signature (jsonwebtoken encode → parsed aws-lc-rs key)",
        before_us: before,
        after_us: after,
    }
}

/// Bearer JWT-SVID verification on every request against the verified-token cache.
async fn bearer(config: &Path, token: &str) -> Ratio {
    let cfg = mayfly::config::Config::load(config).expect("config");
    // JWT-SVID keys come from files here: no bundle endpoint needs the X.509 bundles.
    let bundles =
        std::sync::Arc::new(mayfly::identity::LiveBundles::load(&[]).expect("empty bundle set"));
    let uncached = mayfly::app::bearer_verifier(&cfg, &bundles)
        .expect("verifier")
        .with_verified_cache(0);
    let cached = mayfly::app::bearer_verifier(&cfg, &bundles).expect("verifier");
    let now = time::OffsetDateTime::now_utc();
    let before = time_us_async(2000, || async {
        uncached.verify(token, None, now).await.expect("verify");
    })
    .await;
    let after = time_us_async(2000, || async {
        cached.verify(token, None, now).await.expect("verify");
    })
    .await;
    Ratio {
        what: "JWT-SVID bearer verification (every request → verified-token cache hit)",
        before_us: before,
        after_us: after,
    }
}

const P_ID: &str = "spiffe://dev.mayfly.local/agent/demo";
const R_ID: &str = "jwt:https://api.example.com";

/// The built-in schema and the names of a `MintCredential` request, parsed once (as
/// `PolicyEngine` does) so that only the per-request work is timed.
struct Mint {
    schema: Schema,
    action: EntityUid,
    workload: EntityTypeName,
    target: EntityTypeName,
}

impl Mint {
    fn new() -> Self {
        Self {
            schema: Schema::from_cedarschema_str(mayfly::policy::SCHEMA_SRC)
                .expect("schema")
                .0,
            action: r#"Mayfly::Action::"MintCredential""#.parse().expect("uid"),
            workload: "Mayfly::Workload".parse().expect("type"),
            target: "Mayfly::Target".parse().expect("type"),
        }
    }

    /// The request as `PolicyEngine` builds it: Cedar values, not JSON; checked against
    /// the schema when `check`.
    fn values_request(&self, check: bool) {
        let schema = check.then_some(&self.schema);
        let s = |v: &str| Re::new_string(v.to_string());
        let p = EntityUid::from_type_name_and_id(self.workload.clone(), EntityId::new(P_ID));
        let r = EntityUid::from_type_name_and_id(self.target.clone(), EntityId::new(R_ID));
        let pe = Entity::new(
            p.clone(),
            HashMap::from([
                ("id".to_string(), s(P_ID)),
                ("trust_domain".to_string(), s("dev.mayfly.local")),
                ("path".to_string(), s("/agent/demo")),
            ]),
            HashSet::new(),
        )
        .expect("entity");
        let re = Entity::new(
            r.clone(),
            HashMap::from([
                ("provider".to_string(), s("jwt")),
                ("uri".to_string(), s("https://api.example.com")),
            ]),
            HashSet::new(),
        )
        .expect("entity");
        let _e = Entities::from_entities([pe, re], schema).expect("e");
        let rec = |f: Vec<(&str, Re)>| {
            Re::new_record(f.into_iter().map(|(k, v)| (k.to_string(), v))).expect("record")
        };
        let c = Context::from_pairs([
            ("purpose".to_string(), s("bench")),
            ("task_id".to_string(), s("tsk_0123")),
            ("ttl_seconds".to_string(), Re::new_long(300)),
            ("task_remaining_seconds".to_string(), Re::new_long(3000)),
            (
                "request".to_string(),
                rec(vec![
                    ("provider", s("jwt")),
                    ("target", s("https://api.example.com")),
                    ("actions", Re::new_set([s("read")])),
                    ("resources", Re::new_set([])),
                ]),
            ),
            ("labels".to_string(), Re::new_set([])),
            ("risk".to_string(), Re::new_long(0)),
            ("signals".to_string(), Re::new_set([])),
            (
                "posture".to_string(),
                rec(vec![
                    ("method", s("jwt_svid")),
                    ("trust_domain", s("dev.mayfly.local")),
                    ("source_ip", Re::new_ip("127.0.0.1")),
                    ("credential_remaining_seconds", Re::new_long(3000)),
                    ("claims", rec(vec![])),
                ]),
            ),
        ])
        .expect("ctx");
        let _ = Request::new(p, self.action.clone(), r, c, schema).expect("req");
    }
}

/// The MintCredential request: Cedar entities and context parsed from JSON (as before)
/// against built as Cedar values (as now); both validated by the schema.
fn cedar() -> Ratio {
    let mint = Mint::new();
    let (schema, action) = (&mint.schema, &mint.action);
    let before = time_us(2000, || {
        let principal = json!({"uid": {"type": "Mayfly::Workload", "id": P_ID},
            "attrs": {"id": P_ID, "trust_domain": "dev.mayfly.local", "path": "/agent/demo"}, "parents": []});
        let resource = json!({"uid": {"type": "Mayfly::Target", "id": R_ID},
            "attrs": {"provider": "jwt", "uri": "https://api.example.com"}, "parents": []});
        let context = json!({
            "purpose": "bench", "task_id": "tsk_0123", "ttl_seconds": 300, "task_remaining_seconds": 3000,
            "request": {"provider": "jwt", "target": "https://api.example.com", "actions": ["read"], "resources": []},
            "labels": [], "risk": 0, "signals": [],
            "posture": {"method": "jwt_svid", "trust_domain": "dev.mayfly.local",
                "source_ip": {"__extn": {"fn": "ip", "arg": "127.0.0.1"}},
                "credential_remaining_seconds": 3000, "claims": {}},
        });
        let p = EntityUid::from_json(principal["uid"].clone()).expect("uid");
        let r = EntityUid::from_json(resource["uid"].clone()).expect("uid");
        let _e = Entities::from_json_value(json!([principal, resource]), Some(schema)).expect("e");
        let c = Context::from_json_value(context, Some((schema, action))).expect("ctx");
        let _ = Request::new(p, action.clone(), r, c, Some(schema)).expect("req");
    });
    let after = time_us(2000, || mint.values_request(true));
    Ratio {
        what: "Cedar MintCredential request (JSON entities/context → Cedar values)",
        before_us: before,
        after_us: after,
    }
}

/// The per-request schema check that release builds skip (`PolicyEngine::check_requests`):
/// the request built as Cedar values, checked against the schema and not.
fn cedar_check() -> Ratio {
    let mint = Mint::new();
    let before = time_us(2000, || mint.values_request(true));
    let after = time_us(2000, || mint.values_request(false));
    Ratio {
        what: "Cedar MintCredential request (schema-checked → built from typed values, unchecked)",
        before_us: before,
        after_us: after,
    }
}

/// Embedded-store lease writes (50 writers, 20 000 active leases): random UUIDv4 lease
/// ids, each landing on its own B-tree page, against time-ordered UUIDv7 ids, which
/// append to the same pages within a commit group. µs of wall time per lease.
async fn lease_ids(dir: &Path) -> Ratio {
    const N: usize = 20_000;
    let mut per_lease = [0.0; 2];
    for (i, random) in [true, false].into_iter().enumerate() {
        let s = crate::store::embedded(&dir.join(format!("ids-{random}.redb")));
        let rate = crate::store::fill_with(s, N, time::Duration::hours(1), 50, random).await;
        per_lease[i] = 1e6 / rate;
    }
    Ratio {
        what: "embedded store lease write, 50 writers (random UUIDv4 ids → time-ordered UUIDv7)",
        before_us: per_lease[0],
        after_us: per_lease[1],
    }
}

pub async fn all(config: &Path, token: &str, dir: &Path) -> Vec<Ratio> {
    vec![
        signing(),
        bearer(config, token).await,
        cedar(),
        cedar_check(),
        lease_ids(dir).await,
    ]
}

/// The per-exchange work no correct design can skip, each measured here in CPU µs: the
/// access-token signature, the Cedar `MintCredential` decision, and the one durable
/// write this design needs per credential at 50 concurrent requests: the lease and its
/// audit record in one group commit (embedded store, journaled audit log), with the
/// pump's batched append of the record to the audit file.
pub struct Floor {
    pub sign_us: f64,
    pub decide_us: f64,
    pub write_us: f64,
}

impl Floor {
    pub fn total_us(&self) -> f64 {
        self.sign_us + self.decide_us + self.write_us
    }
}

/// CPU µs of this process per unit of `n` units of `work`.
async fn cpu_us_per<F: std::future::Future<Output = ()>>(n: usize, work: F) -> f64 {
    let me = [std::process::id()];
    let c0 = crate::load::cpu_secs(&me);
    work.await;
    (crate::load::cpu_secs(&me) - c0) * 1e6 / n as f64
}

/// `sign_us` is the access-token signature measured by [`all`] in this run.
pub async fn floor(config: &Path, token: &str, dir: &Path, sign_us: f64) -> Floor {
    const N: usize = 20_000;
    const WRITERS: usize = 50;

    // The decision as the broker makes it: a verified caller, a task, the dev policies.
    let cfg = mayfly::config::Config::load(config).expect("config");
    let bundles =
        std::sync::Arc::new(mayfly::identity::LiveBundles::load(&[]).expect("empty bundle set"));
    let verifier = mayfly::app::bearer_verifier(&cfg, &bundles).expect("verifier");
    let now = time::OffsetDateTime::now_utc();
    let caller = verifier
        .verify(token, None, now)
        .await
        .expect("verify")
        .caller;
    let policy = mayfly::policy::PolicyEngine::load(Path::new("config/policies")).expect("policy");
    let treq = mayfly::task::TaskRequest::try_from(
        serde_json::from_value::<mayfly::task::RawTaskRequest>(json!({
            "purpose": "bench",
            "scope": [{"provider": "jwt", "target": "https://api.example.com", "actions": ["read"]}],
            "ttl": "1h",
        }))
        .expect("raw task"),
    )
    .expect("task");
    let task = mayfly::task::Task {
        id: mayfly::task::TaskId::generate(),
        owner: caller.principal().clone(),
        purpose: treq.purpose,
        scope: treq.scope,
        created_at: now,
        expires_at: now + time::Duration::hours(1),
        parent: None,
        labels: Default::default(),
        state: mayfly::task::TaskState::Active,
        ended_at: None,
        end_reason: None,
        origin: None,
    };
    let grant = task.scope.grants()[0].clone();
    let m = mayfly::policy::MintContext {
        task: &task,
        request: &grant,
        ttl: std::time::Duration::from_secs(300),
        risk: 0,
        signals: &std::collections::BTreeSet::new(),
    };
    let decide_us = time_us(2000, || {
        let d = policy.mint(&caller, &m, now).expect("decide");
        assert!(d.is_allowed(), "the dev policy allows the bench request");
    });

    let write_us = joint_writes(&task, dir, N, WRITERS).await;
    Floor {
        sign_us,
        decide_us,
        write_us,
    }
}

/// CPU µs per credential of `n` lease-and-record commits from `writers` concurrent
/// writers, as the broker makes them, the audit file fed and flushed included.
async fn joint_writes(task: &mayfly::task::Task, dir: &Path, n: usize, writers: usize) -> f64 {
    use mayfly::lease::{Joined, LeaseStore, NewLease};
    let store = std::sync::Arc::new(
        mayfly::lease::embedded::EmbeddedStore::open(&dir.join("floor.redb")).expect("redb"),
    );
    store.create_task(task).await.expect("task");
    let audit = mayfly::audit::AuditLog::open_journaled(
        &dir.join("floor-audit.jsonl"),
        "bench",
        None,
        mayfly::audit::Rotation::default(),
        store.clone(),
    )
    .expect("journaled audit log");
    let grant = task.scope.grants()[0].clone();
    cpu_us_per(n, async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..writers {
            let (audit, task, grant) = (audit.clone(), task.clone(), grant.clone());
            tasks.spawn(async move {
                for _ in 0..n / writers {
                    let now = time::OffsetDateTime::now_utc();
                    let mut lease = mayfly::lease::Lease::pending(
                        &task.id,
                        &task.owner,
                        &grant,
                        now,
                        now + time::Duration::minutes(5),
                    );
                    lease.activate("fp".into(), None).expect("activate");
                    let mut e = mayfly::audit::AuditEvent::new("request");
                    e.action = Some(mayfly::action::Action::MintCredential);
                    e.lease_id = Some(lease.id.to_string());
                    let new = NewLease {
                        due_at: lease.expires_at,
                        lease,
                        once: None,
                    };
                    let done = audit.write_with_lease(e, new).await.expect("write");
                    assert_eq!(done, Joined::Written);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        audit.flush().await.expect("flush");
    })
    .await
}
