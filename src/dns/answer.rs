//! The gateway's answer to one DNS query: allowlisted names answer, everything else is
//! NXDOMAIN.
//!
//! Wire format: hickory-proto (already in the tree through dhcproto; a complete, maintained
//! RFC 1035 codec with EDNS). The policy logic is moat's: `dns.records` answer with their
//! address; `dns.allow` names answer A with a synthetic address (proxy mode); AAAA and other
//! types for allowed names get an empty NOERROR; malformed queries get FORMERR.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;

use super::pool::NamePool;
use crate::policy::{Dns, DnsMode};
use crate::telemetry::DnsOutcome;

/// TTL of synthetic answers: short, so a guest asks again rather than outliving the pool.
pub const SYNTHETIC_TTL: u32 = 60;
/// TTL of static records.
pub const STATIC_TTL: u32 = 300;
/// Longest name we answer for (RFC 1035: 255 octets on the wire, 253 as text).
pub const MAX_NAME_LEN: usize = 253;

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
