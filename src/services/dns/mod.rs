//! DNS at the gateway: allowlisted names answer, everything else is NXDOMAIN.
//!
//! Wire format: hickory-proto (already in the tree through dhcproto; a complete, maintained
//! RFC 1035 codec with EDNS). The policy logic is moat's: `dns.records` answer with their
//! address; `dns.allow` names answer A with a synthetic address (proxy mode); AAAA and other
//! types for allowed names get an empty NOERROR; malformed queries get FORMERR.

pub mod pool;

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;

use crate::policy::{Dns, DnsMode};
pub use pool::NamePool;

/// The gateway's DNS port (UDP and TCP).
pub const DNS_PORT: u16 = 53;

/// TTL of synthetic answers: short, so a guest asks again rather than outliving the pool.
pub const SYNTHETIC_TTL: u32 = 60;
/// TTL of static records.
pub const STATIC_TTL: u32 = 300;
/// Longest name we answer for (RFC 1035: 255 octets on the wire, 253 as text).
pub const MAX_NAME_LEN: usize = 253;

/// What a query got, for counters and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsOutcome {
    /// A record from the synthetic pool.
    Synthetic,
    /// A static record from `dns.records`.
    Static,
    /// Allowed name, but no record of that type (AAAA, MX, ...): empty NOERROR.
    NoData,
    /// Not allowlisted.
    NxDomain,
    /// Malformed query: FORMERR.
    FormErr,
    /// `mode = "upstream"` over TCP: not forwarded (upstream forwarding is UDP only).
    NotImplemented,
    /// `mode = "upstream"`: forwarded to the upstream resolver and relayed back.
    Forwarded,
}

impl DnsOutcome {
    pub const ALL: &'static [DnsOutcome] = &[
        DnsOutcome::Synthetic,
        DnsOutcome::Static,
        DnsOutcome::NoData,
        DnsOutcome::NxDomain,
        DnsOutcome::FormErr,
        DnsOutcome::NotImplemented,
        DnsOutcome::Forwarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DnsOutcome::Synthetic => "synthetic",
            DnsOutcome::Static => "static",
            DnsOutcome::NoData => "nodata",
            DnsOutcome::NxDomain => "nxdomain",
            DnsOutcome::FormErr => "formerr",
            DnsOutcome::NotImplemented => "notimp",
            DnsOutcome::Forwarded => "forwarded",
        }
    }
}

/// Answer one DNS query message. `None`: not even a header to answer (dropped).
pub fn answer(dns: &Dns, names: &mut NamePool, query: &[u8]) -> Option<(Vec<u8>, DnsOutcome)> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return formerr_from_header(query).map(|r| (r, DnsOutcome::FormErr)),
    };
    let mut response = Message::response(request.id, request.op_code);
    response.metadata.recursion_desired = request.recursion_desired;
    response.metadata.recursion_available = true;
    let (code, outcome) = match decide(dns, names, &request, &mut response) {
        Ok(outcome) => (ResponseCode::NoError, outcome),
        Err(outcome) => (
            match outcome {
                DnsOutcome::NxDomain => ResponseCode::NXDomain,
                DnsOutcome::NotImplemented => ResponseCode::NotImp,
                _ => ResponseCode::FormErr,
            },
            outcome,
        ),
    };
    response.metadata.response_code = code;
    response.to_vec().ok().map(|bytes| (bytes, outcome))
}

fn decide(
    dns: &Dns,
    names: &mut NamePool,
    request: &Message,
    response: &mut Message,
) -> Result<DnsOutcome, DnsOutcome> {
    if request.message_type != MessageType::Query || request.op_code != OpCode::Query {
        return Err(DnsOutcome::FormErr);
    }
    let [query] = request.queries.as_slice() else {
        return Err(DnsOutcome::FormErr);
    };
    response.add_query(query.clone());
    if query.query_class() != DNSClass::IN {
        return Err(DnsOutcome::FormErr);
    }
    let text = query.name().to_ascii();
    let name = text.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.split('.').any(|l| l.len() > 63) {
        return Err(DnsOutcome::FormErr);
    }
    if !dns.allows(&name) {
        return Err(DnsOutcome::NxDomain);
    }
    if query.query_type() != RecordType::A {
        return Ok(DnsOutcome::NoData);
    }
    let (addr, ttl, outcome): (Ipv4Addr, u32, DnsOutcome) =
        if let Some(addr) = dns.records.get(&name) {
            (*addr, STATIC_TTL, DnsOutcome::Static)
        } else {
            match dns.mode {
                DnsMode::Proxy => (names.assign(&name), SYNTHETIC_TTL, DnsOutcome::Synthetic),
                DnsMode::Upstream => return Err(DnsOutcome::NotImplemented),
            }
        };
    response.add_answer(Record::from_rdata(
        query.name().clone(),
        ttl,
        RData::A(A(addr)),
    ));
    Ok(outcome)
}

/// With `mode = "upstream"`: the name a query is for, if it should go to the upstream
/// resolver (a well-formed question for an allowed name that no static record answers).
/// `None`: answer it locally with [`answer`] (NXDOMAIN, FORMERR, static record).
pub fn upstream_name(dns: &Dns, query: &[u8]) -> Option<String> {
    if dns.mode != DnsMode::Upstream {
        return None;
    }
    let request = Message::from_vec(query).ok()?;
    if request.message_type != MessageType::Query || request.op_code != OpCode::Query {
        return None;
    }
    let [q] = request.queries.as_slice() else {
        return None;
    };
    let name = q
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let valid = q.query_class() == DNSClass::IN
        && !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|l| l.len() <= 63);
    // Only A goes upstream: AAAA and other types of allowed names get an empty NOERROR
    // locally (moat carries no IPv6, and an A answer is all a flow needs).
    let a = q.query_type() == RecordType::A;
    let local = dns.records.contains_key(&name);
    (valid && a && dns.allows(&name) && !local).then_some(name)
}

/// moat's own query for `name` (type A, recursion desired) under `id`: the guest's message
/// is never forwarded, so nothing of its own (flags, EDNS options, extra sections) reaches
/// the resolver.
pub fn upstream_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let name = hickory_proto::rr::Name::from_ascii(name).ok()?;
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(hickory_proto::op::Query::query(name, RecordType::A));
    query.to_vec().ok()
}

/// What an upstream resolver said about a name moat asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamAnswer {
    /// NOERROR, NXDOMAIN, SERVFAIL, ... as the resolver said.
    pub code: u16,
    /// The A records of the answer section (address, TTL), CNAME chains flattened.
    pub addresses: Vec<(Ipv4Addr, u32)>,
}

/// Read the resolver's reply to moat's query `id` for `name`: `None` unless it is a
/// response to exactly that question (a spoofed or stray datagram is not relayed).
pub fn read_upstream_reply(reply: &[u8], id: u16, name: &str) -> Option<UpstreamAnswer> {
    let m = Message::from_vec(reply).ok()?;
    let [q] = m.queries.as_slice() else {
        return None;
    };
    let asked = q.name().to_ascii();
    let same_question = asked.trim_end_matches('.').eq_ignore_ascii_case(name)
        && q.query_type() == RecordType::A
        && q.query_class() == DNSClass::IN;
    if m.metadata.id != id || m.metadata.message_type != MessageType::Response || !same_question {
        return None;
    }
    let addresses = m
        .answers
        .iter()
        .filter_map(|r| match r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect();
    Some(UpstreamAnswer {
        code: u16::from(m.metadata.response_code),
        addresses,
    })
}

/// The guest's answer, built from its own query: its id, its question, and the addresses
/// moat lets it have (owned by the name it asked for, TTLs capped).
pub fn relay_answer(
    guest_query: &[u8],
    code: u16,
    addresses: &[(Ipv4Addr, u32)],
) -> Option<Vec<u8>> {
    let request = Message::from_vec(guest_query).ok()?;
    let q = request.queries.first()?.clone();
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = ResponseCode::from_low(code.min(15) as u8);
    for (addr, ttl) in addresses {
        response.add_answer(Record::from_rdata(
            q.name().clone(),
            (*ttl).min(STATIC_TTL),
            RData::A(A(*addr)),
        ));
    }
    response.add_query(q);
    response.to_vec().ok()
}

/// The A records of a response (to remember which name an upstream address stands for).
pub fn a_records(reply: &[u8]) -> Vec<Ipv4Addr> {
    Message::from_vec(reply)
        .map(|m| {
            m.answers
                .iter()
                .filter_map(|r| match r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A FORMERR for a message whose header at least has an id.
fn formerr_from_header(query: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    if query.len() < 12 {
        return None;
    }
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// Decode a response (for tests and the canary).
pub fn decode(bytes: &[u8]) -> Option<Message> {
    Message::from_bytes(bytes).ok()
}

#[cfg(test)]
mod tests;
