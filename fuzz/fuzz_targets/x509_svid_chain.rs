//! X.509-SVID chains as a client presents them: framed DER certificates, the first the
//! trust anchor (the trust domain's bundle), then the leaf and its intermediates. Every
//! SVID rule and the full path validation run; nothing may panic, and an accepted chain
//! must name a SPIFFE ID with a path, in the bundle's trust domain.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::{TrustBundles, TrustDomain};
use rustls_pki_types::{CertificateDer, UnixTime};

fuzz_target!(|data: &[u8]| {
    let parts = mayfly_fuzz::frames(data, 6);
    let Some((root, chain)) = parts.split_first() else {
        return;
    };
    let pem = pem_of(root);
    let td = TrustDomain::parse("svid.test").expect("valid trust domain");
    let mut bundles = TrustBundles::default();
    if bundles
        .add_pem(&td, pem.as_bytes(), std::path::Path::new("fuzz"))
        .is_err()
    {
        return;
    }
    let chain: Vec<CertificateDer<'_>> = chain.iter().map(|c| CertificateDer::from(*c)).collect();
    // A fixed time inside the seeds' validity (2027-06-01), so runs are reproducible.
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_811_808_000));
    if let Ok(caller) = mayfly::identity::x509::verify_svid(&chain, &bundles, None, now) {
        let p = caller.principal();
        assert_eq!(p.trust_domain(), "svid.test");
        assert!(!p.path().is_empty());
    }
});

fn pem_of(der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut body = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                body.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                body.push('=');
            }
        }
    }
    format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
}
