//! Differential: Mayfly's SPIFFE ID parser against an independent implementation of the
//! specification's grammar (`mayfly_fuzz::spec_parse`). They must agree on every input:
//! accept the same IDs, split them the same way.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let spec = mayfly_fuzz::spec_parse(data);
    let ours = std::str::from_utf8(data)
        .ok()
        .and_then(|s| SpiffeId::parse(s).ok());
    match (&spec, &ours) {
        (None, None) => {}
        (Some((td, path)), Some(id)) => {
            assert_eq!(id.trust_domain(), td);
            assert_eq!(id.path(), path);
        }
        _ => panic!(
            "disagreement on {:?}: spec {:?}, mayfly {:?}",
            String::from_utf8_lossy(data),
            spec,
            ours
        ),
    }
});
