//! One guest TCP connection carried to the host proxy: its phases, and the splice.
//!
//! Phases: `Connecting` (to the proxy) -> `Handshake` (CONNECT sent, reply awaited; the
//! guest's SYN-ACK is held) -> `Open` (SYN-ACK released, bytes spliced both ways) -> `Done`.
//! Backpressure is natural: bytes leave the guest socket only as fast as the proxy socket
//! takes them (so the guest's window closes), and the proxy is read only while the guest
//! socket has room.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::stack::SocketHandle;
use smoltcp::socket::tcp::State;

use super::connect;
use super::explicit::Front;
use super::key::FlowKey;
use super::socks5;
use super::tokens::Registration;
use crate::firewall::gate::{Admitted, Target};
use crate::stack::Stack;

/// An open flow with no bytes either way for this long is reset (both sides).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// How long the proxy gets to accept a CONNECT.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// The proxy could not be reached.
    ProxyUnreachable,
    /// The proxy answered CONNECT with a non-2xx status.
    ProxyRefused(u16),
    /// The proxy did not speak HTTP or took too long.
    ProxyBadReply,
    /// The guest reset or gave up on the connection.
    GuestReset,
    /// The proxy side reset the connection.
    ProxyReset,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// A reloaded policy no longer allows the flow.
    PolicyReset,
}

impl End {
    pub fn as_str(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ProxyUnreachable => "proxy_unreachable",
            End::ProxyRefused(_) => "proxy_refused",
            End::ProxyBadReply => "proxy_bad_reply",
            End::GuestReset => "guest_reset",
            End::ProxyReset => "proxy_reset",
            End::IdleTimeout => "idle_timeout",
            End::PolicyReset => "policy_reset",
        }
    }
}

/// Where a flow's host side leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowRoute {
    /// Out of the guest, to a proxy, as the gate admitted it.
    Egress(Admitted),
    /// Into the guest: a host peer of a `[[forward]]` (already connected).
    Forward { peer: SocketAddr, guest_port: u16 },
}

impl FlowRoute {
    /// `target:port` for logs and the flow table.
    pub fn describe(&self) -> String {
        match self {
            FlowRoute::Egress(a) => format!("{}:{}", a.target(), a.port()),
            FlowRoute::Forward { peer, guest_port } => {
                format!("forward {peer} -> guest:{guest_port}")
            }
        }
    }

    /// The `[[outbound]]` rule that allowed it (none for forwards).
    pub fn rule(&self) -> Option<usize> {
        match self {
            FlowRoute::Egress(a) => Some(a.rule()),
            FlowRoute::Forward { .. } => None,
        }
    }
}

/// What is said to the proxy before bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// Nothing: a forward's host peer is already connected.
    Splice,
    /// `CONNECT target:port`, wait for 2xx.
    HttpConnect,
    /// SOCKS5 greeting, then CONNECT.
    Socks5Greeting,
    Socks5Connect,
}

/// One step of a negotiation after reading from the proxy.
enum Step {
    Incomplete,
    /// Send this next; `consumed` reply bytes are done with.
    Send(Vec<u8>, usize),
    /// Open; bytes after `consumed` belong to the stream.
    Open(usize),
    Refused(u16),
    Malformed,
}

impl Negotiation {
    fn first(self, target: &Target, port: u16) -> Vec<u8> {
        match self {
            Negotiation::Splice => Vec::new(),
            Negotiation::HttpConnect => connect::request(target, port),
            Negotiation::Socks5Greeting | Negotiation::Socks5Connect => socks5::greeting(),
        }
    }

    fn on_reply(&mut self, buf: &[u8], target: &Target, port: u16) -> Step {
        match self {
            Negotiation::Splice => Step::Open(0),
            Negotiation::HttpConnect => match connect::parse_reply(buf) {
                connect::Reply::Incomplete => Step::Incomplete,
                connect::Reply::Accepted { header_len } => Step::Open(header_len),
                connect::Reply::Refused(code) => Step::Refused(code),
                connect::Reply::Malformed => Step::Malformed,
            },
            Negotiation::Socks5Greeting => match socks5::parse_method(buf) {
                socks5::Reply::Incomplete => Step::Incomplete,
                socks5::Reply::Done(n) => match socks5::connect_request(target, port) {
                    Some(req) => {
                        *self = Negotiation::Socks5Connect;
                        Step::Send(req, n)
                    }
                    None => Step::Malformed,
                },
                socks5::Reply::Refused(code) => Step::Refused(u16::from(code)),
                socks5::Reply::Malformed => Step::Malformed,
            },
            Negotiation::Socks5Connect => match socks5::parse_connect_reply(buf) {
                socks5::Reply::Incomplete => Step::Incomplete,
                socks5::Reply::Done(n) => Step::Open(n),
                socks5::Reply::Refused(code) => Step::Refused(u16::from(code)),
                socks5::Reply::Malformed => Step::Malformed,
            },
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Handshake,
    Open,
    Done(End),
}

/// A flow and its proxy connection.
#[derive(Debug)]
pub struct Flow {
    pub key: FlowKey,
    pub route: FlowRoute,
    /// Set for a request taken on the explicit-proxy port: what the guest and the tunnel
    /// get once the proxy accepts, and the HTTP error the guest gets if it refuses.
    front: Option<Front>,
    /// Bytes for the proxy before the guest's own (an explicit-proxy request, rewritten).
    pending_up: Vec<u8>,
    pub handle: SocketHandle,
    /// The proxy socket's place in the event loop: declared before the socket, so it
    /// leaves the loop (and gives its token back) before the socket closes.
    pub registration: Registration,
    pub stream: TcpStream,
    pub phase: Phase,
    negotiation: Negotiation,
    request: Vec<u8>,
    request_sent: usize,
    reply: Vec<u8>,
    /// Bytes from the proxy not yet in the guest socket.
    pending_down: Vec<u8>,
    /// Edge-triggered readiness of the proxy socket.
    pub readable: bool,
    pub writable: bool,
    /// An event said the proxy side closed or failed: read until the end, even after a
    /// short read ([`Flow::note_read`]).
    pub peer_closing: bool,
    upstream_shut: bool,
    upstream_eof: bool,
    started: Instant,
    /// Last time bytes moved either way.
    active: Instant,
    idle_timeout: Duration,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Flow {
    pub fn new(
        key: FlowKey,
        route: FlowRoute,
        negotiation: Negotiation,
        handle: SocketHandle,
        stream: TcpStream,
        registration: Registration,
    ) -> Flow {
        let request = match &route {
            FlowRoute::Egress(a) => negotiation.first(a.target(), a.port()),
            FlowRoute::Forward { .. } => Vec::new(),
        };
        Flow {
            key,
            route,
            front: None,
            pending_up: Vec::new(),
            handle,
            // The flow owns the stream's only descriptor and drops it right after.
            registration: registration.closes_with_socket(),
            stream,
            phase: Phase::Connecting,
            negotiation,
            request,
            request_sent: 0,
            reply: Vec::new(),
            pending_down: Vec::new(),
            readable: false,
            writable: false,
            peer_closing: false,
            upstream_shut: false,
            upstream_eof: false,
            started: Instant::now(),
            active: Instant::now(),
            idle_timeout: DEFAULT_IDLE,
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    /// This flow carries a request taken on the explicit-proxy port.
    pub fn set_front(&mut self, front: Front) {
        self.front = Some(front);
    }

    /// Whether this flow came from the explicit-proxy port.
    pub fn is_front(&self) -> bool {
        self.front.is_some()
    }

    /// Advance the flow as far as it can go now. Returns whether anything moved.
    pub fn step(&mut self, stack: &mut Stack) -> bool {
        let before = (
            self.bytes_up,
            self.bytes_down,
            self.request_sent,
            self.reply.len() + self.pending_up.len(),
        );
        let was = std::mem::discriminant(&self.phase);
        match self.phase {
            Phase::Connecting | Phase::Handshake => self.handshake(stack),
            Phase::Open => self.splice(stack),
            Phase::Done(_) => {}
        }
        was != std::mem::discriminant(&self.phase)
            || before
                != (
                    self.bytes_up,
                    self.bytes_down,
                    self.request_sent,
                    self.reply.len() + self.pending_up.len(),
                )
    }

    fn finish(&mut self, stack: &mut Stack, end: End) {
        match end {
            End::Closed => {
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            End::GuestReset => {
                // Tell the proxy side as loudly: a reset, not a clean close. No shutdown
                // (that would send a FIN first): closing the socket when the flow is reaped
                // sends the RST.
                let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
            }
            End::ProxyRefused(_) | End::ProxyUnreachable | End::ProxyBadReply
                if self.front.is_some() && self.phase != Phase::Open =>
            {
                // An explicit-proxy client gets an HTTP answer, not a reset.
                let socket = stack.socket(self.handle);
                let _ = socket.send_slice(&super::explicit::error_response(
                    502,
                    &format!("the proxy did not open the tunnel ({})", end.as_str()),
                ));
                socket.close();
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            _ => {
                stack.socket(self.handle).abort();
                // Both sides are reset: the proxy's too (SO_LINGER 0, no shutdown, so the
                // close when the flow is reaped sends an RST and no FIN before it).
                let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
            }
        }
        self.phase = Phase::Done(end);
    }

    fn handshake(&mut self, stack: &mut Stack) {
        let state = stack.socket(self.handle).state();
        if matches!(state, State::Listen | State::Closed) {
            // The guest reset its SYN (or gave up) while the proxy was being asked.
            self.finish(stack, End::GuestReset);
            return;
        }
        if self.started.elapsed() > HANDSHAKE_TIMEOUT {
            self.finish(stack, End::ProxyBadReply);
            return;
        }
        if self.phase == Phase::Connecting {
            if !self.writable && !self.readable {
                // To a proxy on loopback, connect(2) has usually finished by the time it
                // returns EINPROGRESS: send the request now, not a wakeup later. A write
                // that succeeds proves the connection; EAGAIN means it is still being made.
                if self.request_sent > 0 || self.request.is_empty() {
                    return;
                }
                match self.stream.write(&self.request) {
                    Ok(n) => {
                        self.request_sent = n;
                        self.phase = Phase::Handshake;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(_) => return self.finish(stack, End::ProxyUnreachable),
                }
            } else {
                match self.stream.take_error() {
                    Ok(None) if self.stream.peer_addr().is_ok() => self.phase = Phase::Handshake,
                    _ => return self.finish(stack, End::ProxyUnreachable),
                }
            }
        }
        while self.request_sent < self.request.len() && self.writable {
            match self.stream.write(&self.request[self.request_sent..]) {
                Ok(n) => self.request_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Err(_) => return self.finish(stack, End::ProxyUnreachable),
            }
        }
        if self.negotiation == Negotiation::Splice && self.request_sent == self.request.len() {
            return self.open(stack, 0);
        }
        let mut buf = [0u8; 2048];
        while self.readable {
            match self.stream.read(&mut buf) {
                Ok(0) => return self.finish(stack, End::ProxyBadReply),
                Ok(n) => {
                    self.note_read(n, buf.len());
                    self.reply.extend_from_slice(&buf[..n]);
                    if self.reply.len() > connect::MAX_REPLY {
                        return self.finish(stack, End::ProxyBadReply);
                    }
                    let FlowRoute::Egress(admitted) = &self.route else {
                        return self.open(stack, 0);
                    };
                    match self
                        .negotiation
                        .on_reply(&self.reply, admitted.target(), admitted.port())
                    {
                        Step::Incomplete => continue,
                        Step::Send(next, consumed) => {
                            self.reply.drain(..consumed);
                            self.request = next;
                            self.request_sent = 0;
                            // Write it now if the socket takes it (else on the next OUT event).
                            return self.handshake(stack);
                        }
                        Step::Open(consumed) => return self.open(stack, consumed),
                        Step::Refused(code) => return self.finish(stack, End::ProxyRefused(code)),
                        Step::Malformed => return self.finish(stack, End::ProxyBadReply),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                Err(_) => return self.finish(stack, End::ProxyUnreachable),
            }
        }
    }

    /// The proxy accepted: release the guest's SYN-ACK and start splicing.
    fn open(&mut self, stack: &mut Stack, consumed: usize) {
        self.pending_down = self.reply.split_off(consumed.min(self.reply.len()));
        self.reply.clear();
        self.phase = Phase::Open;
        let socket = stack.socket(self.handle);
        socket.pause_synack(false);
        if let Some(front) = &self.front {
            // The request head was for moat, not for the origin: take it out of the stream,
            // then answer the client (CONNECT) or send the origin its rewritten request.
            let mut left = front.head_len;
            while left > 0 {
                match socket.recv(|d| {
                    let n = d.len().min(left);
                    (n, n)
                }) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left -= n,
                }
            }
            let mut down = front.to_guest.clone();
            down.append(&mut self.pending_down);
            self.pending_down = down;
            self.pending_up = front.to_origin.clone();
        }
        tracing::info!(flow = %self.key, target = %self.route.describe(), rule = ?self.route.rule(), "flow open");
    }

    /// A read from the proxy socket gave `n` of the `offered` bytes: fewer means the socket
    /// is drained (data arriving later raises a new edge), so no read just to see EAGAIN;
    /// unless the proxy side is closing, whose end is already queued and raises none.
    fn note_read(&mut self, n: usize, offered: usize) {
        if n < offered && !self.peer_closing {
            self.readable = false;
        }
    }

    /// Reset both sides now (a reloaded policy no longer allows the flow).
    pub fn reset(&mut self, stack: &mut Stack) {
        if !matches!(self.phase, Phase::Done(_)) {
            self.finish(stack, End::PolicyReset);
        }
    }

    /// How long the flow has existed.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// The phase, for the flow table.
    pub fn state(&self) -> &'static str {
        match self.phase {
            Phase::Connecting => "connecting",
            Phase::Handshake => "handshake",
            Phase::Open => "open",
            Phase::Done(end) => end.as_str(),
        }
    }

    /// Whether a deadline of the flow has passed (handshake, idle): a sweep steps only
    /// these, so flows with nothing to do cost no socket work.
    pub fn due(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Connecting | Phase::Handshake => {
                now.duration_since(self.started) > HANDSHAKE_TIMEOUT
            }
            Phase::Open => now.duration_since(self.active) > self.idle_timeout,
            Phase::Done(_) => true,
        }
    }

    /// Reset the flow after `idle` without traffic (default [`DEFAULT_IDLE`]).
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle_timeout = idle;
    }

    fn splice(&mut self, stack: &mut Stack) {
        if self.active.elapsed() > self.idle_timeout {
            tracing::info!(flow = %self.key, "idle flow reset");
            return self.finish(stack, End::IdleTimeout);
        }
        let moved_before = (self.bytes_up, self.bytes_down);
        let socket = stack.socket(self.handle);
        let state = socket.state();
        if state == State::Closed && !(self.upstream_eof && self.upstream_shut) {
            // Closed before both directions finished: the guest reset the connection.
            return self.finish(stack, End::GuestReset);
        }
        // A rewritten explicit-proxy request goes first.
        while !self.pending_up.is_empty() && self.writable {
            match self.stream.write(&self.pending_up) {
                Ok(0) => return self.finish(stack, End::ProxyReset),
                Ok(n) => {
                    self.pending_up.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Err(_) => return self.finish(stack, End::ProxyReset),
            }
        }
        let socket = stack.socket(self.handle);
        // Guest -> proxy: only what the proxy socket takes leaves the guest's buffer.
        while self.pending_up.is_empty() && socket.can_recv() && self.writable {
            let stream = &mut self.stream;
            let mut result = Ok(0);
            let _ = socket.recv(|data| {
                result = stream.write(data);
                (*result.as_ref().unwrap_or(&0), ())
            });
            match result {
                Ok(n) => self.bytes_up += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Err(_) => return self.finish(stack, End::ProxyReset),
            }
        }
        let socket = stack.socket(self.handle);
        let guest_sent_fin = matches!(
            state,
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        );
        if guest_sent_fin
            && socket.recv_queue() == 0
            && self.pending_up.is_empty()
            && !self.upstream_shut
        {
            // The guest sent FIN and everything before it went out: half-close upstream.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.upstream_shut = true;
        }
        // Proxy -> guest: read only while the guest socket has room.
        if !self.pending_down.is_empty() && socket.can_send() {
            if let Ok(n) = socket.send_slice(&self.pending_down) {
                self.pending_down.drain(..n);
                self.bytes_down += n as u64;
            }
        }
        while self.pending_down.is_empty()
            && self.readable
            && !self.upstream_eof
            && socket.can_send()
        {
            let stream = &mut self.stream;
            let (mut result, mut offered) = (Ok(0), 0);
            let _ = socket.send(|room| {
                offered = room.len();
                result = stream.read(room);
                (*result.as_ref().unwrap_or(&0), ())
            });
            match result {
                Ok(0) => {
                    // End of the proxy's stream: FIN to the guest once its data is out.
                    self.upstream_eof = true;
                    socket.close();
                }
                Ok(n) => {
                    self.bytes_down += n as u64;
                    self.note_read(n, offered);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                Err(_) => return self.finish(stack, End::ProxyReset),
            }
        }
        if self.upstream_eof && self.readable {
            // Nothing is read after the proxy's FIN; a reset that follows it (the guest wrote
            // to a proxy that is gone) shows as a pending socket error: pass it on.
            self.readable = false;
            if let Ok(Some(_)) = self.stream.take_error() {
                return self.finish(stack, End::ProxyReset);
            }
        }
        if moved_before != (self.bytes_up, self.bytes_down) {
            self.active = Instant::now();
        }
        let state = socket.state();
        if self.upstream_eof
            && self.upstream_shut
            && matches!(state, State::Closed | State::TimeWait)
        {
            self.phase = Phase::Done(End::Closed);
        }
    }
}
