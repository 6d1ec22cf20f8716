//! UDP flows through the SOCKS5 proxy (UDP ASSOCIATE, RFC 1928 section 7): one association
//! per guest (port, destination), with its control connection and its own relay socket, all
//! non-blocking in the queue's event loop. Replies come back to the guest from the
//! destination it sent to.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::key::FlowKey;
use super::socks5;
use super::tokens::Registration;
use crate::firewall::gate::Admitted;

/// An association idle this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// Datagrams from the guest held while the association is being set up, at most.
const MAX_QUEUED: usize = 64;
/// Datagrams sent to the relay in one sendmmsg, at most (then the batch goes out at once).
const MAX_BATCH: usize = 256;
/// Room an association keeps for its batch between bursts, at most.
const KEPT_BATCH_BYTES: usize = 16 * 1024;
/// UDP GSO (linux/udp.h UDP_SEGMENT; not in the libc crate for glibc): one send carries up
/// to 64 datagrams of one size, split by the kernel as late as it can.
const UDP_SEGMENT: libc::c_int = 103;
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;
/// How long the proxy gets to set up an association.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub key: FlowKey,
    pub route: Admitted,
    /// The sockets' places in the event loop, declared before the sockets so that they
    /// leave the loop (and give their tokens back) before the sockets close.
    _registrations: [Registration; 2],
    pub control: TcpStream,
    pub relay: UdpSocket,
    phase: Phase,
    /// The SOCKS5 UDP request header every datagram to the relay starts with (None: the
    /// target name is too long for SOCKS5).
    header: Option<Vec<u8>>,
    /// Datagrams (header + payload) for the relay, sent together at the end of a TX batch.
    batch: Vec<u8>,
    batch_lens: Vec<usize>,
    /// UDP GSO works on this socket (cleared at the first refusal).
    gso: bool,
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
        key: FlowKey,
        route: Admitted,
        control: TcpStream,
        relay: UdpSocket,
        // The control connection's and the relay's, in that order.
        registrations: [Registration; 2],
    ) -> Assoc {
        let header = socks5::udp_header(route.target(), route.port());
        Assoc {
            key,
            header,
            batch: Vec::new(),
            batch_lens: Vec::new(),
            gso: true,
            route,
            _registrations: registrations,
            control,
            relay,
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
        tracing::info!(flow = %self.key.udp(), proxy = %self.route.proxy(), why, "udp association failed");
        self.failed = true;
        self.phase = Phase::Done;
    }

    /// A datagram from the guest: batched for the relay if the association is open (sent by
    /// the next `step`, at the end of the guest's TX batch), else queued.
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
        let Some(header) = &self.header else {
            return self.fail("target name too long for SOCKS5");
        };
        self.batch.extend_from_slice(header);
        self.batch.extend_from_slice(payload);
        self.batch_lens.push(header.len() + payload.len());
        if self.batch_lens.len() >= MAX_BATCH {
            self.flush(relay);
        }
    }

    /// Send the batched datagrams to the relay. Datagrams of one size (the usual stream) go
    /// as UDP GSO sends, up to 64 a call; others in one sendmmsg. What the socket does not
    /// take (its buffer full) is lost, as UDP is.
    fn flush(&mut self, relay: SocketAddr) {
        if self.batch_lens.is_empty() {
            return;
        }
        let mut sent = 0usize;
        let (mut start, mut offset) = (0usize, 0usize);
        while start < self.batch_lens.len() {
            // The longest run from `start` that one GSO send can carry: equal sizes, the
            // last may be shorter, at most GSO_MAX_SEGMENTS and GSO_MAX_BYTES.
            let seg = self.batch_lens[start];
            let mut end = start + 1;
            let mut bytes = seg;
            while end < self.batch_lens.len()
                && end - start < GSO_MAX_SEGMENTS
                && self.batch_lens[end] <= seg
                && bytes + self.batch_lens[end] <= GSO_MAX_BYTES
            {
                bytes += self.batch_lens[end];
                end += 1;
                if self.batch_lens[end - 1] < seg {
                    break;
                }
            }
            let run = &self.batch[offset..offset + bytes];
            let lens = &self.batch_lens[start..end];
            let gso = if lens.len() > 1 && self.gso {
                Some(send_gso(&self.relay, relay, run, seg))
            } else {
                None
            };
            match gso {
                Some(Ok(())) => sent += lens.len(),
                // The socket's buffer is full: this run is lost, as UDP is; GSO stays on.
                Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Some(Err(_)) => {
                    // This kernel or socket cannot do UDP GSO: batches from now on.
                    self.gso = false;
                    sent += send_batch(&self.relay, relay, run, lens);
                }
                None => sent += send_batch(&self.relay, relay, run, lens),
            }
            start = end;
            offset += bytes;
        }
        self.datagrams_up += sent as u64;
        self.batch.clear();
        self.batch_lens.clear();
        // A burst's room is not kept: every association of the VM could hold one.
        self.batch.shrink_to(KEPT_BATCH_BYTES);
    }

    /// Drive the control connection, send what the guest sent since the last step, deliver
    /// what the relay has as IP packets for the guest. `scratch` holds one datagram.
    pub fn step(
        &mut self,
        guest: Ipv4Addr,
        mtu: usize,
        scratch: &mut [u8],
        out: &mut Vec<Vec<u8>>,
    ) {
        if let Phase::Open(relay) = self.phase {
            self.flush(relay);
        }
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
                    return self.step(guest, mtu, scratch, out);
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
                        relay.set_ip(self.route.proxy().ip());
                    }
                    self.reply.drain(..n);
                    self.phase = Phase::Open(relay);
                    tracing::info!(flow = %self.key.udp(), target = %self.route.target(), %relay, "udp association open");
                    for payload in std::mem::take(&mut self.queued) {
                        self.relay_out(relay, &payload);
                    }
                    self.flush(relay);
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
        let datagram = scratch;
        while let Ok((n, from)) = self.relay.recv_from(datagram) {
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
            let (from, to) = (
                SocketAddrV4::new(self.key.dst, self.key.dst_port),
                SocketAddrV4::new(guest, self.key.guest_port),
            );
            out.extend(crate::frame::udp_packet(from, to, payload));
        }
    }
}

/// Send `buf` as datagrams of `seg` bytes each (the last may be shorter) in one sendmsg(2)
/// with a UDP_SEGMENT control message. By hand, like `send_batch`: a cmsg around one call.
fn send_gso(socket: &UdpSocket, to: SocketAddr, buf: &[u8], seg: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let addr = socket2::SockAddr::from(to);
    let seg = u16::try_from(seg).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for one cmsghdr carrying a u16, aligned as cmsghdr wants.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; every pointer set below stays alive for the call,
    // CMSG_* only compute offsets within `control`, which is large enough for one u16 cmsg.
    let sent = unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = addr.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space.min(std::mem::size_of_val(&control));
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, seg);
        libc::sendmsg(socket.as_raw_fd(), &msg, 0)
    };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Send `lens.len()` datagrams, laid end to end in `buf`, to `to` with sendmmsg(2); returns
/// how many the socket took. By hand: std and socket2 have no sendmmsg, and the call is a
/// thin wrapper over arrays of iovecs (no protocol is involved).
fn send_batch(socket: &UdpSocket, to: SocketAddr, buf: &[u8], lens: &[usize]) -> usize {
    use std::os::fd::AsRawFd;
    let addr = socket2::SockAddr::from(to);
    let mut iovecs = Vec::with_capacity(lens.len());
    let mut offset = 0;
    for &len in lens {
        let Some(datagram) = buf.get(offset..offset + len) else {
            break;
        };
        iovecs.push(libc::iovec {
            iov_base: datagram.as_ptr() as *mut libc::c_void,
            iov_len: len,
        });
        offset += len;
    }
    let mut msgs: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: zeroed msghdr/mmsghdr are valid (null pointers, zero lengths) before
            // the fields below are set.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = addr.len();
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut sent = 0usize;
    while sent < msgs.len() {
        let left = &mut msgs[sent..];
        // SAFETY: every mmsghdr points at `addr` and at one iovec over `buf`, all alive for
        // the call; the kernel reads them and writes only msg_len.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                left.as_mut_ptr(),
                left.len() as libc::c_uint,
                0,
            )
        };
        if n <= 0 {
            break; // EAGAIN (socket buffer full) or an error: the rest is lost
        }
        sent += n as usize;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_batch_sends_every_datagram_in_one_go() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let datagrams: [&[u8]; 3] = [b"one", b"second", b"3"];
        let buf: Vec<u8> = datagrams.concat();
        let lens: Vec<usize> = datagrams.iter().map(|d| d.len()).collect();
        assert_eq!(send_batch(&tx, rx.local_addr().unwrap(), &buf, &lens), 3);
        let mut got = [0u8; 16];
        for want in datagrams {
            let n = rx.recv(&mut got).unwrap();
            assert_eq!(&got[..n], want);
        }
        // Lengths past the buffer end the batch there instead of reading beyond it.
        assert_eq!(send_batch(&tx, rx.local_addr().unwrap(), b"ab", &[1, 5]), 1);
    }

    #[test]
    fn send_gso_arrives_as_separate_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Three of 4 bytes and a short last one.
        send_gso(&tx, rx.local_addr().unwrap(), b"aaaabbbbccccd", 4).unwrap();
        let mut got = [0u8; 16];
        for want in [&b"aaaa"[..], b"bbbb", b"cccc", b"d"] {
            let n = rx.recv(&mut got).unwrap();
            assert_eq!(&got[..n], want);
        }
    }
}
