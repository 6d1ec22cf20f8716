//! `dns.mode = "upstream"`: allowed names are resolved by the upstream resolver, over UDP.
//!
//! The guest's message is never forwarded: moat asks its own minimal question (type A for the
//! allowed name, a random id, from a socket on a kernel-chosen port), accepts only a response
//! from the resolver's address to exactly that question, and builds the guest's answer from
//! the guest's own query. Addresses in reserved ranges are left out unless a rule names them
//! by CIDR (the gate's `admit_resolved`: DNS rebinding); the rest are remembered with the
//! name, so a flow to one of them goes to the proxy by that name.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use super::answer::{MAX_NAME_LEN, STATIC_TTL};
use super::pool::NamePool;
use super::DNS_PORT;
use crate::firewall::gate;
use crate::policy::{Dns, DnsMode, Policy};
use crate::telemetry::{Counters, DnsOutcome, DropReason};

/// An unanswered query is forgotten after this long (the guest retries on its own).
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries in flight at most (a flooding guest cannot grow the table).
const MAX_PENDING: usize = 1024;
/// Names whose reserved answers were logged (once each), at most.
const MAX_LOGGED_NAMES: usize = 1024;
/// The largest guest query kept for building its answer.
const MAX_GUEST_QUERY: usize = 512;

/// Where an upstream answer goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTo {
    /// A UDP query from this guest port.
    Udp(u16),
    /// A DNS-over-TCP connection of the guest (by its id).
    Tcp(u64),
}

#[derive(Debug)]
struct Pending {
    reply_to: ReplyTo,
    /// The guest's query, to answer in its own terms (id, question, flags).
    guest_query: Vec<u8>,
    name: String,
    sent: Instant,
}

/// The upstream resolver side of one VM.
#[derive(Debug)]
pub struct Upstream {
    pub server: SocketAddr,
    pub socket: UdpSocket,
    pending: HashMap<u16, Pending>,
    /// Names whose reserved answers were already logged.
    logged: HashSet<String>,
}

impl Upstream {
    pub fn new(server: SocketAddr) -> std::io::Result<Upstream> {
        let bind: SocketAddr = if server.ip().is_loopback() {
            ([127, 0, 0, 1], 0).into()
        } else {
            ([0, 0, 0, 0], 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        Ok(Upstream {
            server,
            socket,
            pending: HashMap::new(),
            logged: HashSet::new(),
        })
    }

    /// Ask the resolver for `name` (which the guest's `query` asked for) under a random id.
    pub fn forward(
        &mut self,
        reply_to: ReplyTo,
        query: &[u8],
        name: String,
    ) -> Result<(), DropReason> {
        self.pending.retain(|_, p| p.sent.elapsed() < QUERY_TIMEOUT);
        if self.pending.len() >= MAX_PENDING || query.len() < 12 || query.len() > MAX_GUEST_QUERY {
            return Err(DropReason::DnsMalformed);
        }
        let id = loop {
            let mut bytes = [0u8; 2];
            getrandom::fill(&mut bytes).map_err(|_| DropReason::ProxyUnreachable)?;
            let id = u16::from_ne_bytes(bytes);
            if !self.pending.contains_key(&id) {
                break id;
            }
        };
        let ours = upstream_query(id, &name).ok_or(DropReason::DnsMalformed)?;
        self.socket
            .send_to(&ours, self.server)
            .map_err(|_| DropReason::ProxyUnreachable)?;
        self.pending.insert(
            id,
            Pending {
                reply_to,
                guest_query: query.to_vec(),
                name,
                sent: Instant::now(),
            },
        );
        Ok(())
    }

    /// Relay the resolver's answers to the guest: UDP ones as IP packets from the gateway's
    /// port 53 into `out`, DNS-over-TCP ones as (connection id, message) into `tcp`.
    pub fn receive(
        &mut self,
        names: &mut NamePool,
        policy: &Policy,
        counters: &Counters,
        out: &mut Vec<Vec<u8>>,
        tcp: &mut Vec<(u64, Vec<u8>)>,
    ) {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            let reply = &buf[..n];
            if from != self.server || n < 12 {
                counters.drop_frame(
                    DropReason::DnsUpstreamMismatch,
                    format_args!("upstream dns: datagram from {from}, not the resolver"),
                );
                continue;
            }
            let id = u16::from_be_bytes([reply[0], reply[1]]);
            let answer = self
                .pending
                .get(&id)
                .and_then(|p| read_upstream_reply(reply, id, &p.name));
            let Some((answer, p)) = answer.and_then(|a| Some((a, self.pending.remove(&id)?)))
            else {
                counters.drop_frame(
                    DropReason::DnsUpstreamMismatch,
                    format_args!("upstream dns: reply to no question moat asked"),
                );
                continue;
            };
            let mut kept = Vec::with_capacity(answer.addresses.len());
            for (addr, ttl) in answer.addresses {
                match gate::admit_resolved(policy, addr) {
                    Ok(()) => {
                        names.remember(addr, &p.name);
                        kept.push((addr, ttl));
                    }
                    Err(reason) => {
                        let first = self.logged.len() < MAX_LOGGED_NAMES
                            && self.logged.insert(p.name.clone());
                        if first {
                            tracing::warn!(name = %p.name, %addr, "upstream resolver answered an allowed name with a reserved address: left out of the guest's answer");
                        }
                        counters.drop_frame(reason, format_args!("{} -> {addr}", p.name));
                    }
                }
            }
            let Some(message) = relay_answer(&p.guest_query, answer.code, &kept) else {
                continue;
            };
            counters.dns_answered(DnsOutcome::Forwarded);
            match p.reply_to {
                ReplyTo::Tcp(conn) => tcp.push((conn, message)),
                ReplyTo::Udp(port) => out.extend(crate::frame::udp_packet(
                    SocketAddrV4::new(policy.vm.gateway, DNS_PORT),
                    SocketAddrV4::new(policy.vm.address, port),
                    &message,
                )),
            }
        }
    }
}

/// With `mode = "upstream"`: the name a query is for, if it should go to the upstream
/// resolver (a well-formed question for an allowed name that no static record answers).
/// `None`: answer it locally with [`super::answer::answer`] (NXDOMAIN, FORMERR, static record).
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
