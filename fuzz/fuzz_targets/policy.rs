#![no_main]
//! Policy text -> Policy::parse (errors are fine, panics are not).
//!
//! Oracle: an accepted policy's summary and warnings are computed without panicking, and
//! parsing the same text again gives the same policy (no hidden state, no order
//! dependence); a refused one names a line inside the text.
use libfuzzer_sys::fuzz_target;
use std::path::Path;

use moat::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse(text, Path::new("fuzz.toml")) {
        Ok(policy) => {
            let summary = policy.summary();
            let warnings = policy.warnings();
            let again =
                Policy::parse(text, Path::new("fuzz.toml")).expect("parsed once, parses again");
            assert_eq!(
                format!("{policy:?}"),
                format!("{again:?}"),
                "re-parse differs"
            );
            assert_eq!(summary, again.summary());
            assert_eq!(warnings, again.warnings());
        }
        Err(e) => {
            if let Some(loc) = e.location() {
                let lines = text.lines().count().max(1);
                assert!(
                    loc.line <= lines + 1,
                    "error at line {} of a {lines}-line text: {e}",
                    loc.line
                );
                assert!(!loc.reason.is_empty(), "an error without a reason: {e}");
            }
        }
    }
});
