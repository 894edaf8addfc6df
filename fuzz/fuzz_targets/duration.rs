//! Durations in config, API bodies (`ttl`) and task files.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mayfly::duration::{MAX, format, from_json, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(d) = parse(s) {
            assert!(d <= MAX && !d.is_zero(), "{s:?} -> {d:?}");
            assert_eq!(parse(&format(d)), Ok(d), "format round-trips");
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(d) = from_json(&v) {
            assert!(d <= MAX && !d.is_zero());
        }
    }
});
