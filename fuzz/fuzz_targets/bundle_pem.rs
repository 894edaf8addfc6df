//! PEM trust bundles (bundle_file, endpoint bootstrap bundles).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::{TrustBundles, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::parse("fuzz.test").expect("valid trust domain");
    let mut bundles = TrustBundles::default();
    if bundles
        .add_pem(&td, data, std::path::Path::new("fuzz.pem"))
        .is_ok()
    {
        assert!(bundles.trust_domains().any(|t| t == "fuzz.test"));
    }
});
