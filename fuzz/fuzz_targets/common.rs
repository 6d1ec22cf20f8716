// Shared by the targets: the fixed test policy, a Datapath built from it, and the oracles
// more than one target checks.
#![allow(dead_code)]
use std::path::Path;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{MessageType, OpCode};
use hickory_proto::rr::{RData, RecordType};
use moat::datapath::Datapath;
use moat::policy::{Policy, SYNTHETIC_NET};
use moat::dns::{decode, NamePool};
use moat::telemetry::Counters;

pub const POLICY: &str = include_str!("../policy.toml");

pub fn policy() -> Policy {
    Policy::parse(POLICY, Path::new("fuzz/policy.toml")).expect("fuzz policy parses")
}

pub fn datapath() -> Datapath {
    Datapath::new(
        Arc::new(policy()),
        Arc::new(Mutex::new(NamePool::new(64))),
        Arc::new(Counters::default()),
    )
}

/// The name of a DNS question as policies spell it: lowercase, no trailing dot.
pub fn plain_name(name: &hickory_proto::rr::Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// Oracle for any answer moat's DNS gives the guest for `query`: a response with the
/// query's id; the query's question when it asked one well-formed question (and no other
/// question ever); answer records only A records owned by that name, only for names the
/// guest may resolve, with an address from the synthetic pool or the name's static record.
/// `relayed`: an upstream resolver's addresses are allowed too (checked by the caller).
pub fn check_dns_answer(dns: &moat::policy::Dns, query: &[u8], reply: &[u8]) {
    check_dns_reply(dns, query, reply, false)
}

pub fn check_dns_reply(dns: &moat::policy::Dns, query: &[u8], reply: &[u8], relayed: bool) {
    let r = decode(reply).unwrap_or_else(|| panic!("moat's answer does not decode: {reply:02x?}"));
    assert!(query.len() >= 2, "an answer to a query without an id");
    let id = u16::from_be_bytes([query[0], query[1]]);
    assert_eq!(r.metadata.id, id, "answer id is not the query's");
    assert_eq!(
        r.metadata.message_type,
        MessageType::Response,
        "answer is not a response"
    );
    let q = decode(query);
    if let Some(q) = &q {
        let well_formed = q.metadata.message_type == MessageType::Query
            && q.metadata.op_code == OpCode::Query
            && q.queries.len() == 1;
        if well_formed && !relayed {
            assert_eq!(r.queries, q.queries, "answer does not carry the question");
        }
    }
    if !r.queries.is_empty() {
        let q = q
            .as_ref()
            .expect("a question in the answer to a message that does not parse");
        assert_eq!(r.queries, q.queries[..1], "answer carries another question");
    }
    if r.answers.is_empty() {
        return;
    }
    let question = r.queries.first().expect("answers without a question");
    let name = plain_name(question.name());
    assert!(
        dns.allows(&name),
        "an answer for {name:?}, which is not allowlisted"
    );
    for a in &r.answers {
        assert_eq!(
            a.record_type(),
            RecordType::A,
            "a non-A record in an answer: {a:?}"
        );
        assert_eq!(
            &a.name,
            question.name(),
            "an answer record owned by another name"
        );
        let RData::A(addr) = &a.data else {
            panic!("A record without A data")
        };
        if !relayed {
            let fixed = dns.records.get(&name) == Some(&addr.0);
            assert!(
                fixed || (!dns.records.contains_key(&name) && SYNTHETIC_NET.contains(&addr.0)),
                "{name} answered with {} (neither its record nor a synthetic address)",
                addr.0
            );
        }
    }
}
