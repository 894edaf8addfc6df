//! The configuration file (TOML), parsed and validated (`Raw* -> TryFrom`). No panic on
//! any input; files it names are not read at this stage.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mayfly::config::Config::from_toml(text, std::path::Path::new("fuzz.toml"));
    }
});
