#![no_main]
//! Policy text -> Policy::parse (errors are fine, panics are not).
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = moat::policy::Policy::parse(text, Path::new("fuzz.toml"));
    }
});
