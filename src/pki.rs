//! A small PKI for `mayfly dev` and the tests: a CA and X.509-SVIDs minted with rcgen.
//! Nothing here is used by `mayfly serve`; production SVIDs come from SPIRE or any CA.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use time::{Duration, OffsetDateTime};

use crate::secret::Secret;

pub use rcgen::Error as PkiError;

/// A certificate authority that can issue SVIDs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: Secret<String>,
}

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Secret<String>,
}

/// What to put in a leaf. `LeafSpec::svid` gives a valid client SVID; tests change one
/// field at a time to break one rule at a time.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub is_ca: bool,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub extended: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A client X.509-SVID for `spiffe_id`, valid from an hour ago for `days`.
    pub fn svid(spiffe_id: &str, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: vec![spiffe_id.to_string()],
            dns: vec![],
            ips: vec![],
            is_ca: false,
            key_usages: vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            extended: vec![ExtendedKeyUsagePurpose::ClientAuth],
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// A TLS server certificate (also an SVID when `spiffe_id` is given).
    pub fn server(spiffe_id: Option<&str>, dns: &[&str], ips: &[IpAddr], days: i64) -> Self {
        let mut s = Self::svid(spiffe_id.unwrap_or_default(), days);
        if spiffe_id.is_none() {
            s.uris.clear();
        }
        s.dns = dns.iter().map(|d| d.to_string()).collect();
        s.ips = ips.to_vec();
        s.extended = vec![ExtendedKeyUsagePurpose::ServerAuth];
        s
    }
}

fn ca_params(common_name: &str, trust_domain: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    Ok(params)
}

impl Ca {
    /// A new self-signed CA whose SPIFFE ID is the trust domain's.
    pub fn generate(common_name: &str, trust_domain: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params(common_name, trust_domain)?;
        let cert = params.self_signed(&key)?;
        let key_pem = Secret::new(key.serialize_pem());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA loaded back from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: Secret::new(key_pem.to_string()),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &Secret<String> {
        &self.key_pem
    }

    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            spec.uris
                .first()
                .or(spec.dns.first())
                .map_or("mayfly", String::as_str),
        );
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for u in &spec.uris {
            sans.push(SanType::URI(u.as_str().try_into()?));
        }
        for d in &spec.dns {
            sans.push(SanType::DnsName(d.as_str().try_into()?));
        }
        for ip in &spec.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.extended.clone();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Secret::new(key.serialize_pem()),
        })
    }
}
