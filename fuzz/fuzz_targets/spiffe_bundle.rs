//! SPIFFE bundle documents (bundle endpoints): the X.509 authorities, refresh hint and
//! sequence number.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::bundle_endpoint::parse_spiffe_bundle;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = parse_spiffe_bundle(data) {
        for cert in &doc.x509 {
            assert!(!cert.as_ref().is_empty());
        }
    }
});
