//! `mayfly.task.toml` task files (`mayfly exec`, `mayfly credential`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(tf) =
            mayfly::cli::taskfile::TaskFile::parse(std::path::Path::new("fuzz.task.toml"), text)
        {
            for spec in &tf.credentials {
                let _ = tf.check_within(spec);
            }
        }
    }
});
