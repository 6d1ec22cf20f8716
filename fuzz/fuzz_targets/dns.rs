#![no_main]
//! DNS query bytes -> moat::dns::answer.
//!
//! Oracle: every answer is a DNS response that carries the query's id and, when the query
//! had one well-formed question, exactly that question; answer records are A records for
//! the question's name, given only to names the policy lets the guest resolve, with an
//! address from the synthetic pool or the name's static record (invariant 4).
use libfuzzer_sys::fuzz_target;
use moat::dns::{answer, decode, NamePool};
use moat::telemetry::DnsOutcome;
mod common;

thread_local! {
    static STATE: std::cell::RefCell<(moat::policy::Dns, NamePool)> =
        std::cell::RefCell::new((common::policy().dns, NamePool::new(16)));
}

fuzz_target!(|data: &[u8]| {
    STATE.with(|s| {
        let (dns, pool) = &mut *s.borrow_mut();
        let Some((reply, outcome)) = answer(dns, pool, data) else {
            return;
        };
        common::check_dns_answer(dns, data, &reply);
        let reply = decode(&reply).expect("checked above");
        if !reply.answers.is_empty() {
            assert!(
                matches!(outcome, DnsOutcome::Synthetic | DnsOutcome::Static),
                "{outcome:?} with answers"
            );
        }
    });
});
