//! The duplicate-refusing JSON parser used for JWT headers and claims, JWKS and SPIFFE
//! bundles. Differential against serde_json: whatever the strict parser accepts,
//! serde_json accepts with the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::strict_json::{StrictJsonError, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(v) => {
            let loose: serde_json::Value =
                serde_json::from_slice(data).expect("serde_json accepts what strict accepts");
            assert_eq!(loose, v);
        }
        // A duplicate is reported as soon as it is read, possibly before a syntax error
        // further on (`{"a":1,"a"a":…`): refused either way, nothing to compare.
        Err(StrictJsonError::Duplicate(_) | StrictJsonError::Malformed(_)) => {}
    }
});
