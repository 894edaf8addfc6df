//! The running broker, built from a validated [`Config`]: the lease store, audit log,
//! providers, identity verifiers and their key and bundle sources, the [`Broker`] and the
//! TLS serving configuration. [`App::build`] starts nothing unless every piece is valid;
//! [`serve`] runs the result until shutdown.

mod serve;

pub use serve::serve;

use std::path::PathBuf;
use std::sync::Arc;

use crate::audit::AuditLog;
use crate::broker::{Broker, BrokerParts, FaultHook};
use crate::config::{Config, ConfigError, IssuerConfig, JwtKeys, StoreConfig, X509Source, invalid};
use crate::identity::bearer::{BearerVerifier, TrustedIssuer};
use crate::identity::bundle_endpoint::{EndpointAuth, EndpointSource};
use crate::identity::jwks::{KeyCache, KeySourceSpec};
use crate::identity::workload_api::{JwtTarget, Targets, WorkloadApiSource};
use crate::identity::{LiveBundles, TrustDomain};
use crate::lease::AuditJournal;
use crate::lease::embedded::EmbeddedStore;
use crate::lease::redis::RedisStore;
use crate::lease::{LeaseStore, StoreError};
use crate::policy::PolicyEngine;
use crate::provider::Providers;
use crate::provider::jwt::{JwtIssuer, JwtProvider, SigningKey};
use crate::revocation::Revoker;

/// The built broker, ready to serve.
pub struct App {
    pub broker: Arc<Broker>,
    pub bearer: Arc<BearerVerifier>,
    pub store: Arc<dyn LeaseStore>,
    pub revoker: Arc<Revoker>,
    pub policy: Arc<PolicyEngine>,
    pub audit: AuditLog,
    /// X.509 trust bundles, kept current while running by their sources.
    pub bundles: Arc<LiveBundles>,
    /// The bundle endpoint and Workload API tasks; they stop when the `App` is dropped.
    pub bundle_sources: BundleSources,
    /// The serving certificate, re-read while running when its files change.
    pub serving: Arc<crate::api::tls::ServingCert>,
    pub tls: Arc<rustls::ServerConfig>,
    pub config: Config,
}

/// A task aborted when dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The running bundle sources (file-sourced bundles are re-read by `serve`).
#[derive(Default)]
pub struct BundleSources {
    pub workload_api: Option<WorkloadApiSource>,
    pub tasks: Vec<AbortOnDrop>,
}

impl App {
    /// Builds every component. Fails (and nothing starts) if any piece is invalid.
    pub async fn build(config: &Config) -> Result<App, crate::Error> {
        Self::build_with_faults(config, None).await
    }

    /// `build`, with a fault-injection hook in the broker (crash-safety tests).
    pub async fn build_with_faults(
        config: &Config,
        faults: Option<FaultHook>,
    ) -> Result<App, crate::Error> {
        let files: Vec<(TrustDomain, PathBuf)> = config
            .trust_domains
            .iter()
            .filter_map(|t| match &t.source {
                X509Source::File(p) => Some((t.name.clone(), p.clone())),
                _ => None,
            })
            .collect();
        let bundles = Arc::new(LiveBundles::load(&files)?);
        let bearer = bearer_verifier(config, &bundles)?;
        let bundle_sources = start_bundle_sources(config, &bundles, &bearer).await?;
        let policy = Arc::new(PolicyEngine::load(&config.policy_dir)?);
        let (store, journal) = open_store_with_journal(&config.store).await?;
        let audit = open_audit(config, journal)?;
        let jwt = Arc::new(jwt_issuer(config)?);
        let dpop = Arc::new(crate::identity::dpop::DpopVerifier::new(dpop_config(
            config,
        )?));
        let providers = providers(config, jwt.clone(), &store, &audit).await?;
        let revoker = Arc::new(Revoker::new(
            store.clone(),
            providers.clone(),
            audit.clone(),
            config.reaper.clone(),
        ));
        let broker = Arc::new(Broker::new(BrokerParts {
            store: store.clone(),
            policy: policy.clone(),
            providers,
            revoker: revoker.clone(),
            jwt,
            audit: audit.clone(),
            operators: config.operators.clone(),
            limits: config.limits.clone(),
            faults,
            anomaly: Arc::new(crate::anomaly::AnomalyEngine::new(
                config.anomaly.clone(),
                store.clone(),
            )),
            dpop,
            ci_task_key: ci_task_key(&store).await?,
        }));
        let serving = crate::api::tls::ServingCert::load(&config.tls_cert, &config.tls_key)?;
        let tls = crate::api::tls::server_config(serving.clone())?;
        Ok(App {
            bearer: Arc::new(bearer),
            broker,
            store,
            revoker,
            policy,
            audit,
            bundles,
            bundle_sources,
            serving,
            tls,
            config: config.clone(),
        })
    }
}

/// Opens (connects to) the lease store.
pub async fn open_store(
    store: &StoreConfig,
) -> Result<Arc<dyn LeaseStore>, crate::lease::StoreError> {
    Ok(match store {
        StoreConfig::Embedded { path, cache_bytes } => {
            Arc::new(EmbeddedStore::open_with_cache(path, *cache_bytes)?)
        }
        StoreConfig::Redis(cfg) => Arc::new(RedisStore::connect(cfg).await?),
    })
}

/// The lease store and, for the embedded store, its audit journal: the audit log then
/// commits each record with the state change it describes (one durable write per
/// credential) and the file is fed from the journal. Redis keeps no journal: a record
/// is appended and fsynced to the file on its own.
pub async fn open_store_with_journal(
    store: &StoreConfig,
) -> Result<(Arc<dyn LeaseStore>, Option<Arc<dyn AuditJournal>>), crate::lease::StoreError> {
    Ok(match store {
        StoreConfig::Embedded { path, cache_bytes } => {
            let s = Arc::new(EmbeddedStore::open_with_cache(path, *cache_bytes)?);
            (s.clone(), Some(s))
        }
        StoreConfig::Redis(cfg) => (Arc::new(RedisStore::connect(cfg).await?), None),
    })
}

/// The audit log, with the webhook tap when one is configured; journaled into the store
/// when it has a journal.
fn open_audit(
    config: &Config,
    journal: Option<Arc<dyn AuditJournal>>,
) -> Result<AuditLog, crate::Error> {
    let tap = config
        .webhook
        .as_ref()
        .map(crate::webhook::Webhook::start)
        .transpose()
        .map_err(|e| invalid("webhook", e))?;
    Ok(match journal {
        Some(j) => AuditLog::open_journaled(
            &config.audit_path,
            &config.node_id,
            tap,
            config.audit_rotation,
            j,
        )?,
        None => AuditLog::open_rotating(
            &config.audit_path,
            &config.node_id,
            tap,
            config.audit_rotation,
        )?,
    })
}

/// The JWT provider's issuer, with its fixed key (generated if asked) or its key set.
fn jwt_issuer(config: &Config) -> Result<JwtIssuer, crate::Error> {
    Ok(match &config.jwt_key {
        JwtKeys::File(path) => JwtIssuer::new(
            config.jwt_issuer.clone(),
            SigningKey::load_or_generate(path, config.jwt_generate)?,
        ),
        JwtKeys::Dir(dir) => JwtIssuer::from_dir(config.jwt_issuer.clone(), dir.clone())?,
    })
}

/// Every configured provider behind its rate limit: JWT always, Vault and AWS when set.
async fn providers(
    config: &Config,
    jwt: Arc<JwtIssuer>,
    store: &Arc<dyn LeaseStore>,
    audit: &AuditLog,
) -> Result<Providers, crate::Error> {
    let mut providers = Providers::default();
    providers.insert_limited(
        Arc::new(JwtProvider::with_bindings(jwt, config.jwt_bindings.clone())),
        config.jwt_rate,
    );
    if let Some(v) = &config.vault {
        let p = crate::provider::vault::VaultProvider::new(v.clone())
            .map_err(|e| invalid("providers.vault", e))?;
        let rate = p.rate();
        providers.insert_limited(Arc::new(p), rate);
    }
    if let Some(a) = &config.aws {
        let p = crate::provider::aws::AwsProvider::start(a.clone(), store.clone(), audit.clone())
            .await
            .map_err(|e| invalid("providers.aws", e))?;
        let rate = p.rate();
        providers.insert_limited(p, rate);
    }
    Ok(providers)
}

/// The DPoP verifier's settings, with the nonce key read from its file.
fn dpop_config(config: &Config) -> Result<crate::identity::dpop::DpopConfig, ConfigError> {
    let dpop = &config.dpop;
    let nonce = match &dpop.nonce_secret_file {
        None => None,
        Some(path) => {
            let secret = std::fs::read(path).map_err(|e| {
                invalid("dpop.nonce_secret_file", format!("{}: {e}", path.display()))
            })?;
            Some(
                crate::identity::dpop::NonceKey::new(&secret, dpop.nonce_lifetime)
                    .map_err(|e| invalid("dpop.nonce_secret_file", e))?,
            )
        }
    };
    Ok(crate::identity::dpop::DpopConfig {
        max_age: dpop.max_age,
        leeway: dpop.leeway,
        nonce,
    })
}

/// The bearer-token verifier: one key cache per trust domain and issuer. Keys are
/// fetched lazily (an issuer that is down at start-up does not stop the broker),
/// except those the Workload API pushes. `bundles` authenticates `https_spiffe`
/// bundle endpoints.
pub fn bearer_verifier(
    config: &Config,
    bundles: &Arc<LiveBundles>,
) -> Result<BearerVerifier, crate::Error> {
    let http = reqwest::Client::builder()
        .timeout(config.key_fetch_timeout)
        // A JWKS location is configuration; a redirect must not move it elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| crate::Error::Tls(format!("key fetch client: {e}")))?;
    let mut v = BearerVerifier::new(config.max_token_bytes);
    let issuer = |c: &IssuerConfig, spiffe: bool| -> Result<TrustedIssuer, crate::Error> {
        let client = match (&c.source, &c.endpoint_auth) {
            (KeySourceSpec::Url(url), auth @ EndpointAuth::HttpsSpiffe { .. })
            | (KeySourceSpec::Url(url), auth @ EndpointAuth::HttpsWeb { ca_file: Some(_) }) => {
                crate::identity::bundle_endpoint::http_client(
                    url,
                    auth,
                    bundles,
                    config.key_fetch_timeout,
                )?
            }
            _ => http.clone(),
        };
        Ok(TrustedIssuer {
            rules: c.rules.clone(),
            keys: Arc::new(KeyCache::new(
                c.source.clone(),
                c.cache.clone(),
                spiffe,
                client,
            )),
        })
    };
    for (td, c) in &config.jwt_svid {
        v.add_trust_domain(td.as_str(), issuer(c, true)?);
    }
    for (iss, c) in &config.oidc_issuers {
        v.add_oidc_issuer(iss, issuer(c, false)?);
    }
    Ok(v)
}

/// Loads every trust domain's first X.509 bundle (and the Workload API's JWT
/// bundles) and starts the tasks that keep them current. Fails — and the broker
/// does not start — when a source without a fallback yields nothing.
async fn start_bundle_sources(
    config: &Config,
    bundles: &Arc<LiveBundles>,
    bearer: &BearerVerifier,
) -> Result<BundleSources, crate::Error> {
    let mut sources = BundleSources::default();
    // The Workload API first: an https_spiffe endpoint may be authenticated with a
    // bundle it serves.
    if let Some(settings) = &config.workload_api {
        let x509 = config
            .trust_domains
            .iter()
            .filter(|t| matches!(t.source, X509Source::WorkloadApi))
            .map(|t| t.name.clone())
            .collect();
        let jwt = config
            .jwt_svid
            .iter()
            .filter(|(_, c)| c.source == KeySourceSpec::Pushed)
            .filter_map(|(td, c)| {
                bearer.svid_keys(td.as_str()).map(|keys| JwtTarget {
                    trust_domain: td.clone(),
                    keys: keys.clone(),
                    max_keys: c.cache.max_keys,
                })
            })
            .collect();
        let source = crate::identity::workload_api::start(
            settings.clone(),
            Targets { x509, jwt },
            bundles.clone(),
        )
        .await?;
        sources.workload_api = Some(source);
    }
    for t in &config.trust_domains {
        let X509Source::Endpoint(spec) = &t.source else {
            continue;
        };
        let mut source = EndpointSource::new(
            t.name.clone(),
            spec.clone(),
            bundles.clone(),
            config.key_fetch_timeout,
        )?;
        let next = source.initial().await?;
        sources.tasks.push(AbortOnDrop(source.spawn(next)));
    }
    Ok(sources)
}

/// The key of implicit CI task ids, one per store: the first replica to start makes it,
/// every other replica (and every restart) reads the same one, so a job's retry finds its
/// task on any replica. Independent of the JWT signing key, which rotates replica by
/// replica. Whoever can read the store can read it; that reader already sees every task.
async fn ci_task_key(store: &Arc<dyn LeaseStore>) -> Result<[u8; 32], crate::Error> {
    let mut candidate = [0u8; 32];
    aws_lc_rs::rand::fill(&mut candidate)
        .map_err(|_| StoreError::Unavailable("no randomness for the CI task key".into()))?;
    Ok(store.shared_secret(CI_TASK_KEY, candidate).await?)
}

/// The store's name of that key (changing it changes every implicit task id).
const CI_TASK_KEY: &str = "ci-task-id-v1";
