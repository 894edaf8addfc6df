//! The X.509 trust: `[[trust_domains]]` (whose SVIDs are accepted and where each bundle
//! comes from: a file, a SPIFFE bundle endpoint or the Workload API) and `[workload_api]`,
//! with the checks that span these tables and `[[jwt_svid]]`.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

use super::issuers::{self, IssuerConfig, RawJwtSvid, RawOidcIssuer};
use super::{ConfigError, check_url, defaults, dur, invalid};
use crate::identity::bundle_endpoint::{EndpointAuth, EndpointSpec};
use crate::identity::jwks::KeySourceSpec;
use crate::identity::workload_api::WorkloadApiSettings;
use crate::identity::{SpiffeId, TrustDomain};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrustDomain {
    pub name: String,
    /// Where the X.509 bundle comes from; inferred from the keys when absent.
    #[serde(default)]
    pub source: Option<RawBundleSource>,
    /// PEM bundle (`source = "file"`), or the bootstrap bundle of an endpoint.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
    #[serde(default)]
    pub bundle_endpoint: Option<String>,
    #[serde(default)]
    pub endpoint_profile: Option<RawEndpointProfile>,
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    pub endpoint_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub refresh_min: Option<String>,
    #[serde(default)]
    pub refresh_max: Option<String>,
}

/// Where a trust domain's bundle comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawBundleSource {
    File,
    Endpoint,
    WorkloadApi,
}

impl RawBundleSource {
    /// The configured source, or the one the keys imply: an endpoint if one is named,
    /// else a file.
    pub(super) fn resolve(explicit: Option<Self>, has_endpoint: bool) -> Self {
        explicit.unwrap_or(if has_endpoint {
            Self::Endpoint
        } else {
            Self::File
        })
    }
}

/// How a SPIFFE bundle endpoint server is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEndpointProfile {
    HttpsWeb,
    HttpsSpiffe,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkloadApi {
    /// `unix:///path/to/agent.sock` (the SPIRE agent's public socket).
    pub socket: String,
    #[serde(default = "defaults::wapi_initial_timeout")]
    pub initial_timeout: String,
    #[serde(default = "defaults::wapi_backoff_min")]
    pub backoff_min: String,
    #[serde(default = "defaults::wapi_backoff_max")]
    pub backoff_max: String,
}

/// Where a trust domain's X.509 bundle comes from, validated.
#[derive(Debug, Clone)]
pub enum X509Source {
    /// A PEM file, re-read when it changes.
    File(PathBuf),
    /// A SPIFFE bundle endpoint, refreshed on its `spiffe_refresh_hint`.
    Endpoint(EndpointSpec),
    /// Streamed from the SPIFFE Workload API (`[workload_api]`).
    WorkloadApi,
}

/// A validated `[[trust_domains]]` entry.
#[derive(Debug, Clone)]
pub struct TrustDomainConfig {
    pub name: TrustDomain,
    pub source: X509Source,
}

/// Which source-specific keys a bundle entry set: each source accepts only its own.
pub(super) struct SourceFields {
    pub bundle_file: bool,
    pub bundle_endpoint: bool,
    pub endpoint_profile: bool,
    pub endpoint_spiffe_id: bool,
    pub endpoint_ca_file: bool,
    pub refresh_bounds: bool,
    pub allow_insecure_http: bool,
}

impl SourceFields {
    pub(super) fn check(
        &self,
        table: &'static str,
        td: &TrustDomain,
        source: RawBundleSource,
    ) -> Result<(), ConfigError> {
        let endpoint_only = [
            ("bundle_endpoint", self.bundle_endpoint),
            ("endpoint_profile", self.endpoint_profile),
            ("endpoint_spiffe_id", self.endpoint_spiffe_id),
            ("endpoint_ca_file", self.endpoint_ca_file),
            ("refresh_min/refresh_max", self.refresh_bounds),
            ("allow_insecure_http", self.allow_insecure_http),
        ];
        let (name, forbidden): (&str, Vec<(&str, bool)>) = match source {
            RawBundleSource::File => ("file", endpoint_only.to_vec()),
            RawBundleSource::Endpoint => ("endpoint", Vec::new()),
            RawBundleSource::WorkloadApi => {
                let mut all = endpoint_only.to_vec();
                all.push(("bundle_file", self.bundle_file));
                ("workload_api", all)
            }
        };
        if let Some((key, _)) = forbidden.iter().find(|(_, set)| *set) {
            return Err(invalid(
                table,
                format!("{td}: {key} does not apply to source = \"{name}\""),
            ));
        }
        Ok(())
    }
}

pub(super) fn endpoint_auth_config(
    table: &'static str,
    td: &TrustDomain,
    profile: Option<RawEndpointProfile>,
    spiffe_id: Option<String>,
    ca_file: Option<PathBuf>,
) -> Result<EndpointAuth, ConfigError> {
    match (profile.unwrap_or(RawEndpointProfile::HttpsWeb), spiffe_id) {
        (RawEndpointProfile::HttpsWeb, None) => Ok(EndpointAuth::HttpsWeb { ca_file }),
        (RawEndpointProfile::HttpsWeb, Some(_)) => Err(invalid(
            table,
            format!("{td}: endpoint_spiffe_id needs endpoint_profile = \"https_spiffe\""),
        )),
        (RawEndpointProfile::HttpsSpiffe, None) => Err(invalid(
            table,
            format!("{td}: endpoint_profile = \"https_spiffe\" needs endpoint_spiffe_id"),
        )),
        (RawEndpointProfile::HttpsSpiffe, Some(id)) => {
            if ca_file.is_some() {
                return Err(invalid(
                    table,
                    format!(
                        "{td}: endpoint_ca_file is for https_web; https_spiffe trusts the bundle of the endpoint's trust domain"
                    ),
                ));
            }
            let id = SpiffeId::parse(&id)
                .map_err(|e| invalid(table, format!("{td}: endpoint_spiffe_id {id:?}: {e}")))?;
            Ok(EndpointAuth::HttpsSpiffe { id })
        }
    }
}

fn trust_domain_config(r: RawTrustDomain) -> Result<TrustDomainConfig, ConfigError> {
    let name = TrustDomain::parse(&r.name).map_err(|e| invalid("trust_domains.name", e))?;
    let source = RawBundleSource::resolve(r.source, r.bundle_endpoint.is_some());
    let fields = SourceFields {
        bundle_file: r.bundle_file.is_some(),
        bundle_endpoint: r.bundle_endpoint.is_some(),
        endpoint_profile: r.endpoint_profile.is_some(),
        endpoint_spiffe_id: r.endpoint_spiffe_id.is_some(),
        endpoint_ca_file: r.endpoint_ca_file.is_some(),
        refresh_bounds: r.refresh_min.is_some() || r.refresh_max.is_some(),
        allow_insecure_http: false,
    };
    fields.check("trust_domains", &name, source)?;
    let source = match source {
        RawBundleSource::File => X509Source::File(r.bundle_file.ok_or_else(|| {
            invalid(
                "trust_domains",
                format!("{name}: source = \"file\" needs bundle_file"),
            )
        })?),
        RawBundleSource::WorkloadApi => X509Source::WorkloadApi,
        RawBundleSource::Endpoint => endpoint_source(&name, r)?,
    };
    Ok(TrustDomainConfig { name, source })
}

/// A `[[trust_domains]]` entry with `source = "endpoint"`.
fn endpoint_source(name: &TrustDomain, r: RawTrustDomain) -> Result<X509Source, ConfigError> {
    let url = r.bundle_endpoint.ok_or_else(|| {
        invalid(
            "trust_domains",
            format!("{name}: source = \"endpoint\" needs bundle_endpoint"),
        )
    })?;
    check_url("trust_domains.bundle_endpoint", &url, false)?;
    let auth = endpoint_auth_config(
        "trust_domains",
        name,
        r.endpoint_profile,
        r.endpoint_spiffe_id,
        r.endpoint_ca_file,
    )?;
    if let EndpointAuth::HttpsSpiffe { id } = &auth
        && id.trust_domain() == name.as_str()
        && r.bundle_file.is_none()
    {
        return Err(invalid(
            "trust_domains",
            format!(
                "{name}: an https_spiffe endpoint of the trust domain itself needs bundle_file, the bootstrap bundle its first SVID is verified with"
            ),
        ));
    }
    let refresh_min = dur(
        "trust_domains.refresh_min",
        r.refresh_min.as_deref().unwrap_or("30s"),
    )?;
    let refresh_max = dur(
        "trust_domains.refresh_max",
        r.refresh_max.as_deref().unwrap_or("1h"),
    )?;
    if refresh_min < Duration::from_secs(1)
        || refresh_min > refresh_max
        || refresh_max > Duration::from_secs(24 * 3600)
    {
        return Err(invalid(
            "trust_domains.refresh_min",
            format!("{name}: need 1s <= refresh_min <= refresh_max <= 24h"),
        ));
    }
    Ok(X509Source::Endpoint(EndpointSpec {
        url,
        auth,
        bootstrap: r.bundle_file,
        refresh_min,
        refresh_max,
    }))
}

fn workload_api_config(r: RawWorkloadApi) -> Result<WorkloadApiSettings, ConfigError> {
    // Unix sockets only: the Workload API over TCP has no authentication of either side.
    let path = r
        .socket
        .strip_prefix("unix://")
        .or_else(|| r.socket.strip_prefix("unix:"))
        .filter(|p| p.starts_with('/') && p.len() > 1)
        .ok_or_else(|| {
            invalid(
                "workload_api.socket",
                format!(
                    "{:?}: must be unix:///absolute/path (unix sockets only)",
                    r.socket
                ),
            )
        })?;
    let settings = WorkloadApiSettings {
        socket: format!("unix://{path}"),
        initial_timeout: dur("workload_api.initial_timeout", &r.initial_timeout)?,
        backoff_min: dur("workload_api.backoff_min", &r.backoff_min)?,
        backoff_max: dur("workload_api.backoff_max", &r.backoff_max)?,
    };
    if settings.initial_timeout.is_zero() || settings.initial_timeout > Duration::from_secs(600) {
        return Err(invalid("workload_api.initial_timeout", "must be 1ms..=10m"));
    }
    if settings.backoff_min.is_zero()
        || settings.backoff_min > settings.backoff_max
        || settings.backoff_max > Duration::from_secs(600)
    {
        return Err(invalid(
            "workload_api.backoff_min",
            "need 0 < backoff_min <= backoff_max <= 10m",
        ));
    }
    Ok(settings)
}

/// The tables that name trusted identities, parsed together: an entry of one may refer
/// to another.
pub(super) struct TrustTables {
    pub trust_domains: Vec<RawTrustDomain>,
    pub jwt_svid: Vec<RawJwtSvid>,
    pub workload_api: Option<RawWorkloadApi>,
    pub oidc_issuers: Vec<RawOidcIssuer>,
}

/// [`TrustTables`], validated.
pub(super) struct Trust {
    pub trust_domains: Vec<TrustDomainConfig>,
    pub workload_api: Option<WorkloadApiSettings>,
    pub jwt_svid: Vec<(TrustDomain, IssuerConfig)>,
    pub oidc_issuers: Vec<(String, IssuerConfig)>,
}

pub(super) fn trust(raw: TrustTables) -> Result<Trust, ConfigError> {
    let trust_domains = trust_domains(raw.trust_domains)?;
    let jwt_svid = issuers::jwt_svids(raw.jwt_svid)?;
    check_endpoint_ids(&trust_domains, &jwt_svid)?;
    let workload_api = workload_api(raw.workload_api, &trust_domains, &jwt_svid)?;
    Ok(Trust {
        trust_domains,
        workload_api,
        jwt_svid,
        oidc_issuers: issuers::oidc_issuers(raw.oidc_issuers)?,
    })
}

/// Every `[[trust_domains]]` entry: at least one, each name once.
fn trust_domains(raw: Vec<RawTrustDomain>) -> Result<Vec<TrustDomainConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "trust_domains",
            "at least one trust domain is required",
        ));
    }
    let mut trust_domains: Vec<TrustDomainConfig> = Vec::new();
    for td in raw {
        let td = trust_domain_config(td)?;
        if trust_domains.iter().any(|t| t.name == td.name) {
            return Err(invalid(
                "trust_domains.name",
                format!("{} is configured twice", td.name),
            ));
        }
        trust_domains.push(td);
    }
    Ok(trust_domains)
}

/// An https_spiffe endpoint is authenticated with the X.509 bundle of its SPIFFE ID's
/// trust domain: that trust domain must be one Mayfly trusts.
fn check_endpoint_ids(
    trust_domains: &[TrustDomainConfig],
    jwt_svid: &[(TrustDomain, IssuerConfig)],
) -> Result<(), ConfigError> {
    let endpoint_ids = trust_domains
        .iter()
        .filter_map(|t| match &t.source {
            X509Source::Endpoint(EndpointSpec {
                auth: EndpointAuth::HttpsSpiffe { id },
                ..
            }) => Some(("trust_domains", &t.name, id)),
            _ => None,
        })
        .chain(
            jwt_svid
                .iter()
                .filter_map(|(td, c)| match &c.endpoint_auth {
                    EndpointAuth::HttpsSpiffe { id } => Some(("jwt_svid", td, id)),
                    EndpointAuth::HttpsWeb { .. } => None,
                }),
        );
    for (table, td, id) in endpoint_ids {
        if !trust_domains
            .iter()
            .any(|t| t.name.as_str() == id.trust_domain())
        {
            return Err(invalid(
                table,
                format!(
                    "{td}: endpoint_spiffe_id {id} names trust domain {}, which is not in [[trust_domains]]",
                    id.trust_domain()
                ),
            ));
        }
    }
    Ok(())
}

/// `[workload_api]`: present exactly when some trust domain or jwt_svid uses it.
fn workload_api(
    raw: Option<RawWorkloadApi>,
    trust_domains: &[TrustDomainConfig],
    jwt_svid: &[(TrustDomain, IssuerConfig)],
) -> Result<Option<WorkloadApiSettings>, ConfigError> {
    let uses_workload_api = trust_domains
        .iter()
        .any(|t| matches!(t.source, X509Source::WorkloadApi))
        || jwt_svid
            .iter()
            .any(|(_, c)| c.source == KeySourceSpec::Pushed);
    let workload_api = raw.map(workload_api_config).transpose()?;
    match (&workload_api, uses_workload_api) {
        (None, true) => Err(invalid(
            "workload_api",
            "source = \"workload_api\" is used but there is no [workload_api] table (socket)",
        )),
        (Some(_), false) => Err(invalid(
            "workload_api",
            "[workload_api] is set but no trust domain or jwt_svid has source = \"workload_api\"",
        )),
        _ => Ok(workload_api),
    }
}
