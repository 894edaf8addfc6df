//! SPIFFE IDs as they arrive in URI SANs, JWT-SVID `sub`, config and API bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::identity::{Principal, SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        // Parts reassemble to the input; the trust domain parses on its own; the ID
        // parses again to itself.
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain(), id.path()),
            id.as_str()
        );
        assert!(TrustDomain::parse(id.trust_domain()).is_ok());
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
    }
    if let Ok(p) = Principal::parse(s) {
        assert_eq!(Principal::parse(p.as_str()).as_ref(), Ok(&p));
    }
    let _ = TrustDomain::parse(s);
});
