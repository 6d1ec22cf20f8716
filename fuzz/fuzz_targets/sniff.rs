#![no_main]
//! First guest bytes of a TCP flow -> moat::egress::sniff::sniff (HTTP Host / TLS SNI).
//!
//! Oracle: a sniffed name is non-empty and appears, byte for byte, in the input (it is text the guest sent, never made up or rewritten); the verdict
//! does not depend on bytes past MAX_SNIFF being absent (a NeedMore never comes back for an
//! input of MAX_SNIFF bytes or more).
use libfuzzer_sys::fuzz_target;
use moat::egress::sniff::{sniff, Sniffed, MAX_SNIFF};

fuzz_target!(|data: &[u8]| {
    match sniff(data) {
        Sniffed::Name(name, _) => {
            assert!(!name.is_empty(), "empty name");
            let needle = name.as_bytes();
            assert!(
                data.windows(needle.len()).any(|w| w == needle),
                "sniffed {name:?}, which is not in the input"
            );
        }
        Sniffed::NeedMore => assert!(data.len() < MAX_SNIFF, "NeedMore past MAX_SNIFF"),
        Sniffed::NoName => {}
    }
});
