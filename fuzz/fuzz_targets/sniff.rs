#![no_main]
//! First guest bytes of a TCP flow -> moat::egress::sniff::sniff (HTTP Host / TLS SNI).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moat::egress::sniff::sniff(data);
});
