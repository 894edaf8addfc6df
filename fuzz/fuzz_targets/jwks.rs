//! JWKS documents (OIDC issuers' jwks_uri / jwks_file, JWT-SVID bundles).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::jwks::parse_jwks;

fuzz_target!(|data: &[u8]| {
    let Some((&flag, doc)) = data.split_first() else {
        return;
    };
    if let Ok(keys) = parse_jwks(doc, flag & 1 == 1, 8) {
        assert!(keys.len() <= 8);
    }
});
