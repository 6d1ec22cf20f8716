//! The flow table's DNS: the guest's connections to the gateway's DNS over TCP (answered by
//! [`crate::dns::tcp`]), and with `dns.mode = "upstream"` the resolver's socket, watched by
//! this table's event loop.

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use super::key::FlowKey;
use super::shared::{Shared, SocketOwner};
use super::steering::{SteerKey, Steering};
use super::tokens::{Owner, Registration};
use crate::dns::tcp::DnsConn;
use crate::dns::upstream::{ReplyTo, Upstream};
use crate::stack::SocketHandle;
use crate::telemetry::DropReason;

/// A guest connection to the gateway's DNS over TCP: its socket, and what answers it.
#[derive(Debug)]
struct DnsTcp {
    key: FlowKey,
    handle: SocketHandle,
    answers: DnsConn,
}

/// The upstream resolver's socket and its place in the event loop (declared first: it
/// leaves the loop before the socket closes).
#[derive(Debug)]
struct Resolver {
    _registration: Registration,
    upstream: Upstream,
}

/// The DNS of one flow table.
#[derive(Debug, Default)]
pub(super) struct DnsFlows {
    /// Guest connections to the gateway's DNS over TCP, by id, and their ids by flow key.
    conns: HashMap<u64, DnsTcp>,
    by_key: HashMap<FlowKey, u64>,
    next_id: u64,
    /// The upstream resolver (`dns.mode = "upstream"`), opened on first use.
    resolver: Option<Resolver>,
}

impl DnsFlows {
    /// Open DNS-over-TCP connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.by_key.contains_key(key)
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.conns.keys().copied()
    }

    /// Accept a guest connection to the gateway's port 53.
    pub fn open(&mut self, sh: &mut Shared, key: FlowKey) -> Result<(), DropReason> {
        let handle = sh
            .stack
            .listen(key.dst, key.dst_port, key.guest_port, false)
            .ok_or(DropReason::TcpNoFlow)?;
        self.next_id += 1;
        let id = self.next_id;
        let conn = DnsTcp {
            key,
            handle,
            answers: DnsConn::new(),
        };
        self.conns.insert(id, conn);
        self.by_key.insert(key, id);
        sh.by_socket.insert(handle, SocketOwner::Dns(id));
        sh.steering.claim(SteerKey::Tcp(key));
        Ok(())
    }

    /// Serve the DNS-over-TCP connections with news; forget finished ones.
    pub fn answer(&mut self, sh: &mut Shared) {
        let mut finished = Vec::new();
        let mut queued: Vec<(u64, Vec<u8>, String)> = Vec::new();
        for id in sh.pending.dns.drain() {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            let answers = &mut conn.answers;
            if !answers.step(
                sh.stack.socket(conn.handle),
                &sh.policy.dns,
                &sh.names,
                &sh.counters,
            ) {
                finished.push(id);
                continue;
            }
            // mode = "upstream": what the connection could not answer goes to the resolver.
            answers.awaiting += answers.to_upstream.len();
            queued.extend(answers.to_upstream.drain(..).map(|(q, n)| (id, q, n)));
        }
        for id in finished {
            let Some(conn) = self.conns.remove(&id) else {
                continue;
            };
            self.by_key.remove(&conn.key);
            sh.drop_socket(conn.handle);
            sh.steering.release(SteerKey::Tcp(conn.key));
        }
        for (id, query, name) in queued {
            let sent = self
                .upstream(sh)
                .and_then(|u| u.forward(ReplyTo::Tcp(id), &query, name));
            if let Err(reason) = sent {
                sh.counters.drop_frame(
                    reason,
                    format_args!("dns over tcp: upstream query not sent"),
                );
            }
        }
    }

    /// Forward a guest's DNS query (UDP, from `guest_port`) for an allowed name to the
    /// upstream resolver.
    pub fn forward(
        &mut self,
        sh: &Shared,
        guest_port: u16,
        query: &[u8],
        name: String,
    ) -> Result<(), DropReason> {
        self.upstream(sh)?
            .forward(ReplyTo::Udp(guest_port), query, name)
    }

    /// The upstream resolver's socket, opened (and registered) on first use.
    fn upstream(&mut self, sh: &Shared) -> Result<&mut Upstream, DropReason> {
        if self.resolver.is_none() {
            let server = sh.policy.dns.upstream.ok_or(DropReason::DnsMalformed)?;
            let upstream = Upstream::new(server).map_err(|_| DropReason::ProxyUnreachable)?;
            let registration = sh
                .tokens
                .register(upstream.socket.as_raw_fd(), Owner::Upstream)?;
            self.resolver = Some(Resolver {
                _registration: registration,
                upstream,
            });
        }
        self.resolver
            .as_mut()
            .map(|r| &mut r.upstream)
            .ok_or(DropReason::ProxyUnreachable)
    }

    /// Relay what the resolver answered: UDP answers as packets into `out`, DNS-over-TCP
    /// ones into their streams (and out at once).
    pub fn receive(&mut self, sh: &mut Shared, out: &mut Vec<Vec<u8>>) {
        let Some(resolver) = self.resolver.as_mut() else {
            return;
        };
        let mut tcp = Vec::new();
        {
            let mut names = sh.names.lock().unwrap_or_else(|e| e.into_inner());
            resolver
                .upstream
                .receive(&mut names, &sh.policy, &sh.counters, out, &mut tcp);
        }
        if tcp.is_empty() {
            return;
        }
        for (id, reply) in tcp {
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.answers.reply(&reply);
                sh.pending.dns.insert(id);
            }
        }
        self.answer(sh);
        sh.stack.poll();
        out.extend(sh.stack.take_egress());
    }

    /// The event loop is gone: forget every connection and the resolver's socket.
    pub fn detach(&mut self, steering: &Steering) {
        for key in self.by_key.keys() {
            steering.release(SteerKey::Tcp(*key));
        }
        self.conns.clear();
        self.by_key.clear();
        self.resolver = None;
    }
}
