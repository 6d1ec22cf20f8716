//! DNS over TCP at the gateway (RFC 1035 4.2.2, RFC 7766): the same answers as UDP port 53,
//! each message behind a two-byte length. Terminated in the stack; nothing leaves the host.
//!
//! A [`DnsConn`] works on the guest's smoltcp socket it is handed: which socket that is, and
//! which guest connection, is the flow table's business (`egress`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::{Socket, State};

use super::answer::answer;
use super::pool::NamePool;
use super::upstream::upstream_name;
use crate::policy::Dns;
use crate::telemetry::Counters;

/// A DNS connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(10);
/// Largest message: the two-byte length allows 65535.
const MAX_MESSAGE: usize = 65_535;
/// Answers waiting for the guest to read them, at most this many bytes before moat stops
/// reading queries (then the stack's receive buffer fills and the guest's window closes).
/// One more answer may be added past it: at most 4 KiB from the resolver, a few hundred
/// bytes from moat's own DNS.
pub const OUTBOX_CAP: usize = 4096;
/// Queries of one connection at the upstream resolver at once, at most (their answers
/// land in the outbox whatever its size).
pub const MAX_AWAITING: usize = 4;

/// One guest connection to gateway:53.
#[derive(Debug)]
pub struct DnsConn {
    /// `mode = "upstream"`: queries to send to the resolver (message, name).
    pub to_upstream: Vec<(Vec<u8>, String)>,
    /// Queries sent to the resolver and not answered yet.
    pub awaiting: usize,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    last: Instant,
}

impl Default for DnsConn {
    fn default() -> Self {
        DnsConn::new()
    }
}

impl DnsConn {
    pub fn new() -> DnsConn {
        DnsConn {
            to_upstream: Vec::new(),
            awaiting: 0,
            inbox: Vec::new(),
            outbox: Vec::new(),
            last: Instant::now(),
        }
    }

    /// Answer what has arrived on the guest's `socket`. Returns false once the connection
    /// is finished.
    pub fn step(
        &mut self,
        socket: &mut Socket<'_>,
        policy: &Dns,
        names: &Arc<Mutex<NamePool>>,
        counters: &Counters,
    ) -> bool {
        if matches!(socket.state(), State::Closed | State::TimeWait) {
            return false;
        }
        if self.last.elapsed() > IDLE {
            socket.abort();
            return false;
        }
        // Read only while the guest reads its answers: otherwise they would pile up here.
        while socket.can_recv() && self.inbox.len() < MAX_MESSAGE + 2 && !self.backed_up() {
            let room = MAX_MESSAGE + 2 - self.inbox.len();
            let inbox = &mut self.inbox;
            let _ = socket.recv(|data| {
                let n = data.len().min(room);
                inbox.extend_from_slice(&data[..n]);
                (n, ())
            });
            self.last = Instant::now();
        }
        while self.inbox.len() >= 2 && !self.backed_up() {
            let len = usize::from(u16::from_be_bytes([self.inbox[0], self.inbox[1]]));
            if self.inbox.len() < 2 + len {
                break;
            }
            let query: Vec<u8> = self.inbox.drain(..2 + len).skip(2).collect();
            if let Some(name) = upstream_name(policy, &query) {
                self.to_upstream.push((query, name));
                continue;
            }
            let answer = {
                let mut names = names.lock().unwrap_or_else(|e| e.into_inner());
                answer(policy, &mut names, &query)
            };
            match answer {
                Some((reply, outcome)) => {
                    counters.dns_answered(outcome);
                    self.outbox
                        .extend_from_slice(&(reply.len().min(MAX_MESSAGE) as u16).to_be_bytes());
                    self.outbox
                        .extend_from_slice(&reply[..reply.len().min(MAX_MESSAGE)]);
                }
                None => {
                    // Not even a header: nothing sensible to say on this stream.
                    socket.abort();
                    return false;
                }
            }
        }
        self.send_pending(socket)
    }

    /// Whether answers wait for the guest (or the resolver) beyond the caps: take no more
    /// queries until they drain.
    fn backed_up(&self) -> bool {
        self.outbox.len() > OUTBOX_CAP || self.awaiting + self.to_upstream.len() >= MAX_AWAITING
    }

    /// An answer for this connection (from the upstream resolver).
    pub fn reply(&mut self, message: &[u8]) {
        let len = message.len().min(MAX_MESSAGE);
        self.outbox.extend_from_slice(&(len as u16).to_be_bytes());
        self.outbox.extend_from_slice(&message[..len]);
        self.last = Instant::now();
        self.awaiting = self.awaiting.saturating_sub(1);
    }

    fn send_pending(&mut self, socket: &mut Socket<'_>) -> bool {
        if !self.outbox.is_empty() {
            if let Ok(n) = socket.send_slice(&self.outbox) {
                self.outbox.drain(..n);
            }
        }
        if socket.state() == State::CloseWait
            && self.outbox.is_empty()
            && self.awaiting == 0
            && self.to_upstream.is_empty()
        {
            // The guest has said all it will: finish our side too.
            socket.close();
        }
        true
    }
}
