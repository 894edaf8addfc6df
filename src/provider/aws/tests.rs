use super::config::role_name;
use super::revocation::covered_by_cutoff;
use super::*;
use crate::identity::Principal;
use std::collections::BTreeSet;

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn session_policy_is_exactly_the_grant() {
    let doc = session_policy(
        &set(&["s3:GetObject", "s3:PutObject"]),
        &set(&["arn:aws:s3:::bucket/reports/*"]),
    )
    .expect("policy");
    let v: Value = serde_json::from_str(&doc).expect("json");
    assert_eq!(v["Statement"][0]["Effect"], "Allow");
    assert_eq!(
        v["Statement"][0]["Action"],
        json!(["s3:GetObject", "s3:PutObject"])
    );
    assert_eq!(
        v["Statement"][0]["Resource"],
        json!(["arn:aws:s3:::bucket/reports/*"])
    );
    assert!(!doc.contains(' '), "compact: {doc}");
}

#[test]
fn session_policy_refuses_rather_than_widens() {
    let many: BTreeSet<String> = (0..60)
        .map(|i| format!("arn:aws:s3:::bucket-with-a-long-name/prefix/{i:04}/*"))
        .collect();
    match session_policy(&set(&["s3:GetObject"]), &many) {
        Err(ProviderError::PolicyTooLarge { len, max, .. }) => {
            assert!(len > max);
            assert_eq!(max, 2048);
        }
        other => panic!("expected PolicyTooLarge, got {other:?}"),
    }
    assert!(matches!(
        session_policy(&set(&["s3:GetObject"]), &BTreeSet::new()),
        Err(ProviderError::InvalidGrant(_))
    ));
    assert!(matches!(
        session_policy(&set(&["GetObject"]), &set(&["*"])),
        Err(ProviderError::InvalidGrant(_))
    ));
    assert!(matches!(
        session_policy(&set(&["s3:GetObject"]), &set(&["bucket"])),
        Err(ProviderError::InvalidGrant(_))
    ));
    for wild in ["arn:aws:s3:::reports/?", "arn:aws:s3:::${aws:username}/*"] {
        assert!(matches!(
            session_policy(&set(&["s3:GetObject"]), &set(&[wild])),
            Err(ProviderError::InvalidGrant(m)) if m.contains("IAM wildcard")
        ));
    }
}

#[test]
fn source_identity_is_valid_and_distinct() {
    let valid = |s: &str| {
        (2..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    };
    let a = Principal::parse("spiffe://dev.mayfly.local/agent/demo").expect("p");
    assert_eq!(source_identity(&a), "dev.mayfly.local+agent+demo");
    let long =
        Principal::parse(&format!("spiffe://example.org/{}", "x/".repeat(40) + "y")).expect("p");
    let o1 = Principal::parse(
        "https://token.actions.githubusercontent.com#repo:acme/app:ref:refs/heads/main",
    )
    .expect("p");
    let o2 = Principal::parse(
        "https://token.actions.githubusercontent.com#repo:acme/app:ref:refs/heads/dev",
    )
    .expect("p");
    for p in [&a, &long, &o1, &o2] {
        assert!(valid(&source_identity(p)), "{}", source_identity(p));
    }
    assert_ne!(source_identity(&o1), source_identity(&o2));
}

#[test]
fn role_names_from_arns() {
    assert_eq!(
        role_name("arn:aws:iam::123456789012:role/deploy"),
        Some("deploy")
    );
    assert_eq!(
        role_name("arn:aws:iam::123456789012:role/team/ci/deploy"),
        Some("deploy")
    );
    assert_eq!(role_name("arn:aws:iam::123456789012:user/deploy"), None);
    assert_eq!(role_name("arn:aws:s3:::bucket"), None);
    assert_eq!(role_name("arn:aws:iam::12:role/x"), None);
}

#[test]
fn deny_policy_groups_prunes_and_round_trips() {
    let mut p = DenyPolicy::default();
    p.add("lse_a", 1_000);
    p.add("lse_b", 1_010);
    p.add("lse_c", 5_000);
    assert!(p.contains("lse_a") && p.contains("lse_c"));
    let doc = p.render();
    let encoded =
        percent_encoding::utf8_percent_encode(&doc, percent_encoding::NON_ALPHANUMERIC).to_string();
    let back = DenyPolicy::parse(&encoded).expect("parse");
    assert_eq!(back, p);
    let mut q = back;
    assert_eq!(q.prune(2_000), 1);
    assert!(!q.contains("lse_a") && !q.contains("lse_b") && q.contains("lse_c"));
    assert_eq!(q.prune(10_000), 1);
    assert!(q.is_empty());
}

#[test]
fn deny_policy_keeps_foreign_statements() {
    let doc = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Ops","Effect":"Deny","Action":"s3:*","Resource":"*"}]}"#;
    let mut p = DenyPolicy::parse(doc).expect("parse");
    p.add("lse_x", 100);
    p.prune(1_000);
    assert!(!p.is_empty());
    assert!(p.render().contains("\"Sid\":\"Ops\""));
}

fn entry(member: &str, until: i64, seq: u64) -> crate::lease::DenyEntry {
    crate::lease::DenyEntry {
        member: member.into(),
        until: OffsetDateTime::from_unix_timestamp(until).expect("time"),
        seq,
    }
}

#[test]
fn rendering_from_the_store_fills_in_order_and_never_drops_a_written_entry() {
    let t0 = 1_900_000_000;
    // Sessions ending over several minutes, so entries spread over many statements.
    let entries: Vec<_> = (0..400u64)
        .map(|i| entry(&format!("lse_{i:032x}"), t0 + 60 * (i as i64 % 7), i + 1))
        .collect();
    let r = render_from_store(&entries, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
    assert!(r.policy.render().len() <= MAX_ROLE_POLICY_CHARS);
    assert!(
        r.written.len() > 200 && r.written.len() < 400,
        "{}",
        r.written.len()
    );
    assert_eq!(r.written.len() + r.waiting.len(), 400);
    // The written ones are exactly the first ones added; the rest wait in order.
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(r.written.contains(&e.member), i < r.written.len());
    }
    assert_eq!(r.waiting[0], entries[r.written.len()].member);
    // A later rendering with one more entry keeps every entry written before.
    let mut more = entries.clone();
    more.push(entry("lse_new", t0 + 9_999, 401));
    let r2 = render_from_store(&more, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
    assert!(r.written.is_subset(&r2.written));
    // Once the first statement expires, waiting entries move in, in order.
    let later: Vec<_> = more
        .iter()
        .filter(|e| e.until.unix_timestamp() > t0)
        .cloned()
        .collect();
    let r3 = render_from_store(&later, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
    assert!(r3.written.contains(&r.waiting[0]));
}

#[test]
fn issued_before_cutoff_renders_parses_back_and_takes_the_newest() {
    let entries = vec![
        entry("@issued_before:1900000000", 1_900_050_000, 1),
        entry("lse_a", 1_900_000_900, 2),
        entry("@issued_before:1900000100", 1_900_050_100, 3),
    ];
    let r = render_from_store(&entries, Vec::new(), MAX_ROLE_POLICY_CHARS).expect("render");
    assert_eq!(r.policy.issued_before(), Some(1_900_000_100));
    assert_eq!(r.written, set(&["lse_a"]));
    let doc = r.policy.render();
    let v: Value = serde_json::from_str(&doc).expect("json");
    assert_eq!(
        v["Statement"][0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"],
        "2030-03-17T17:48:20Z"
    );
    assert_eq!(DenyPolicy::parse(&doc).expect("parse"), r.policy);
    // A statement that only looks like a cut-off (no issue-time condition) stays foreign.
    let fake = r#"{"Statement":[{"Sid":"MayflyIssuedBefore1","Effect":"Deny","Action":"*","Resource":"*"}]}"#;
    let p = DenyPolicy::parse(fake).expect("parse");
    assert_eq!(p.issued_before(), None);
    assert!(!p.is_empty());
}

#[test]
fn a_lease_is_covered_by_a_cutoff_only_if_sent_before_it() {
    let now = OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("t");
    let mut lease = Lease::pending(
        &crate::task::TaskId::generate(),
        &Principal::parse("spiffe://a.test/agent/x").expect("p"),
        &crate::task::Grant {
            provider: ProviderKind::Aws,
            target: "deploy".into(),
            actions: set(&["s3:GetObject"]),
            resources: set(&["*"]),
        },
        now,
        now + Duration::from_secs(600),
    );
    let timeout = Duration::from_secs(10);
    assert!(!covered_by_cutoff(&lease, 1_900_000_010, timeout));
    assert!(covered_by_cutoff(&lease, 1_900_000_011, timeout));
    lease.issued_at = now + Duration::from_secs(5);
    assert!(!covered_by_cutoff(&lease, 1_900_000_011, timeout));
}

fn raw(extra: &str) -> RawAws {
    toml::from_str(&format!(
        "region = \"us-east-1\"\n{extra}\n[targets.t]\nrole_arn = \"arn:aws:iam::123456789012:role/deploy\"\n"
    ))
    .expect("toml")
}

#[test]
fn policy_full_and_reconcile_settings_parse_with_safe_defaults() {
    let c = AwsConfig::from_raw(raw("")).expect("defaults");
    assert_eq!(c.on_policy_full, OnPolicyFull::Wait);
    assert_eq!(c.reconcile_interval, Duration::from_secs(60));
    assert_eq!(c.min_session, Duration::from_secs(900));
    let c = AwsConfig::from_raw(raw(
        "on_policy_full = \"issued_before_deny\"\nreconcile_interval = \"5s\"",
    ))
    .expect("fallback");
    assert_eq!(c.on_policy_full, OnPolicyFull::IssuedBeforeDeny);
    assert_eq!(c.reconcile_interval, Duration::from_secs(5));
    for (bad, key) in [
        ("on_policy_full = \"drop\"", "providers.aws.on_policy_full"),
        (
            "reconcile_interval = \"0s\"",
            "providers.aws.reconcile_interval",
        ),
        (
            "min_session_duration = \"1h\"",
            "providers.aws.min_session_duration",
        ),
    ] {
        match AwsConfig::from_raw(raw(bad)) {
            Err((k, _)) => assert_eq!(k, key, "{bad}"),
            Ok(_) => panic!("{bad} accepted"),
        }
    }
}
