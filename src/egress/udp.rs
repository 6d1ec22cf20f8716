//! UDP flows through the SOCKS5 proxy (UDP ASSOCIATE, RFC 1928 section 7): one association
//! per guest (port, destination), with its control connection and its own relay socket, all
//! non-blocking in the queue's event loop. Replies come back to the guest from the
//! destination it sent to.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;

use super::route::Route;
use super::socks5;

/// An association idle this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// Datagrams from the guest held while the association is being set up, at most.
const MAX_QUEUED: usize = 64;
/// How long the proxy gets to set up an association.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpKey {
    pub guest_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
}

impl UdpKey {
    /// The same 3-tuple as a TCP flow's key (flow owners keep both kinds).
    pub fn flow_key(self) -> super::flow::FlowKey {
        super::flow::FlowKey {
            guest_port: self.guest_port,
            dst: self.dst,
            dst_port: self.dst_port,
        }
    }
}

impl std::fmt::Display for UdpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "udp guest:{} -> {}:{}",
            self.guest_port, self.dst, self.dst_port
        )
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Greeting,
    Associating,
    Open(SocketAddr),
    Done,
}

/// One UDP association.
#[derive(Debug)]
pub struct Assoc {
    pub key: UdpKey,
    pub route: Route,
    pub control: TcpStream,
    pub relay: UdpSocket,
    pub control_token: u64,
    pub relay_token: u64,
    phase: Phase,
    request: Vec<u8>,
    sent: usize,
    reply: Vec<u8>,
    queued: Vec<Vec<u8>>,
    started: Instant,
    last: Instant,
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    pub failed: bool,
}

impl Assoc {
    pub fn new(
        key: UdpKey,
        route: Route,
        control: TcpStream,
        relay: UdpSocket,
        control_token: u64,
        relay_token: u64,
    ) -> Assoc {
        Assoc {
            key,
            route,
            control,
            relay,
            control_token,
            relay_token,
            phase: Phase::Connecting,
            request: socks5::greeting(),
            sent: 0,
            reply: Vec::new(),
            queued: Vec::new(),
            started: Instant::now(),
            last: Instant::now(),
            datagrams_up: 0,
            datagrams_down: 0,
            failed: false,
        }
    }

    /// End the association (a reloaded policy no longer allows it).
    pub fn close(&mut self) {
        self.phase = Phase::Done;
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn fail(&mut self, why: &str) {
        tracing::info!(flow = %self.key, proxy = %self.route.proxy, why, "udp association failed");
        self.failed = true;
        self.phase = Phase::Done;
    }

    /// A datagram from the guest: sent now if the association is open, else queued.
    pub fn send(&mut self, payload: &[u8]) {
        self.last = Instant::now();
        match self.phase {
            Phase::Open(relay) => self.relay_out(relay, payload),
            Phase::Done => {}
            _ if self.queued.len() < MAX_QUEUED => self.queued.push(payload.to_vec()),
            _ => {}
        }
    }

    fn relay_out(&mut self, relay: SocketAddr, payload: &[u8]) {
        let Some(mut datagram) = socks5::udp_header(&self.route.target, self.route.port) else {
            return self.fail("target name too long for SOCKS5");
        };
        datagram.extend_from_slice(payload);
        if self.relay.send_to(&datagram, relay).is_ok() {
            self.datagrams_up += 1;
        }
    }

    /// Drive the control connection; deliver what the relay has, as IP packets for the guest.
    pub fn step(&mut self, guest: Ipv4Addr, mtu: usize, out: &mut Vec<Vec<u8>>) {
        if self.phase != Phase::Done
            && !matches!(self.phase, Phase::Open(_))
            && self.started.elapsed() > SETUP_TIMEOUT
        {
            return self.fail("setup timed out");
        }
        if self.last.elapsed() > IDLE {
            self.phase = Phase::Done;
            return;
        }
        if self.phase == Phase::Connecting {
            match self.control.take_error() {
                Ok(None) if self.control.peer_addr().is_ok() => self.phase = Phase::Greeting,
                Ok(None) => return,
                _ => return self.fail("proxy unreachable"),
            }
        }
        if !matches!(self.phase, Phase::Open(_)) {
            while self.sent < self.request.len() {
                match self.control.write(&self.request[self.sent..]) {
                    Ok(n) => self.sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(_) => return self.fail("proxy closed the control connection"),
                }
            }
        }
        let mut buf = [0u8; 512];
        loop {
            match self.control.read(&mut buf) {
                Ok(0) => return self.phase = Phase::Done, // the association ends with its control connection
                Ok(n) => self.reply.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return self.fail("control connection reset"),
            }
            if self.reply.len() > 1024 {
                return self.fail("oversized reply");
            }
        }
        match self.phase {
            Phase::Greeting => match socks5::parse_method(&self.reply) {
                socks5::Reply::Incomplete => {}
                socks5::Reply::Done(n) => {
                    self.reply.drain(..n);
                    let local = match self.relay.local_addr() {
                        Ok(SocketAddr::V4(a)) => a,
                        _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                    };
                    self.request = socks5::udp_associate_request(local);
                    self.sent = 0;
                    self.phase = Phase::Associating;
                    return self.step(guest, mtu, out);
                }
                _ => return self.fail("proxy refused the greeting"),
            },
            Phase::Associating => match socks5::parse_connect_reply(&self.reply) {
                socks5::Reply::Incomplete => {}
                socks5::Reply::Done(n) => {
                    let Some(mut relay) = socks5::reply_address(&self.reply[..n]) else {
                        return self.fail("no relay address");
                    };
                    if relay.ip().is_unspecified() {
                        relay.set_ip(self.route.proxy.ip());
                    }
                    self.reply.drain(..n);
                    self.phase = Phase::Open(relay);
                    tracing::info!(flow = %self.key, target = %self.route.target, %relay, "udp association open");
                    for payload in std::mem::take(&mut self.queued) {
                        self.relay_out(relay, &payload);
                    }
                }
                socks5::Reply::Refused(code) => {
                    return self.fail(&format!("proxy refused UDP ASSOCIATE (code {code})"))
                }
                socks5::Reply::Malformed => return self.fail("malformed reply"),
            },
            _ => {}
        }
        let Phase::Open(relay) = self.phase else {
            return;
        };
        let mut datagram = vec![0u8; 65_536];
        while let Ok((n, from)) = self.relay.recv_from(&mut datagram) {
            if from != relay {
                continue; // only the relay speaks to this socket
            }
            let Some(payload) = socks5::udp_payload(&datagram[..n]) else {
                continue;
            };
            if payload.len() + 28 > mtu {
                continue; // does not fit the guest's MTU; UDP has no way to say so
            }
            self.last = Instant::now();
            self.datagrams_down += 1;
            let builder = PacketBuilder::ipv4(self.key.dst.octets(), guest.octets(), 64)
                .udp(self.key.dst_port, self.key.guest_port);
            let mut packet = Vec::with_capacity(builder.size(payload.len()));
            if builder.write(&mut packet, payload).is_ok() {
                out.push(packet);
            }
        }
    }
}
