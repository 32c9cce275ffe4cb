//! The config loader on arbitrary text: refuse or accept, never panic.
#![no_main]
use edgeshard::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(std::path::Path::new("/nonexistent/fuzz.toml"), text);
    }
});
