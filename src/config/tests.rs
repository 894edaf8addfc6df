use super::*;
use crate::identity::bundle_endpoint::EndpointAuth;
use crate::identity::jwks::KeySourceSpec;
use crate::provider::jwt::Binding;

/// A minimal config with trust domain entries `tds` (TOML) and `extra` tables.
fn config(tds: &str, extra: &str) -> Result<Config, ConfigError> {
    let text = format!(
        "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{tds}\n{extra}\n\
         [providers.jwt]\nissuer = \"https://mayfly.test\"\nsigning_key_file = \"j.pem\"\n"
    );
    Config::from_toml(&text, Path::new("test.toml"))
}

fn refused(result: Result<Config, ConfigError>) -> (&'static str, String) {
    match result {
        Err(ConfigError::Invalid { key, message }) => (key, message),
        other => panic!("expected an invalid-key error, got {other:?}"),
    }
}

const WAPI: &str = "[workload_api]\nsocket = \"unix:///run/spire/api.sock\"\n";

const TD: &str = "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n";

#[test]
fn edge_limits_and_audit_keys_have_their_documented_defaults() {
    let c = config(TD, "").expect("valid");
    let e = &c.edge;
    assert_eq!(e.header_read_timeout, Duration::from_secs(10));
    assert_eq!(e.body_read_timeout, Duration::from_secs(10));
    assert_eq!(e.idle_timeout, Duration::from_secs(60));
    assert_eq!(e.h2_keepalive_interval, Duration::from_secs(20));
    assert_eq!(e.h2_keepalive_timeout, Duration::from_secs(10));
    assert_eq!(e.max_header_bytes, 16384);
    assert_eq!(e.h2_max_concurrent_streams, 64);
    assert_eq!(e.h2_max_header_list_bytes, 16384);
    assert_eq!(e.max_connections_per_source, 64);
    assert_eq!(
        (e.unauth_rate_per_source, e.unauth_burst_per_source),
        (20, 40)
    );
    assert_eq!(c.audit_rotation.rotate_bytes, 67_108_864);
    assert_eq!(c.audit_rotation.retain_files, 0);
    assert_eq!(c.anchor_interval, Duration::from_secs(10));
    assert_eq!(c.summary_interval, Duration::from_secs(10));
    match &c.store {
        StoreConfig::Embedded { cache_bytes, .. } => assert_eq!(*cache_bytes, 128 << 20),
        other => panic!("expected the embedded store, got {other:?}"),
    }
}

#[test]
fn unsafe_edge_limits_are_refused_by_key() {
    for (extra, want) in [
        (
            "[limits]\nmax_header_bytes = 100",
            "limits.max_header_bytes",
        ),
        (
            "[limits]\nbody_read_timeout = \"0s\"",
            "limits.body_read_timeout",
        ),
        ("[limits]\nidle_timeout = \"soon\"", "limits.idle_timeout"),
        (
            "[limits]\nmax_connections_per_source = 0",
            "limits.max_connections_per_source",
        ),
        (
            "[limits]\nh2_max_concurrent_streams = 0",
            "limits.h2_max_concurrent_streams",
        ),
        ("[audit]\nrotate_bytes = 10", "audit.rotate_bytes"),
        (
            "[audit]\nsummary_interval = \"2h\"",
            "audit.summary_interval",
        ),
        (
            "[store]\nkind = \"embedded\"\ncache_bytes = 1024",
            "store.cache_bytes",
        ),
        (
            "[store]\nkind = \"embedded\"\ncache_bytes = 68719476737",
            "store.cache_bytes",
        ),
    ] {
        let (key, _) = refused(config(TD, extra));
        assert_eq!(key, want, "{extra}");
    }
}

#[test]
fn mayfly_node_id_overrides_the_configured_node_id_and_is_validated() {
    let text = format!(
        "node_id = \"from-file\"\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{TD}\n\
         [providers.jwt]\nissuer = \"https://mayfly.test\"\nsigning_key_file = \"j.pem\"\n"
    );
    let origin = Path::new("t.toml");
    let c = Config::from_toml_with_node_id(&text, origin, None).expect("valid");
    assert_eq!(c.node_id, "from-file");
    let c = Config::from_toml_with_node_id(&text, origin, Some("mayfly-2".into())).expect("valid");
    assert_eq!(c.node_id, "mayfly-2");
    let (key, _) = refused(Config::from_toml_with_node_id(
        &text,
        origin,
        Some("a b".into()),
    ));
    assert_eq!(key, "node_id");
}

#[test]
fn binding_and_dpop_settings_have_their_documented_defaults_and_bounds() {
    let td = "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n";
    let c = config(td, "").expect("valid");
    assert_eq!(c.jwt_bindings, BindingRules::default());
    assert_eq!(c.jwt_bindings.default, Binding::Optional);
    assert_eq!(
        (c.dpop.max_age, c.dpop.leeway, c.dpop.nonce_lifetime),
        (
            Duration::from_secs(60),
            Duration::from_secs(5),
            Duration::from_secs(60)
        )
    );
    assert_eq!(c.dpop.nonce_secret_file, None);
    let c = config(
        td,
        "[providers.jwt.targets.\"https://x.test\"]\nbinding = \"required\"\n",
    )
    .expect("valid");
    assert_eq!(
        c.jwt_bindings.for_target("https://x.test"),
        Binding::Required
    );
    assert_eq!(
        c.jwt_bindings.for_target("https://y.test"),
        Binding::Optional
    );
    for (extra, want) in [
        ("[dpop]\nmax_age = \"11m\"\n", "dpop.max_age"),
        ("[dpop]\nleeway = \"2m\"\n", "dpop.leeway"),
    ] {
        assert_eq!(refused(config(td, extra)).0, want, "{extra}");
    }
}

#[test]
fn each_bundle_source_is_inferred_or_named() {
    let c = config(
        "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n\
         [[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
         [[trust_domains]]\nname = \"c.test\"\nsource = \"workload_api\"\n",
        WAPI,
    )
    .expect("valid");
    assert!(matches!(c.trust_domains[0].source, X509Source::File(_)));
    let X509Source::Endpoint(spec) = &c.trust_domains[1].source else {
        panic!("endpoint expected");
    };
    assert_eq!(spec.auth, EndpointAuth::HttpsWeb { ca_file: None });
    assert_eq!(
        (spec.refresh_min, spec.refresh_max),
        (Duration::from_secs(30), Duration::from_secs(3600))
    );
    assert!(matches!(c.trust_domains[2].source, X509Source::WorkloadApi));
    let w = c.workload_api.expect("workload api");
    assert_eq!(w.socket, "unix:///run/spire/api.sock");
    assert_eq!(w.initial_timeout, Duration::from_secs(10));
}

#[test]
fn a_key_of_another_source_is_refused() {
    let (key, msg) = refused(config(
        "[[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\nbundle_file = \"a.pem\"\n",
        WAPI,
    ));
    assert_eq!(key, "trust_domains");
    assert!(
        msg.contains("bundle_file does not apply to source = \"workload_api\""),
        "{msg}"
    );
    let (_, msg) = refused(config(
        "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\nrefresh_min = \"1s\"\n",
        "",
    ));
    assert!(
        msg.contains("refresh_min/refresh_max does not apply to source = \"file\""),
        "{msg}"
    );
}

#[test]
fn the_workload_api_table_and_its_users_come_together() {
    let (key, msg) = refused(config(
        "[[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\n",
        "",
    ));
    assert_eq!(key, "workload_api");
    assert!(msg.contains("no [workload_api] table"), "{msg}");
    let (key, msg) = refused(config(
        "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
        WAPI,
    ));
    assert_eq!(key, "workload_api");
    assert!(msg.contains("no trust domain or jwt_svid"), "{msg}");
}

#[test]
fn the_workload_api_socket_must_be_an_absolute_unix_socket() {
    for socket in [
        "tcp://127.0.0.1:8081",
        "unix://relative.sock",
        "/run/api.sock",
        "unix:",
    ] {
        let (key, _) = refused(config(
            "[[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\n",
            &format!("[workload_api]\nsocket = \"{socket}\"\n"),
        ));
        assert_eq!(key, "workload_api.socket", "{socket}");
    }
}

#[test]
fn an_https_spiffe_endpoint_of_its_own_domain_needs_a_bootstrap_bundle() {
    let td = "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
              endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.test/spire\"\n";
    let (_, msg) = refused(config(td, ""));
    assert!(msg.contains("needs bundle_file"), "{msg}");
    let c = config(&format!("{td}bundle_file = \"b.pem\"\n"), "").expect("valid");
    let X509Source::Endpoint(spec) = &c.trust_domains[0].source else {
        panic!("endpoint expected");
    };
    assert!(
        matches!(&spec.auth, EndpointAuth::HttpsSpiffe { id } if id.as_str() == "spiffe://b.test/spire")
    );
}

#[test]
fn profile_keys_must_match_the_profile() {
    let base = "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\nbundle_file = \"b.pem\"\n";
    let (_, msg) = refused(config(
        &format!("{base}endpoint_profile = \"https_spiffe\"\n"),
        "",
    ));
    assert!(msg.contains("needs endpoint_spiffe_id"), "{msg}");
    let (_, msg) = refused(config(
        &format!("{base}endpoint_spiffe_id = \"spiffe://b.test/spire\"\n"),
        "",
    ));
    assert!(
        msg.contains("needs endpoint_profile = \"https_spiffe\""),
        "{msg}"
    );
    let (_, msg) = refused(config(
        &format!(
            "{base}endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.test/spire\"\nendpoint_ca_file = \"ca.pem\"\n"
        ),
        "",
    ));
    assert!(msg.contains("endpoint_ca_file is for https_web"), "{msg}");
    let (key, _) = refused(config(
        "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"http://b.test/bundle\"\n",
        "",
    ));
    assert_eq!(key, "trust_domains.bundle_endpoint");
}

#[test]
fn an_https_spiffe_endpoint_id_must_name_a_trusted_domain() {
    let (key, msg) = refused(config(
        "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
        "[[jwt_svid]]\ntrust_domain = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
         endpoint_profile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://c.test/spire\"\n\
         audiences = [\"x\"]\n",
    ));
    assert_eq!(key, "jwt_svid");
    assert!(
        msg.contains("c.test, which is not in [[trust_domains]]"),
        "{msg}"
    );
}

#[test]
fn refresh_bounds_are_checked() {
    let (key, _) = refused(config(
        "[[trust_domains]]\nname = \"b.test\"\nbundle_endpoint = \"https://b.test/bundle\"\n\
         refresh_min = \"2h\"\nrefresh_max = \"1h\"\n",
        "",
    ));
    assert_eq!(key, "trust_domains.refresh_min");
}

#[test]
fn a_trust_domain_configured_twice_is_refused() {
    let (key, msg) = refused(config(
        "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n\
         [[trust_domains]]\nname = \"a.test\"\nsource = \"workload_api\"\n",
        WAPI,
    ));
    assert_eq!(key, "trust_domains.name");
    assert!(msg.contains("twice"), "{msg}");
}

#[test]
fn jwt_svid_keys_from_the_workload_api_take_no_bundle_key() {
    let c = config(
        "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
        &format!(
            "{WAPI}[[jwt_svid]]\ntrust_domain = \"a.test\"\nsource = \"workload_api\"\naudiences = [\"x\"]\n"
        ),
    )
    .expect("valid");
    assert_eq!(c.jwt_svid[0].1.source, KeySourceSpec::Pushed);
    let (key, msg) = refused(config(
        "[[trust_domains]]\nname = \"a.test\"\nbundle_file = \"a.pem\"\n",
        &format!(
            "{WAPI}[[jwt_svid]]\ntrust_domain = \"a.test\"\nsource = \"workload_api\"\nbundle_file = \"j.json\"\naudiences = [\"x\"]\n"
        ),
    ));
    assert_eq!(key, "jwt_svid");
    assert!(msg.contains("bundle_file does not apply"), "{msg}");
}

/// The value `config/mayfly.full.toml` documents for `key` in `section`: the
/// `default "X"` (or `default X`) its comment names, else the value shown (the
/// file's convention: a value without a "default" note is the default). Commented-out
/// sections and keys (`# [webhook]`, `# timeout = "5s"`) count.
fn documented(section: &str, key: &str) -> String {
    let text = include_str!("../../config/mayfly.full.toml");
    let mut current = String::new();
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(h) = l.strip_prefix('[')
            && let Some(end) = h.find(']')
        {
            current = h[..end].trim_start_matches('[').to_string();
            continue;
        }
        if current != section {
            continue;
        }
        let Some((k, rest)) = l.split_once(" = ") else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        let (value, comment) = rest.split_once('#').unwrap_or((rest, ""));
        let pick = match comment.split_once("default ") {
            // `default "a:b" …`: the quoted value; `default 5: …`: up to the punctuation.
            Some((_, d)) => match d.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or(q),
                None => d.split([':', ';', ' ', ',']).next().unwrap_or(d),
            },
            None => value,
        };
        return pick.trim().trim_matches('"').to_string();
    }
    panic!("config/mayfly.full.toml documents no {section}.{key}");
}

fn doc_dur(section: &str, key: &str) -> Duration {
    crate::duration::parse(&documented(section, key)).expect("documented duration")
}

fn doc_num<T: std::str::FromStr>(section: &str, key: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    documented(section, key).parse().expect("documented number")
}

/// Every section given with only its required keys: each missing key takes the
/// default mayfly.full.toml documents (a `[policy]` table without reload_interval
/// once stopped start-up with `missing field`).
#[test]
fn required_keys_only_take_the_documented_defaults() {
    let cfg = config(
        "[[trust_domains]]\nname = \"example.org\"\nbundle_file = \"b.pem\"\n\
         [[trust_domains]]\nname = \"wapi.example.org\"\nsource = \"workload_api\"\n",
        "[policy]\n[store]\nkind = \"embedded\"\n[audit]\n[limits]\n[reaper]\n[bearer]\n\
         [anomaly]\n[operators]\n\
         [workload_api]\nsocket = \"unix:///run/spire/api.sock\"\n\
         [[jwt_svid]]\ntrust_domain = \"example.org\"\nbundle_file = \"j.json\"\naudiences = [\"a\"]\n\
         [[oidc_issuers]]\nissuer = \"https://issuer.example.org\"\naudiences = [\"a\"]\n\
         [webhook]\nurl = \"https://hooks.example.org/m\"\nsecret_file = \"s\"\n",
    )
    .expect("a config with only the required keys parses");
    assert_eq!(cfg.listen.to_string(), documented("", "listen"));
    assert_eq!(cfg.node_id, documented("", "node_id"));
    assert_eq!(cfg.policy_dir, PathBuf::from(documented("policy", "dir")));
    assert_eq!(cfg.policy_reload, doc_dur("policy", "reload_interval"));
    match &cfg.store {
        StoreConfig::Embedded { path, cache_bytes } => {
            assert_eq!(path, &PathBuf::from(documented("store", "path")));
            assert_eq!(*cache_bytes, doc_num::<usize>("store", "cache_bytes"));
        }
        other => panic!("expected the embedded store, got {other:?}"),
    }
    assert_eq!(cfg.audit_path, PathBuf::from(documented("audit", "path")));
    let l = &cfg.limits;
    assert_eq!(l.max_task_ttl, doc_dur("limits", "max_task_ttl"));
    assert_eq!(l.max_lease_ttl, doc_dur("limits", "max_lease_ttl"));
    assert_eq!(l.default_lease_ttl, doc_dur("limits", "default_lease_ttl"));
    assert_eq!(l.pending_timeout, doc_dur("limits", "pending_timeout"));
    assert_eq!(l.max_page, doc_num::<usize>("limits", "max_page"));
    assert_eq!(
        l.max_delegation_depth,
        doc_num::<usize>("limits", "max_delegation_depth")
    );
    assert_eq!(
        cfg.max_body_bytes,
        doc_num::<usize>("limits", "max_body_bytes")
    );
    assert_eq!(
        cfg.max_connections,
        doc_num::<usize>("limits", "max_connections")
    );
    assert_eq!(
        cfg.max_in_flight,
        doc_num::<usize>("limits", "max_in_flight")
    );
    assert_eq!(
        cfg.handshake_timeout,
        doc_dur("limits", "handshake_timeout")
    );
    let r = &cfg.reaper;
    assert_eq!(r.interval, doc_dur("reaper", "interval"));
    assert_eq!(r.batch, doc_num::<usize>("reaper", "batch"));
    assert_eq!(r.claim_hold, doc_dur("reaper", "claim_hold"));
    assert_eq!(
        r.retry.max_attempts,
        doc_num::<u32>("reaper", "max_attempts")
    );
    assert_eq!(r.retry.base, doc_dur("reaper", "backoff_base"));
    assert_eq!(r.retry.max, doc_dur("reaper", "backoff_max"));
    assert_eq!(
        cfg.max_token_bytes,
        doc_num::<usize>("bearer", "max_token_bytes")
    );
    assert_eq!(cfg.key_fetch_timeout, doc_dur("bearer", "fetch_timeout"));
    assert_eq!(cfg.anomaly.risk_window, doc_dur("anomaly", "risk_window"));
    assert_eq!(cfg.anomaly.deny_for, doc_dur("anomaly", "deny_for"));
    let w = cfg.workload_api.as_ref().expect("workload_api");
    assert_eq!(
        w.initial_timeout,
        doc_dur("workload_api", "initial_timeout")
    );
    assert_eq!(w.backoff_min, doc_dur("workload_api", "backoff_min"));
    assert_eq!(w.backoff_max, doc_dur("workload_api", "backoff_max"));
    let (_, svid) = &cfg.jwt_svid[0];
    assert_eq!(svid.rules.leeway, doc_dur("jwt_svid", "leeway"));
    assert_eq!(svid.cache.ttl, doc_dur("jwt_svid", "refresh_interval"));
    assert_eq!(svid.cache.cooldown, doc_dur("jwt_svid", "refetch_cooldown"));
    assert_eq!(
        svid.cache.max_keys,
        doc_num::<usize>("jwt_svid", "max_keys")
    );
    assert_eq!(
        svid.rules.allow_multiple_audiences,
        doc_num::<bool>("jwt_svid", "allow_multiple_audiences")
    );
    assert_eq!(
        svid.rules.single_use,
        doc_num::<bool>("jwt_svid", "single_use")
    );
    let (_, oidc) = &cfg.oidc_issuers[0];
    assert_eq!(oidc.rules.leeway, doc_dur("oidc_issuers", "leeway"));
    assert_eq!(oidc.cache.ttl, doc_dur("oidc_issuers", "jwks_ttl"));
    assert_eq!(
        oidc.cache.cooldown,
        doc_dur("oidc_issuers", "refetch_cooldown")
    );
    assert_eq!(
        oidc.cache.max_keys,
        doc_num::<usize>("oidc_issuers", "max_keys")
    );
    assert_eq!(
        oidc.rules.allow_multiple_audiences,
        doc_num::<bool>("oidc_issuers", "allow_multiple_audiences")
    );
    assert_eq!(
        oidc.rules.single_use,
        doc_num::<bool>("oidc_issuers", "single_use")
    );
    assert_eq!(
        oidc.rules.max_exchange_ttl,
        doc_dur("oidc_issuers", "max_exchange_ttl")
    );
    assert!(oidc.rules.job_claims.is_empty(), "job_claims default: none");
    let hook = cfg.webhook.as_ref().expect("webhook");
    assert_eq!(hook.timeout, doc_dur("webhook", "timeout"));
    assert_eq!(hook.max_attempts, doc_num::<u32>("webhook", "max_attempts"));
}

/// The providers with only their required keys parse, and take the documented
/// defaults.
#[test]
fn providers_with_required_keys_only_take_the_documented_defaults() {
    let text = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
         [[trust_domains]]\nname = \"example.org\"\nbundle_file = \"b.pem\"\n\
         [providers.jwt]\nissuer = \"https://mayfly.test\"\nsigning_key_file = \"j.pem\"\n\
         [providers.vault]\naddress = \"https://vault.example.org\"\ntoken_file = \"t\"\n\
         [providers.vault.targets.db]\nkind = \"dynamic\"\npath = \"database/creds/ro\"\nmax_ttl = \"1h\"\n\
         [providers.aws]\nregion = \"us-east-1\"\n\
         [providers.aws.targets.r]\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n";
    let cfg = Config::from_toml(text, Path::new("test.toml"))
        .expect("providers with only the required keys parse");
    let vault = cfg.vault.as_ref().expect("vault");
    assert_eq!(vault.timeout, doc_dur("providers.vault", "timeout"));
    let aws = cfg.aws.as_ref().expect("aws");
    assert_eq!(aws.timeout, doc_dur("providers.aws", "timeout"));
    assert_eq!(
        aws.prune_interval,
        doc_dur("providers.aws", "prune_interval")
    );
    assert_eq!(
        aws.deny_policy_name,
        documented("providers.aws", "deny_policy_name")
    );
}
