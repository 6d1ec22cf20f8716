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

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

use super::connect::{self, Reply};
use super::route::Route;
use crate::stack::Stack;

/// How long the proxy gets to accept a CONNECT.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Identifies a guest connection: guest port, destination address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest_port: u16,
    pub dst: std::net::Ipv4Addr,
    pub dst_port: u16,
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest:{} -> {}:{}",
            self.guest_port, self.dst, self.dst_port
        )
    }
}

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
    pub route: Route,
    pub handle: SocketHandle,
    pub stream: TcpStream,
    pub token: u64,
    pub phase: Phase,
    request: Vec<u8>,
    request_sent: usize,
    reply: Vec<u8>,
    /// Bytes from the proxy not yet in the guest socket.
    pending_down: Vec<u8>,
    /// Edge-triggered readiness of the proxy socket.
    pub readable: bool,
    pub writable: bool,
    upstream_shut: bool,
    upstream_eof: bool,
    started: Instant,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Flow {
    pub fn new(
        key: FlowKey,
        route: Route,
        handle: SocketHandle,
        stream: TcpStream,
        token: u64,
    ) -> Flow {
        let request = connect::request(&route.target, route.port);
        Flow {
            key,
            route,
            handle,
            stream,
            token,
            phase: Phase::Connecting,
            request,
            request_sent: 0,
            reply: Vec::new(),
            pending_down: Vec::new(),
            readable: false,
            writable: false,
            upstream_shut: false,
            upstream_eof: false,
            started: Instant::now(),
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    pub fn proxy(&self) -> SocketAddr {
        self.route.proxy
    }

    /// Advance the flow as far as it can go now. Returns whether anything moved.
    pub fn step(&mut self, stack: &mut Stack) -> bool {
        let before = (
            self.bytes_up,
            self.bytes_down,
            self.request_sent,
            self.reply.len(),
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
                    self.reply.len(),
                )
    }

    fn finish(&mut self, stack: &mut Stack, end: End) {
        match end {
            End::Closed => {}
            End::GuestReset => {
                // Tell the proxy side as loudly: a reset, not a clean close.
                let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
            }
            _ => stack.socket(self.handle).abort(),
        }
        let _ = self.stream.shutdown(Shutdown::Both);
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
                return;
            }
            match self.stream.take_error() {
                Ok(None) if self.stream.peer_addr().is_ok() => self.phase = Phase::Handshake,
                _ => return self.finish(stack, End::ProxyUnreachable),
            }
        }
        while self.request_sent < self.request.len() && self.writable {
            match self.stream.write(&self.request[self.request_sent..]) {
                Ok(n) => self.request_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Err(_) => return self.finish(stack, End::ProxyUnreachable),
            }
        }
        let mut buf = [0u8; 2048];
        while self.readable {
            match self.stream.read(&mut buf) {
                Ok(0) => return self.finish(stack, End::ProxyBadReply),
                Ok(n) => {
                    self.reply.extend_from_slice(&buf[..n]);
                    match connect::parse_reply(&self.reply) {
                        Reply::Incomplete => continue,
                        Reply::Accepted { header_len } => {
                            self.pending_down = self.reply.split_off(header_len);
                            self.phase = Phase::Open;
                            stack.socket(self.handle).pause_synack(false);
                            tracing::info!(flow = %self.key, target = %self.route.target, port = self.route.port, rule = self.route.rule, "flow open");
                            return;
                        }
                        Reply::Refused(code) => return self.finish(stack, End::ProxyRefused(code)),
                        Reply::Malformed => return self.finish(stack, End::ProxyBadReply),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                Err(_) => return self.finish(stack, End::ProxyUnreachable),
            }
        }
    }

    fn splice(&mut self, stack: &mut Stack) {
        let socket = stack.socket(self.handle);
        let state = socket.state();
        if state == State::Closed && !(self.upstream_eof && self.upstream_shut) {
            // Closed before both directions finished: the guest reset the connection.
            return self.finish(stack, End::GuestReset);
        }
        // Guest -> proxy: only what the proxy socket takes leaves the guest's buffer.
        while socket.can_recv() && self.writable {
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
        if !socket.may_recv()
            && socket.recv_queue() == 0
            && !self.upstream_shut
            && state != State::SynReceived
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
            let mut result = Ok(0);
            let _ = socket.send(|room| {
                result = stream.read(room);
                (*result.as_ref().unwrap_or(&0), ())
            });
            match result {
                Ok(0) => {
                    // End of the proxy's stream: FIN to the guest once its data is out.
                    self.upstream_eof = true;
                    socket.close();
                }
                Ok(n) => self.bytes_down += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                Err(_) => return self.finish(stack, End::ProxyReset),
            }
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
