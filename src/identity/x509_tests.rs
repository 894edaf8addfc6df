//! X.509-SVID chains built with rcgen, one rule broken at a time: the SPIFFE X509-SVID
//! rules (§4.1 basic constraints, §4.3 key usage, §2 one URI SAN) and RFC 5280 path
//! validation (CA flag, keyCertSign, pathLenConstraint, validity, name constraints) at
//! every level of the verified path, each with its own refusal.

use super::*;
use crate::identity::{TrustBundles, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose as Ku, SanType,
};
use time::Duration;

const TD: &str = "svid.test";

struct Node {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn base(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(1);
    p.use_authority_key_identifier_extension = true;
    p
}

fn ca(cn: &str, is_ca: IsCa, ku: &[Ku]) -> CertificateParams {
    let mut p = base(cn);
    p.is_ca = is_ca;
    p.key_usages = ku.to_vec();
    p
}

fn good_ca(cn: &str) -> CertificateParams {
    ca(
        cn,
        IsCa::Ca(BasicConstraints::Unconstrained),
        &[Ku::KeyCertSign, Ku::CrlSign],
    )
}

fn root() -> Node {
    let key = KeyPair::generate().expect("key");
    let params = good_ca("root");
    let der = params.self_signed(&key).expect("self-signed").der().clone();
    Node {
        der,
        issuer: Issuer::new(params, key),
    }
}

fn signed(parent: &Node, params: CertificateParams) -> Node {
    let key = KeyPair::generate().expect("key");
    let der = params
        .signed_by(&key, &parent.issuer)
        .expect("signed")
        .der()
        .clone();
    Node {
        der,
        issuer: Issuer::new(params, key),
    }
}

fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = ca("leaf", IsCa::ExplicitNoCa, &[Ku::DigitalSignature]);
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("uri")))
        .collect();
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

fn leaf(parent: &Node) -> CertificateDer<'static> {
    signed(parent, leaf_params(&[&format!("spiffe://{TD}/workload")])).der
}

fn verify(root: &Node, chain: &[CertificateDer<'static>]) -> Result<VerifiedCaller, VerifyError> {
    crate::install_crypto_provider();
    let text = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            root.der.as_ref()
        )
    );
    let mut bundles = TrustBundles::default();
    bundles
        .add_pem(
            &TrustDomain::parse(TD).expect("td"),
            text.as_bytes(),
            std::path::Path::new("test"),
        )
        .expect("bundle");
    verify_svid(chain, &bundles, None, UnixTime::now())
}

fn code(r: Result<VerifiedCaller, VerifyError>) -> Result<String, VerifyError> {
    r.map(|c| c.principal().to_string())
}

/// URI name constraints (RFC 5280 §4.2.1.10): permitted subtree `host`.
fn uri_name_constraints(host: &str) -> CustomExtension {
    let der = |tag: u8, body: &[u8]| {
        let mut v = vec![tag, u8::try_from(body.len()).expect("short")];
        v.extend_from_slice(body);
        v
    };
    let general_name = der(0x86, host.as_bytes());
    let subtree = der(0x30, &general_name);
    let permitted = der(0xA0, &subtree);
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], der(0x30, &permitted));
    ext.set_criticality(true);
    ext
}

#[test]
fn a_chain_through_two_proper_intermediates_is_accepted() {
    let root = root();
    let i1 = signed(&root, good_ca("i1"));
    let i2 = signed(&i1, good_ca("i2"));
    let l = leaf(&i2);
    assert_eq!(
        code(verify(&root, &[l, i2.der.clone(), i1.der.clone()])),
        Ok(format!("spiffe://{TD}/workload"))
    );
}

#[test]
fn an_intermediate_without_key_cert_sign_is_refused() {
    // The chain of issue #18: CA:TRUE, key usage digitalSignature + cRLSign.
    let root = root();
    let bad = signed(
        &root,
        ca(
            "no-certsign",
            IsCa::Ca(BasicConstraints::Unconstrained),
            &[Ku::DigitalSignature, Ku::CrlSign],
        ),
    );
    let l = leaf(&bad);
    assert_eq!(
        code(verify(&root, &[l, bad.der.clone()])),
        Err(VerifyError::IssuerNotCertSigner)
    );
    // No key usage extension at all: SPIFFE requires keyCertSign on signing certificates.
    let bare = signed(
        &root,
        ca("no-ku", IsCa::Ca(BasicConstraints::Unconstrained), &[]),
    );
    let l = leaf(&bare);
    assert_eq!(
        code(verify(&root, &[l, bare.der.clone()])),
        Err(VerifyError::IssuerNotCertSigner)
    );
    // Deeper on the path: a good intermediate under a bad one.
    let good = signed(&bad, good_ca("under-bad"));
    let l = leaf(&good);
    assert_eq!(
        code(verify(&root, &[l, good.der.clone(), bad.der.clone()])),
        Err(VerifyError::IssuerNotCertSigner)
    );
}

#[test]
fn an_intermediate_that_is_not_a_ca_is_refused() {
    let root = root();
    for is_ca in [IsCa::ExplicitNoCa, IsCa::NoCa] {
        let not_ca = signed(&root, ca("not-ca", is_ca, &[Ku::KeyCertSign]));
        let l = leaf(&not_ca);
        assert_eq!(
            code(verify(&root, &[l, not_ca.der.clone()])),
            Err(VerifyError::IntermediateNotCa)
        );
    }
}

#[test]
fn a_path_longer_than_a_path_len_constraint_is_refused() {
    let root = root();
    let capped = signed(
        &root,
        ca(
            "pathlen-0",
            IsCa::Ca(BasicConstraints::Constrained(0)),
            &[Ku::KeyCertSign],
        ),
    );
    // Directly under the capped CA: fine.
    let l = leaf(&capped);
    assert!(verify(&root, &[l, capped.der.clone()]).is_ok());
    // A CA below it exceeds pathLenConstraint 0.
    let below = signed(&capped, good_ca("below"));
    let l = leaf(&below);
    assert_eq!(
        code(verify(&root, &[l, below.der.clone(), capped.der.clone()])),
        Err(VerifyError::PathLenExceeded)
    );
}

#[test]
fn an_intermediate_outside_its_validity_is_refused() {
    let root = root();
    let now = OffsetDateTime::now_utc();
    let mut old = good_ca("expired");
    old.not_before = now - Duration::days(10);
    old.not_after = now - Duration::days(1);
    let old = signed(&root, old);
    let l = leaf(&old);
    assert_eq!(
        code(verify(&root, &[l, old.der.clone()])),
        Err(VerifyError::IntermediateExpired)
    );
    let mut early = good_ca("future");
    early.not_before = now + Duration::days(1);
    early.not_after = now + Duration::days(10);
    let early = signed(&root, early);
    let l = leaf(&early);
    assert_eq!(
        code(verify(&root, &[l, early.der.clone()])),
        Err(VerifyError::IntermediateNotYetValid)
    );
    // The leaf's own validity keeps its own codes.
    let i = signed(&root, good_ca("i"));
    let mut p = leaf_params(&[&format!("spiffe://{TD}/workload")]);
    p.not_before = now - Duration::days(10);
    p.not_after = now - Duration::days(1);
    let l = signed(&i, p).der;
    assert_eq!(
        code(verify(&root, &[l, i.der.clone()])),
        Err(VerifyError::Expired)
    );
}

#[test]
fn uri_name_constraints_are_enforced_fail_closed() {
    let root = root();
    let mut p = good_ca("constrained");
    p.custom_extensions = vec![uri_name_constraints("other.test")];
    let other = signed(&root, p);
    let l = leaf(&other);
    assert_eq!(
        code(verify(&root, &[l, other.der.clone()])),
        Err(VerifyError::NameConstraintViolated)
    );
    // webpki 0.103 does not evaluate URI constraints: a permitted trust domain is refused
    // too (documented in docs/api-errors.md) rather than let through unchecked.
    let mut p = good_ca("constrained-ok");
    p.custom_extensions = vec![uri_name_constraints(TD)];
    let same = signed(&root, p);
    let l = leaf(&same);
    assert_eq!(
        code(verify(&root, &[l, same.der.clone()])),
        Err(VerifyError::NameConstraintViolated)
    );
}

#[test]
fn leaf_rules_of_the_spiffe_x509_svid_spec() {
    let root = root();
    let i = signed(&root, good_ca("i"));
    let id = format!("spiffe://{TD}/workload");
    // §2: exactly one URI SAN.
    let two = signed(&i, leaf_params(&[&id, "spiffe://svid.test/other"])).der;
    assert_eq!(
        code(verify(&root, &[two, i.der.clone()])),
        Err(VerifyError::UriSanCount(2))
    );
    // §3.1 / §5.2: a leaf's SPIFFE ID has a non-root path.
    let root_id = signed(&i, leaf_params(&[&format!("spiffe://{TD}")])).der;
    assert_eq!(
        code(verify(&root, &[root_id, i.der.clone()])),
        Err(VerifyError::LeafWithoutPath)
    );
    // §4.1: a leaf is not a CA.
    let mut p = leaf_params(&[&id]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let l = signed(&i, p).der;
    assert_eq!(
        code(verify(&root, &[l, i.der.clone()])),
        Err(VerifyError::LeafIsCa)
    );
    // §4.3: digitalSignature required, keyCertSign / cRLSign forbidden.
    let mut p = leaf_params(&[&id]);
    p.key_usages = vec![Ku::KeyEncipherment];
    let l = signed(&i, p).der;
    assert_eq!(
        code(verify(&root, &[l, i.der.clone()])),
        Err(VerifyError::MissingDigitalSignature)
    );
    let mut p = leaf_params(&[&id]);
    p.key_usages = vec![Ku::DigitalSignature, Ku::KeyCertSign];
    let l = signed(&i, p).der;
    assert_eq!(
        code(verify(&root, &[l, i.der.clone()])),
        Err(VerifyError::ForbiddenKeyUsage)
    );
    // §4.4: an EKU without clientAuth.
    let mut p = leaf_params(&[&id]);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let l = signed(&i, p).der;
    assert_eq!(
        code(verify(&root, &[l, i.der.clone()])),
        Err(VerifyError::WrongExtendedKeyUsage)
    );
    // A chain to another root.
    let stranger = self::root();
    let l = leaf(&signed(&stranger, good_ca("elsewhere")));
    assert!(matches!(
        verify(&root, &[l]),
        Err(VerifyError::UntrustedChain(_))
    ));
}

/// Every bad-intermediate refusal has its own API code.
#[test]
fn each_chain_refusal_has_its_own_code() {
    let codes: std::collections::BTreeSet<&str> = [
        VerifyError::IntermediateNotCa,
        VerifyError::IssuerNotCertSigner,
        VerifyError::PathLenExceeded,
        VerifyError::NameConstraintViolated,
        VerifyError::IntermediateExpired,
        VerifyError::IntermediateNotYetValid,
        VerifyError::Expired,
        VerifyError::UntrustedChain(String::new()),
        VerifyError::ChainInvalid(String::new()),
    ]
    .into_iter()
    .map(|e| crate::api::error::verify_code(&e))
    .collect();
    assert_eq!(codes.len(), 9);
}
