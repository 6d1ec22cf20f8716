#![no_main]
//! An upstream resolver's reply -> `dns::read_upstream_reply` + the gate's
//! `admit_resolved` + `relay_answer`, as `dns::upstream::Upstream::receive` chains them.
//!
//! Input: bytes 0-1: the id moat asked under; byte 2: length L of the guest's query; then
//! the guest's query (L bytes) and the resolver's reply (the rest). The name moat asked for
//! is the one `upstream_name` takes from the guest's query (upstream-mode policy).
//!
//! Oracle: a reply is taken only if it carries moat's id and moat's question (A, IN, that
//! name) and is a response; the guest's answer carries the guest's id and question (not the
//! resolver's), only A records, owned by the question's name, each an address the resolver
//! gave for it (TTL capped), and no reserved address the policy's CIDRs do not name.
use std::net::Ipv4Addr;
use std::path::Path;

use hickory_proto::op::MessageType;
use hickory_proto::rr::{RData, RecordType};
use libfuzzer_sys::fuzz_target;
use moat::firewall::gate;
use moat::policy::Policy;
use moat::dns::{self, decode};
mod common;

const POLICY: &str = r#"
[vm]
name = "fuzz-upstream"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/30"

[proxy]
http = "127.0.0.1:3128"

[[outbound]]
protocol = "tcp"
ports = [443]
to = ["example.com", "*.example.com", "10.20.0.0/16"]

[dns]
allow = ["example.com", "*.example.com"]
records = { "api.internal" = "10.0.0.1" }
mode = "upstream"
upstream = "127.0.0.1:53"
"#;

thread_local! {
    static POLICY_: Policy = Policy::parse(POLICY, Path::new("upstream.toml")).expect("parses");
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let id = u16::from_be_bytes([data[0], data[1]]);
    let qlen = usize::from(data[2]);
    let Some(guest_query) = data.get(3..3 + qlen) else {
        return;
    };
    let reply = &data[3 + qlen..];
    POLICY_.with(|policy| {
        let Some(name) = dns::upstream_name(&policy.dns, guest_query) else {
            return;
        };
        assert!(policy.dns.allows(&name), "{name:?} goes upstream but is not allowlisted");
        let ours = dns::upstream_query(id, &name);
        if let Some(ours) = &ours {
            let m = decode(ours).expect("moat's query decodes");
            assert_eq!(m.metadata.id, id);
            assert_eq!(m.queries.len(), 1);
            assert!(m.answers.is_empty() && m.additionals.is_empty() && m.authorities.is_empty());
        }
        let Some(answer) = dns::read_upstream_reply(reply, id, &name) else {
            return;
        };
        let r = decode(reply).expect("a taken reply decodes");
        assert_eq!(r.metadata.id, id, "took a reply with another id");
        assert_eq!(r.metadata.message_type, MessageType::Response, "took a query as a reply");
        assert_eq!(r.queries.len(), 1);
        assert_eq!(common::plain_name(r.queries[0].name()), name, "took a reply to another name");
        assert_eq!(r.queries[0].query_type(), RecordType::A);
        let given: Vec<(Ipv4Addr, u32)> = r
            .answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::A(x) => Some((x.0, a.ttl)),
                _ => None,
            })
            .collect();
        assert_eq!(answer.addresses, given, "addresses other than the reply's A records");
        let kept: Vec<(Ipv4Addr, u32)> = answer
            .addresses
            .iter()
            .copied()
            .filter(|(a, _)| gate::admit_resolved(policy, *a).is_ok())
            .collect();
        let Some(message) = dns::relay_answer(guest_query, answer.code, &kept) else {
            return;
        };
        common::check_dns_reply(&policy.dns, guest_query, &message, true);
        let m = decode(&message).expect("checked");
        let q = decode(guest_query).expect("upstream_name parsed it");
        assert_eq!(m.queries, q.queries, "relayed answer does not carry the guest's question");
        assert_eq!(m.answers.len(), kept.len());
        for a in &m.answers {
            let RData::A(x) = &a.data else { panic!("non-A relayed: {a:?}") };
            assert!(kept.iter().any(|(k, t)| *k == x.0 && a.ttl == (*t).min(dns::STATIC_TTL)), "relayed {} not given (or TTL not capped)", x.0);
            if let Some(r) = gate::reserved_range(x.0) {
                let named = policy.outbound.iter().flat_map(|o| o.to.iter().flatten()).any(|d| matches!(d, moat::policy::Destination::Cidr(c) if c.contains(&x.0) && r.contains(c)));
                assert!(named, "relayed reserved {} that no CIDR names", x.0);
            }
        }
    });
});
