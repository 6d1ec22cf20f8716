// The egress harness of the `frame` and `dns_tcp` targets: a Datapath with a registrar
// (so allowed flows open proxy connections), an in-process proxy stand-in on loopback, and a
// minimal guest TCP that follows moat's sequence numbers (so handshakes complete and bytes
// are spliced), each step followed by `pump` until nothing moves.
//
// Determinism: no threads, no sleeps. The stand-in is a non-blocking loopback listener
// served from the fuzzing thread between steps: a loopback connect() has completed its
// handshake in the kernel by the time it returns, and loopback writes are readable by the
// peer when write() returns, so each step sees the same sockets in the same states. The
// listener lives for the whole process; every input gets a fresh Datapath, and its proxy
// connections are reset (SO_LINGER 0: no TIME_WAIT piles up) when the input ends.
#![allow(dead_code)]
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use moat::datapath::Datapath;
use moat::egress::steering::Steering;
use moat::egress::Registrar;
use moat::frame::virtio_hdr::{Offloads, OutHdr, VIRTIO_NET_HDR_LEN};
use moat::frame::{self, Network};
use moat::dns::NamePool;
use moat::frame::{MacAddr, GATEWAY_MAC};
use moat::policy::{Policy, Protocol};
use moat::telemetry::{Counters, Service};
use vmm_sys_util::epoll::EventSet;

// The test VM's addresses, from the test kit (its MAC as moat's type).
pub use moat_sim::fixtures::{GUEST, GW};
pub const GUEST_MAC: MacAddr = MacAddr(moat_sim::fixtures::GUEST_MAC);
const MTU: usize = 1500;
/// Pump rounds per step at most (a step that keeps moving is cut off, not looped on).
const ROUNDS: usize = 8;
const FIRST_TOKEN: u64 = 16;

/// Records which proxy sockets moat watches (the event loop's part, done by hand here).
#[derive(Clone, Default)]
struct Reg(Arc<Mutex<HashMap<u64, RawFd>>>);

impl Registrar for Reg {
    fn register(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token, fd);
        Ok(())
    }
    fn unregister(&self, _fd: RawFd, token: u64) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
        Ok(())
    }
}

/// One connection accepted by the proxy stand-in.
pub struct ProxyConn {
    stream: Option<TcpStream>,
    /// Everything moat sent on it.
    pub got: Vec<u8>,
    /// The negotiation moat opened with, once its first bytes arrived.
    pub head_len: Option<usize>,
    /// The stand-in sent its reply (and only scripted bytes after it).
    pub replied: bool,
    /// Bytes sent after the reply (what the guest must receive), unless raw bytes were.
    pub down: Vec<u8>,
    pub scripted: bool,
    socks_stage: u8,
    /// moat closed its side.
    pub eof: bool,
}

/// A guest TCP connection, with just enough TCP to follow moat's side.
pub struct Conn {
    pub port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
    snd_nxt: u32,
    /// moat's next sequence number, once its SYN-ACK was seen.
    rcv_nxt: Option<u32>,
    /// Bytes the guest sent, in order (what moat may have taken).
    pub sent: Vec<u8>,
    /// What moat acknowledged of `sent`.
    pub acked: usize,
    /// Bytes received in order.
    pub received: Vec<u8>,
    pub reset: bool,
    /// A mutated segment went out: its streams are no longer known.
    pub tainted: bool,
    iss: u32,
}

pub struct Harness {
    pub dp: Datapath,
    pub counters: Arc<Counters>,
    pub policy: Arc<Policy>,
    reg: Reg,
    pub conns: Vec<Conn>,
    pub proxy: Vec<ProxyConn>,
    listeners: &'static [TcpListener; 2],
    /// Send segments with partial checksums (NEEDS_CSUM), large ones as TSO.
    pub offload: bool,
    /// Frames moat sent the guest as TSO segments (for the trace).
    pub tso_frames: usize,
}

fn listeners() -> &'static [TcpListener; 2] {
    static L: std::sync::OnceLock<[TcpListener; 2]> = std::sync::OnceLock::new();
    L.get_or_init(|| {
        let l = || {
            let l = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
            l.set_nonblocking(true).expect("non-blocking");
            l
        };
        [l(), l()]
    })
}

/// The egress policy with the stand-in's ports as the HTTP and SOCKS5 proxies.
pub fn egress_policy() -> Policy {
    let [http, socks] = listeners();
    let text = include_str!("../policies/egress.toml")
        .replace("HTTP_PROXY", &http.local_addr().expect("bound").to_string())
        .replace(
            "SOCKS_PROXY",
            &socks.local_addr().expect("bound").to_string(),
        );
    Policy::parse(&text, Path::new("egress.toml")).expect("egress policy parses")
}

impl Harness {
    pub fn new(policy: Policy) -> Harness {
        let policy = Arc::new(policy);
        let counters = Arc::new(Counters::default());
        let mut dp = Datapath::new(
            Arc::clone(&policy),
            Arc::new(Mutex::new(NamePool::new(64))),
            Arc::clone(&counters),
        );
        dp.set_offloads(Offloads {
            csum: true,
            host_tso4: true,
            guest_csum: true,
            guest_tso4: true,
        });
        let reg = Reg::default();
        dp.place(FIRST_TOKEN, Steering::default(), 0);
        dp.attach(Box::new(reg.clone()));
        let listeners = listeners();
        // Connections left from an input that ended before they were accepted.
        for l in listeners {
            while l.accept().is_ok() {}
        }
        Harness {
            dp,
            counters,
            policy,
            reg,
            conns: Vec::new(),
            proxy: Vec::new(),
            listeners,
            offload: false,
            tso_frames: 0,
        }
    }

    // ---- the guest ----

    /// A TX buffer: virtio-net header + frame, the header asking for what `self.offload` says.
    fn tx(&self, mut frame: Vec<u8>, tcp: bool) -> Vec<u8> {
        let mut hdr = [0u8; VIRTIO_NET_HDR_LEN];
        if self.offload && tcp && frame.len() > 34 {
            let ihl = usize::from(frame[14] & 0xf) * 4;
            let start = 14 + ihl;
            hdr[0] = 1; // NEEDS_CSUM
            hdr[6..8].copy_from_slice(&(start as u16).to_le_bytes());
            hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
            if frame.len() > 14 + MTU {
                hdr[1] = 1; // GSO_TCPV4
                hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
            }
            // The pseudo-header sum, as a driver leaves it.
            let _ = moat::frame::checksum::leave_partial(&mut frame[14..]);
        }
        let mut buf = hdr.to_vec();
        buf.extend_from_slice(&frame);
        buf
    }

    fn segment(&self, c: usize, syn: bool, fin: bool, rst: bool, payload: &[u8]) -> Vec<u8> {
        let conn = &self.conns[c];
        let mut b = PacketBuilder::ethernet2(GUEST_MAC.0, GATEWAY_MAC.0)
            .ipv4(GUEST.octets(), conn.dst.octets(), 64)
            .tcp(
                conn.port,
                conn.dst_port,
                if syn { conn.iss } else { conn.snd_nxt },
                65535,
            );
        if syn {
            // An MSS option, as every guest sends (moat raises it for a GUEST_TSO4 guest).
            b = b
                .syn()
                .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
                .expect("one option fits");
        }
        if let Some(ack) = conn.rcv_nxt {
            b = b.ack(ack);
        }
        if fin {
            b = b.fin();
        }
        if rst {
            b = b.rst();
        }
        if !payload.is_empty() {
            b = b.psh();
        }
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("writing to a Vec");
        out
    }

    /// Open a guest connection to `dst:port` (its SYN goes out at once).
    pub fn connect(&mut self, dst: Ipv4Addr, dst_port: u16) -> usize {
        let n = self.conns.len();
        let iss = 0x1000_0000u32.wrapping_mul(n as u32 + 1);
        self.conns.push(Conn {
            port: 40000 + n as u16,
            dst,
            dst_port,
            snd_nxt: iss.wrapping_add(1),
            rcv_nxt: None,
            sent: Vec::new(),
            acked: 0,
            received: Vec::new(),
            reset: false,
            tainted: false,
            iss,
        });
        let syn = self.segment(n, true, false, false, &[]);
        self.send(syn, true);
        n
    }

    /// Send `payload` on connection `c` (nothing before its handshake completed).
    pub fn data(&mut self, c: usize, payload: &[u8], mutate: Option<(usize, u8)>) {
        if self.conns[c].rcv_nxt.is_none() || self.conns[c].reset || payload.is_empty() {
            return;
        }
        let mut seg = self.segment(c, false, false, false, payload);
        let conn = &mut self.conns[c];
        conn.snd_nxt = conn.snd_nxt.wrapping_add(payload.len() as u32);
        conn.sent.extend_from_slice(payload);
        if let Some((at, x)) = mutate {
            let i = at % seg.len();
            seg[i] ^= x;
            conn.tainted = true;
        }
        self.send(seg, true);
    }

    pub fn fin(&mut self, c: usize) {
        if self.conns[c].rcv_nxt.is_none() {
            return;
        }
        let seg = self.segment(c, false, true, false, &[]);
        self.conns[c].snd_nxt = self.conns[c].snd_nxt.wrapping_add(1);
        self.send(seg, true);
    }

    pub fn rst(&mut self, c: usize) {
        let seg = self.segment(c, false, false, true, &[]);
        self.conns[c].reset = true;
        self.send(seg, true);
    }

    /// A guest UDP datagram.
    pub fn udp(&mut self, dst: (Ipv4Addr, u16), payload: &[u8]) -> Option<Vec<u8>> {
        let f = moat_sim::craft::udp(GUEST_MAC, GATEWAY_MAC, (GUEST, 5353), dst, payload);
        self.send(f, false)
    }

    /// Any TX buffer, as the guest wrote it.
    pub fn raw(&mut self, buf: &[u8]) -> Option<Vec<u8>> {
        let mut buf = buf.to_vec();
        self.guest_frame(&mut buf)
    }

    fn send(&mut self, frame: Vec<u8>, tcp: bool) -> Option<Vec<u8>> {
        let mut buf = self.tx(frame, tcp);
        let answer = self.guest_frame(&mut buf);
        self.settle();
        answer
    }

    /// One TX buffer through the datapath, with the datapath proptest's oracle: it is
    /// answered, or dropped and counted once, or consumed silently — and only TCP/UDP (a
    /// flow, DHCP release, a forwarded DNS query) is consumed silently. An answer is a
    /// well-formed frame from the gateway.
    fn guest_frame(&mut self, buf: &mut [u8]) -> Option<Vec<u8>> {
        if buf.len() > self.dp.max_tx_len() {
            return None;
        }
        let original = buf.to_vec();
        let drops = self.counters.total_drops();
        let answers: u64 = Service::ALL.iter().map(|s| self.counters.answers(*s)).sum();
        let answer = self.dp.guest_frame(buf);
        let dropped = self.counters.total_drops() - drops;
        let answered: u64 = Service::ALL
            .iter()
            .map(|s| self.counters.answers(*s))
            .sum::<u64>()
            - answers;
        assert!(dropped <= 1, "one frame, {dropped} drops");
        if let Some(a) = &answer {
            assert_eq!(dropped, 0, "answered and dropped");
            let parsed = frame::parse(a).unwrap_or_else(|e| panic!("answer does not parse: {e:?}"));
            assert_eq!(parsed.eth.src, GATEWAY_MAC);
        } else if dropped == 0 && answered == 0 {
            let l4 = SlicedPacket::from_ethernet(&original[VIRTIO_NET_HDR_LEN..])
                .ok()
                .and_then(|p| p.transport);
            assert!(
                matches!(l4, Some(TransportSlice::Tcp(_) | TransportSlice::Udp(_))),
                "a frame neither answered, dropped nor carried: {original:02x?}"
            );
        }
        answer
    }

    // ---- the proxy stand-in ----

    fn serve_proxy(&mut self) -> bool {
        let mut moved = false;
        for l in self.listeners {
            while let Ok((s, _)) = l.accept() {
                let _ = s.set_nonblocking(true);
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                self.proxy.push(ProxyConn {
                    stream: Some(s),
                    got: Vec::new(),
                    head_len: None,
                    replied: false,
                    down: Vec::new(),
                    scripted: true,
                    socks_stage: 0,
                    eof: false,
                });
                moved = true;
            }
        }
        let mut buf = [0u8; 65536];
        for p in &mut self.proxy {
            let Some(s) = p.stream.as_mut() else { continue };
            loop {
                if p.eof {
                    break;
                }
                match s.read(&mut buf) {
                    Ok(0) => {
                        // moat half-closed: keep the socket (a proxy answers, then closes).
                        p.eof = true;
                        break;
                    }
                    Ok(n) => {
                        p.got.extend_from_slice(&buf[..n]);
                        moved = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        p.stream = None;
                        break;
                    }
                }
            }
            if p.head_len.is_none() {
                p.head_len = request_len(&p.got);
                if let Some(n) = p.head_len {
                    check_proxy_request(&self.policy, &p.got[..n]);
                }
            }
        }
        moved
    }

    fn proxy_write(&mut self, j: usize, bytes: &[u8]) {
        let Some(p) = self.proxy.get_mut(j) else {
            return;
        };
        if let Some(s) = p.stream.as_mut() {
            let _ = s.write_all(bytes);
        }
        self.settle();
    }

    /// Answer connection `j` as a proxy that accepts: `200` to CONNECT, SOCKS5 success.
    pub fn proxy_accept(&mut self, j: usize) {
        let Some(p) = self.proxy.get_mut(j) else {
            return;
        };
        let reply: &[u8] = if p.got.starts_with(b"CONNECT ") && !p.replied {
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        } else if p.got.first() == Some(&5) && p.socks_stage == 0 {
            p.socks_stage = 1;
            &[5, 0]
        } else if p.got.first() == Some(&5) && p.socks_stage == 1 {
            p.socks_stage = 2;
            &[5, 0, 0, 1, 127, 0, 0, 1, 0, 9]
        } else {
            return;
        };
        p.replied = p.socks_stage != 1;
        self.proxy_write(j, reply);
    }

    /// Bytes for the guest, after the reply.
    pub fn proxy_data(&mut self, j: usize, bytes: &[u8]) {
        let Some(p) = self.proxy.get_mut(j) else {
            return;
        };
        if !p.replied {
            return;
        }
        p.down.extend_from_slice(bytes);
        self.proxy_write(j, bytes);
    }

    /// Anything, as a misbehaving proxy would say it.
    pub fn proxy_raw(&mut self, j: usize, bytes: &[u8]) {
        let Some(p) = self.proxy.get_mut(j) else {
            return;
        };
        p.scripted = false;
        self.proxy_write(j, bytes);
    }

    pub fn proxy_close(&mut self, j: usize, reset: bool) {
        let Some(p) = self.proxy.get_mut(j) else {
            return;
        };
        if reset {
            p.stream = None; // SO_LINGER 0: an RST
        } else if let Some(s) = &p.stream {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        self.settle();
    }

    // ---- moving things ----

    /// Pump until nothing moves (bounded): proxy sockets are reported ready, frames for the
    /// guest are checked and followed (the guest ACKs what it got).
    pub fn settle(&mut self) {
        for _ in 0..ROUNDS {
            let mut moved = self.serve_proxy();
            let tokens: Vec<u64> = self
                .reg
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .copied()
                .collect();
            for t in tokens {
                self.dp.host_event(t, EventSet::IN | EventSet::OUT);
            }
            let registered = self.reg.0.lock().unwrap_or_else(|e| e.into_inner()).len();
            let mut out = Vec::new();
            self.dp.pump(|frame, hdr| out.push((frame, hdr)));
            // A new proxy connection is accepted (and answered) in the next round.
            moved |= registered != self.reg.0.lock().unwrap_or_else(|e| e.into_inner()).len();
            let mut acks = Vec::new();
            for (frame, hdr) in out {
                moved = true;
                if let Some(c) = self.observe(&frame, hdr) {
                    if !acks.contains(&c) {
                        acks.push(c);
                    }
                }
            }
            for c in acks {
                let ack = self.segment(c, false, false, false, &[]);
                let mut buf = self.tx(ack, true);
                self.guest_frame(&mut buf);
            }
            if !moved {
                break;
            }
        }
    }

    /// Check a frame moat sent the guest, and follow it. Returns the connection that should
    /// acknowledge it.
    fn observe(&mut self, frame: &[u8], hdr: OutHdr) -> Option<usize> {
        check_rx_frame(frame, hdr);
        self.tso_frames += usize::from(matches!(hdr, OutHdr::Tso { .. }));
        let p = SlicedPacket::from_ethernet(&frame[VIRTIO_NET_HDR_LEN..]).expect("checked");
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            return None;
        };
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
            return None;
        };
        let src = ip.header().source_addr();
        let c = self.conns.iter().position(|c| {
            c.port == tcp.destination_port() && c.dst == src && c.dst_port == tcp.source_port()
        })?;
        let conn = &mut self.conns[c];
        if tcp.rst() {
            conn.reset = true;
            return None;
        }
        if tcp.ack() {
            let acked = tcp
                .acknowledgment_number()
                .wrapping_sub(conn.iss.wrapping_add(1)) as usize;
            if acked <= conn.sent.len() + 1 {
                conn.acked = conn.acked.max(acked.min(conn.sent.len()));
            }
        }
        let seq = tcp.sequence_number();
        if tcp.syn() {
            if conn.rcv_nxt.is_none() {
                conn.rcv_nxt = Some(seq.wrapping_add(1));
                return Some(c);
            }
            return None;
        }
        let next = conn.rcv_nxt?;
        let payload = tcp.payload();
        if seq == next && !payload.is_empty() {
            conn.received.extend_from_slice(payload);
            conn.rcv_nxt = Some(next.wrapping_add(payload.len() as u32));
        }
        if tcp.fin() && seq.wrapping_add(payload.len() as u32) == conn.rcv_nxt.unwrap_or(next) {
            conn.rcv_nxt = conn.rcv_nxt.map(|n| n.wrapping_add(1));
        }
        (!payload.is_empty() || tcp.fin()).then_some(c)
    }

    /// End-of-input oracle of the splice: what reached the proxy after the request head is a
    /// prefix of what some guest connection sent, and what a guest received in order is a
    /// prefix of what some scripted proxy connection sent after its reply.
    pub fn check_streams(&self) {
        for p in &self.proxy {
            let Some(head) = p.head_len else { continue };
            let up = &p.got[head..];
            if up.is_empty() || p.got.first() == Some(&5) {
                continue;
            }
            let ok = self
                .conns
                .iter()
                .any(|c| c.tainted || c.dst == GW || c.sent.starts_with(up));
            assert!(
                ok,
                "the proxy got {up:02x?}, which no guest connection sent"
            );
        }
        for c in &self.conns {
            if c.received.is_empty() || c.tainted || c.dst == GW {
                continue;
            }
            let ok = self.proxy.iter().any(|p| {
                !p.scripted || p.got.first() == Some(&5) || p.down.starts_with(&c.received)
            });
            assert!(
                ok,
                "guest {} received {:02x?}, which no proxy sent",
                c.port, c.received
            );
        }
    }
}

/// The length of the proxy request moat opened a connection with: a CONNECT head, or a
/// SOCKS5 greeting.
fn request_len(got: &[u8]) -> Option<usize> {
    if got.first() == Some(&5) {
        return (got.len() >= 3).then_some(3);
    }
    got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Invariants 3 and 7 at the proxy: moat opens with a well-formed CONNECT for a destination
/// the policy allows (never a reserved address no CIDR names), or a SOCKS5 greeting.
fn check_proxy_request(policy: &Policy, head: &[u8]) {
    if head == [5, 1, 0] {
        return;
    }
    let text = std::str::from_utf8(head).expect("CONNECT head is text");
    let line = text.lines().next().unwrap_or_default();
    let target = line
        .strip_prefix("CONNECT ")
        .and_then(|l| l.strip_suffix(" HTTP/1.1"))
        .unwrap_or_else(|| panic!("moat opened a proxy connection with {text:?}"));
    assert!(
        text == format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        "{text:?}"
    );
    let (host, port) = target.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("a port");
    let rules: Vec<_> = policy
        .outbound
        .iter()
        .filter(|r| r.protocol == Protocol::Tcp && r.allows_port(port))
        .collect();
    assert!(
        !rules.is_empty(),
        "CONNECT to port {port}, which no rule allows"
    );
    match host.parse::<Ipv4Addr>() {
        Ok(ip) => {
            let reserved = moat::firewall::gate::reserved_range(ip);
            let named = rules.iter().flat_map(|r| r.to.iter().flatten()).any(|d| {
                matches!(d, moat::policy::Destination::Cidr(c) if c.contains(&ip) && reserved.is_none_or(|r| r.contains(c)))
            });
            assert!(named, "CONNECT {target}: no rule's CIDR names {ip}");
        }
        Err(_) => {
            assert!(
                rules.iter().any(|r| r.allows_name(host)),
                "CONNECT {target}: no rule allows the name"
            );
            assert!(moat::firewall::gate::normalize(host)
                .is_ok_and(|h| h == moat::firewall::gate::Host::Name(host.to_string())));
        }
    }
}

/// Every frame for the guest: from the gateway's MAC to the guest's, IPv4 to the guest from
/// someone else, with a correct IPv4 header checksum; within the MTU with complete L4
/// checksums, or a TCP segment over the MTU with a partial checksum and a TSO header that
/// says where its headers end.
pub fn check_rx_frame(frame: &[u8], hdr: OutHdr) {
    let f = &frame[VIRTIO_NET_HDR_LEN..];
    assert!(f.len() >= 34, "short frame for the guest");
    assert_eq!(&f[..6], &GUEST_MAC.0, "not to the guest's MAC");
    assert_eq!(&f[6..12], &GATEWAY_MAC.0, "not from the gateway's MAC");
    assert_eq!(&f[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    assert_eq!(
        moat::frame::internet_checksum(&ip[..ihl]),
        0,
        "bad IPv4 header checksum"
    );
    assert_eq!(&ip[16..20], &GUEST.octets(), "not to the guest");
    assert_ne!(&ip[12..16], &GUEST.octets(), "from the guest's own address");
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(total, ip.len(), "IPv4 length is not the packet's");
    match hdr {
        OutHdr::Plain | OutHdr::DataValid => {
            assert!(
                ip.len() <= MTU,
                "{} bytes over the MTU without TSO",
                ip.len()
            );
            assert!(
                moat::frame::checksum::verify(ip),
                "bad L4 checksum for the guest"
            );
        }
        OutHdr::Tso {
            hdr_len,
            mss,
            csum_start,
            csum_offset,
        } => {
            assert!(ip.len() > MTU, "TSO header on a packet within the MTU");
            assert_eq!(ip[9], 6, "TSO on a non-TCP packet");
            let tcp_len = usize::from(ip[ihl + 12] >> 4) * 4;
            assert_eq!(usize::from(csum_start), 14 + ihl);
            assert_eq!(csum_offset, 16);
            assert_eq!(usize::from(hdr_len), 14 + ihl + tcp_len);
            assert!(
                mss > 0 && usize::from(mss) + ihl + tcp_len <= MTU,
                "mss {mss}"
            );
            // Completed the way the guest's driver would, the checksum holds.
            let mut full = ip.to_vec();
            moat::frame::checksum::fill(&mut full).expect("a layout");
            assert!(moat::frame::checksum::verify(&full));
            let mut partial = full.clone();
            moat::frame::checksum::leave_partial(&mut partial);
            assert_eq!(
                partial, ip,
                "the partial checksum is not the pseudo-header sum"
            );
        }
    }
    let _ = Network::Arp; // (frame::Network kept in scope for the targets)
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Reset the stand-in's side first (no TIME_WAIT on either side), then moat's.
        self.proxy.clear();
    }
}

/// With MOAT_FUZZ_TRACE set (run one input: `cargo fuzz run -O frame FILE`), say how far the
/// input got: to check that a seed reaches the splice.
pub fn trace(h: &Harness) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("MOAT_FUZZ_TRACE").is_some()) {
        return;
    }
    for c in &h.conns {
        eprintln!(
            "guest {} -> {}:{}: sent {} acked {} received {} reset {} tainted {}",
            c.port,
            c.dst,
            c.dst_port,
            c.sent.len(),
            c.acked,
            c.received.len(),
            c.reset,
            c.tainted
        );
    }
    for (j, p) in h.proxy.iter().enumerate() {
        eprintln!(
            "proxy {j}: got {} (head {:?}: {:?}) replied {} down {} open {}",
            p.got.len(),
            p.head_len,
            String::from_utf8_lossy(&p.got[..p.head_len.unwrap_or(0).min(p.got.len())]),
            p.replied,
            p.down.len(),
            p.stream.is_some()
        );
    }
    eprintln!("tso frames to the guest: {}", h.tso_frames);
    eprintln!("{}", h.counters.table());
}
