//! `dns.mode = "upstream"`: allowed names are resolved by the upstream resolver, over UDP.
//!
//! The guest's message is never forwarded: moat asks its own minimal question (type A for the
//! allowed name, a random id, from a socket on a kernel-chosen port), accepts only a response
//! from the resolver's address to exactly that question, and builds the guest's answer from
//! the guest's own query. Addresses in reserved ranges are left out unless a rule names them
//! by CIDR (the gate's `admit_resolved`: DNS rebinding); the rest are remembered with the
//! name, so a flow to one of them goes to the proxy by that name.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use crate::firewall::gate;
use crate::policy::Policy;
use crate::services::dns::{self, DnsOutcome, NamePool};
use crate::telemetry::{Counters, DropReason};

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
        let ours = dns::upstream_query(id, &name).ok_or(DropReason::DnsMalformed)?;
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
                .and_then(|p| dns::read_upstream_reply(reply, id, &p.name));
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
            let Some(message) = dns::relay_answer(&p.guest_query, answer.code, &kept) else {
                continue;
            };
            counters.dns_answered(DnsOutcome::Forwarded);
            match p.reply_to {
                ReplyTo::Tcp(conn) => tcp.push((conn, message)),
                ReplyTo::Udp(port) => out.extend(crate::frame::udp_packet(
                    SocketAddrV4::new(policy.vm.gateway, dns::DNS_PORT),
                    SocketAddrV4::new(policy.vm.address, port),
                    &message,
                )),
            }
        }
    }
}
