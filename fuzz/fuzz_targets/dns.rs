#![no_main]
//! DNS query bytes -> moat::services::dns::answer.
use libfuzzer_sys::fuzz_target;
use moat::services::dns::{answer, NamePool};
mod common;

thread_local! {
    static STATE: std::cell::RefCell<(moat::policy::Dns, NamePool)> =
        std::cell::RefCell::new((common::policy().dns, NamePool::new(16)));
}

fuzz_target!(|data: &[u8]| {
    STATE.with(|s| {
        let (dns, pool) = &mut *s.borrow_mut();
        let _ = answer(dns, pool, data);
    });
});
