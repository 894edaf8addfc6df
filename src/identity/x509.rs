//! X.509-SVID verification.
//!
//! Two steps, deliberately split:
//! 1. During the TLS handshake, [`HandshakeVerifier`] checks only that the peer holds the
//!    private key of the leaf it presented (the CertificateVerify signature). It accepts
//!    any chain, so that a bad SVID can be refused afterwards with a *specific* error.
//! 2. After the handshake, [`verify_svid`] applies every SVID rule and chains the leaf to
//!    the bundle of the trust domain its SPIFFE ID names. Only its success yields a
//!    `VerifiedCaller`; a connection whose SVID failed carries the `VerifyError`, and every
//!    route that needs an identity answers 401 with that error's code.
//!
//! Path validation is rustls-webpki's (signatures, validity of every certificate, CA flag,
//! pathLenConstraint, name constraints, EKU). webpki 0.103 — the release rustls 0.23
//! builds on — ignores the key usage of issuers (the check exists only in the 0.104
//! pre-releases), so [`issuer_rules`] checks keyCertSign on every signing certificate of
//! each candidate path itself, as RFC 5280 §6.1.4(n) and SPIFFE X509-SVID §4.3 require.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::LazyLock;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use super::{AuthMethod, Posture, Principal, SpiffeId, TrustBundles, VerifiedCaller, VerifyError};
use crate::secret::fingerprint;

/// Verifies a client's X.509-SVID chain (leaf first) at time `now`.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    source: Option<IpAddr>,
    now: UnixTime,
) -> Result<VerifiedCaller, VerifyError> {
    let (leaf_der, intermediates) = chain.split_first().ok_or(VerifyError::ClientCertRequired)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;

    let id = svid_spiffe_id(&leaf)?;
    if id.path().is_empty() {
        return Err(VerifyError::LeafWithoutPath);
    }

    let basic = leaf
        .basic_constraints()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if basic.is_some_and(|bc| bc.value.ca) {
        return Err(VerifyError::LeafIsCa);
    }
    let usage = leaf
        .key_usage()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?
        .ok_or(VerifyError::MissingDigitalSignature)?;
    if !usage.value.digital_signature() {
        return Err(VerifyError::MissingDigitalSignature);
    }
    if usage.value.key_cert_sign() || usage.value.crl_sign() {
        return Err(VerifyError::ForbiddenKeyUsage);
    }

    let domain = bundles
        .domain(id.trust_domain())
        .ok_or_else(|| VerifyError::UnknownTrustDomain(id.trust_domain().to_string()))?;
    // The leaf's own validity first, so that a validity failure from path validation
    // below can only be an intermediate's.
    let at = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if at < leaf.validity().not_before.timestamp() {
        return Err(VerifyError::NotYetValid);
    }
    if at > leaf.validity().not_after.timestamp() {
        return Err(VerifyError::Expired);
    }
    verify_path(leaf_der, intermediates, &domain.roots.roots, now)?;

    let not_after = OffsetDateTime::from_unix_timestamp(leaf.validity().not_after.timestamp())
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let posture = Posture {
        method: AuthMethod::X509Svid,
        trust_domain: id.trust_domain().to_string(),
        source,
        credential_not_after: not_after,
        credential_fingerprint: fingerprint(leaf_der),
        issuer: None,
        claims: Default::default(),
    };
    Ok(VerifiedCaller::new(Principal::Spiffe(id), posture).with_certificate(leaf_der))
}

/// The SPIFFE ID of an SVID leaf: its one URI SAN, which must be a valid SPIFFE ID (never
/// the first of several).
pub(crate) fn svid_spiffe_id(
    leaf: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<SpiffeId, VerifyError> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(VerifyError::UriSanCount(uris.len()));
    };
    Ok(SpiffeId::parse(uri)?)
}

static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> = LazyLock::new(|| {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
});

/// RFC 5280 path validation of `leaf` to one of `anchors`, for client authentication,
/// with [`issuer_rules`] applied to every candidate path webpki finds.
pub(crate) fn verify_path(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[rustls::pki_types::TrustAnchor<'_>],
    now: UnixTime,
) -> Result<(), VerifyError> {
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| VerifyError::Malformed(format!("{e:?}")))?;
    // webpki's errors cannot carry ours: the rule a candidate path broke is kept here.
    let broken: RefCell<Option<VerifyError>> = RefCell::new(None);
    let check = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
        for cert in path.intermediate_certificates() {
            if let Err(e) = issuer_rules(cert.der().as_ref()) {
                *broken.borrow_mut() = Some(e);
                return Err(webpki::Error::UnknownIssuer);
            }
        }
        Ok(())
    };
    let result = ee.verify_for_usage(
        ALGORITHMS.all,
        anchors,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        Some(&check),
    );
    match result {
        Ok(_) => Ok(()),
        Err(e) => Err(broken.into_inner().unwrap_or_else(|| chain_error(e))),
    }
}

/// What webpki leaves unchecked on a certificate that signs another one on the path:
/// the key usage extension must be present and assert keyCertSign (SPIFFE X509-SVID
/// §4.3: "signing certificates MUST set keyCertSign"; RFC 5280 §6.1.4(n)).
fn issuer_rules(der: &[u8]) -> Result<(), VerifyError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let usage = cert
        .key_usage()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    match usage {
        Some(ku) if ku.value.key_cert_sign() => Ok(()),
        _ => Err(VerifyError::IssuerNotCertSigner),
    }
}

/// webpki's verdict as a specific refusal. The leaf's validity, CA flag and key usage
/// were checked before, so validity and CA-flag failures here are an intermediate's.
fn chain_error(err: webpki::Error) -> VerifyError {
    use webpki::Error as E;
    match err {
        E::CertExpired { .. } => VerifyError::IntermediateExpired,
        E::CertNotValidYet { .. } => VerifyError::IntermediateNotYetValid,
        E::EndEntityUsedAsCa => VerifyError::IntermediateNotCa,
        E::CaUsedAsEndEntity => VerifyError::LeafIsCa,
        E::PathLenConstraintViolated => VerifyError::PathLenExceeded,
        E::NameConstraintViolation => VerifyError::NameConstraintViolated,
        E::RequiredEkuNotFoundContext(_) => VerifyError::WrongExtendedKeyUsage,
        E::UnknownIssuer
        | E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch => VerifyError::UntrustedChain(format!("{err:?}")),
        other => VerifyError::ChainInvalid(format!("{other:?}")),
    }
}

/// The rustls client-certificate verifier for the listener: requests a client
/// certificate (optional, so `/healthz` and resource-server endpoints work without one),
/// verifies the handshake signature against the presented leaf — proof of key
/// possession — and defers every SVID rule to [`verify_svid`].
#[derive(Debug)]
pub struct HandshakeVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl HandshakeVerifier {
    pub fn new(provider: &rustls::crypto::CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for HandshakeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Chain and SVID rules are checked by `verify_svid` right after the handshake;
        // no request reaches a handler without that result attached.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[path = "x509_tests.rs"]
mod tests;
