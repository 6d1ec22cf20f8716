use std::path::Path;

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::*;
use crate::policy::{Dns, Policy};
use crate::telemetry::DnsOutcome;

fn dns(extra: &str) -> Dns {
    let text = format!(
        "[vm]\nname = \"d\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n[dns]\nallow = [\"example.com\", \"*.example.org\"]\nrecords = {{ \"api.internal\" = \"10.0.0.1\" }}\n{extra}"
    );
    Policy::parse(&text, Path::new("t.toml")).unwrap().dns
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn ask(dns: &Dns, pool: &mut NamePool, bytes: &[u8]) -> (Message, DnsOutcome) {
    let (reply, outcome) = answer(dns, pool, bytes).expect("an answer");
    (decode(&reply).expect("reply decodes"), outcome)
}

fn a_record(m: &Message) -> Option<Ipv4Addr> {
    m.answers.iter().find_map(|r| match r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

#[test]
fn allowed_names_get_stable_synthetic_addresses() {
    let d = dns("");
    let mut pool = NamePool::default();
    let (m, outcome) = ask(&d, &mut pool, &query("example.com.", RecordType::A));
    assert_eq!(outcome, DnsOutcome::Synthetic);
    assert_eq!(m.id, 0x4242);
    assert_eq!(m.response_code, ResponseCode::NoError);
    let addr = a_record(&m).unwrap();
    assert!(pool::SYNTHETIC_NET.contains(&addr));
    assert_eq!(pool.lookup(addr), Some("example.com"));
    let (m2, _) = ask(&d, &mut pool, &query("EXAMPLE.com.", RecordType::A));
    assert_eq!(a_record(&m2), Some(addr), "case-insensitive and stable");
    let (m3, _) = ask(
        &d,
        &mut pool,
        &query("deep.sub.example.org.", RecordType::A),
    );
    assert_ne!(a_record(&m3), Some(addr));
}

#[test]
fn other_names_are_nxdomain_and_other_types_empty() {
    let d = dns("");
    let mut pool = NamePool::default();
    for name in ["evil.test.", "example.org.", "notexample.com.", "com."] {
        let (m, outcome) = ask(&d, &mut pool, &query(name, RecordType::A));
        assert_eq!(
            (outcome, m.response_code),
            (DnsOutcome::NxDomain, ResponseCode::NXDomain),
            "{name}"
        );
        assert!(m.answers.is_empty());
    }
    for qtype in [
        RecordType::AAAA,
        RecordType::TXT,
        RecordType::MX,
        RecordType::ANY,
    ] {
        let (m, outcome) = ask(&d, &mut pool, &query("example.com.", qtype));
        assert_eq!(
            (outcome, m.response_code),
            (DnsOutcome::NoData, ResponseCode::NoError),
            "{qtype:?}"
        );
        assert!(m.answers.is_empty());
    }
    assert!(
        pool.is_empty(),
        "nothing assigned for refused or non-A queries"
    );
}

#[test]
fn static_records_answer_with_their_address() {
    let d = dns("");
    let mut pool = NamePool::default();
    let (m, outcome) = ask(&d, &mut pool, &query("api.internal.", RecordType::A));
    assert_eq!(outcome, DnsOutcome::Static);
    assert_eq!(a_record(&m), Some(Ipv4Addr::new(10, 0, 0, 1)));
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let d = dns("");
    let mut pool = NamePool::default();
    // Two questions.
    let mut two = Message::query();
    two.metadata.id = 7;
    two.add_query(Query::query(
        Name::from_ascii("example.com.").unwrap(),
        RecordType::A,
    ));
    two.add_query(Query::query(
        Name::from_ascii("example.org.").unwrap(),
        RecordType::A,
    ));
    let (m, outcome) = ask(&d, &mut pool, &two.to_vec().unwrap());
    assert_eq!(
        (outcome, m.response_code, m.id),
        (DnsOutcome::FormErr, ResponseCode::FormErr, 7)
    );
    // Garbage after a valid header.
    let mut junk = query("example.com.", RecordType::A);
    junk.truncate(15);
    let (m, outcome) = ask(&d, &mut pool, &junk);
    assert_eq!(
        (outcome, m.response_code, m.id),
        (DnsOutcome::FormErr, ResponseCode::FormErr, 0x4242)
    );
    // Not even a header.
    assert!(answer(&d, &mut pool, &[1, 2, 3]).is_none());
    // A response sent as a query.
    let mut resp = Message::response(9, OpCode::Query);
    resp.add_query(Query::query(
        Name::from_ascii("example.com.").unwrap(),
        RecordType::A,
    ));
    let (_, outcome) = ask(&d, &mut pool, &resp.to_vec().unwrap());
    assert_eq!(outcome, DnsOutcome::FormErr);
}

#[test]
fn no_dns_table_means_every_name_is_nxdomain() {
    let d = Dns::default();
    let mut pool = NamePool::default();
    let (_, outcome) = ask(&d, &mut pool, &query("example.com.", RecordType::A));
    assert_eq!(outcome, DnsOutcome::NxDomain);
}
