#![no_main]
//! The guest's side of the data path, with egress: a Datapath with a registrar and an
//! in-process proxy stand-in (see harness.rs), every offload acked, `pump` run after each step.
//!
//! Input: a script of steps, each an op byte and its arguments:
//!   0 raw TX buffer (u16 length + bytes: virtio-net header + frame, as a guest writes it)
//!   1 SYN to one of eight destinations (allowed literal, allowed port 80, a name to
//!     sniff, SOCKS5 rule, the explicit-proxy port, DNS over TCP, reserved, synthetic
//!     address from a DNS answer)
//!   2 data on a connection (length byte + bytes; bit 7 of the length: repeat it to a
//!     64 KiB-class segment)
//!   3 FIN, 4 RST on a connection
//!   5 data with one byte flipped (position, xor)
//!   6 the proxy accepts (200 / SOCKS5 success), 7 proxy raw bytes, 8 proxy data,
//!   9 proxy FIN, 10 proxy RST
//!   11 toggle partial checksums / TSO for the guest's segments
//!   12 UDP datagram (to the SOCKS5 rule, or to the gateway's DNS)
//!
//! Oracles: the datapath proptest's (each frame answered, dropped and counted once, or
//! carried; answers are frames from the gateway), every frame `pump` gives the guest is
//! well-formed (MACs, addresses, checksums, TSO header), every proxy connection opens with a
//! CONNECT for a destination a rule allows (never a reserved address no CIDR names), and the
//! splice moves bytes in order: the proxy gets a prefix of what the guest sent, the guest a
//! prefix of what the proxy sent.
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use moat::dns::decode;
mod common;
mod harness;
use harness::{Harness, GW};

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

/// The synthetic address moat's DNS gives `www.example.com`.
fn resolve(h: &mut Harness) -> Option<Ipv4Addr> {
    let mut q = vec![0x77, 0x77, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in ["www", "example", "com"] {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let answer = h.udp((GW, 53), &q)?;
    let f = moat::frame::parse(&answer).ok()?;
    let moat::frame::Network::Ipv4(ip) = f.net else {
        return None;
    };
    let moat::frame::Transport::Udp(udp) = ip.transport else {
        return None;
    };
    let m = decode(udp.payload)?;
    m.answers.iter().find_map(|a| match &a.data {
        hickory_proto::rr::RData::A(a) => Some(a.0),
        _ => None,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness::new(harness::egress_policy());
    let mut input = Input(data);
    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 64 {
            break;
        }
        let conn = |h: &Harness, b: Option<u8>| {
            (!h.conns.is_empty()).then(|| usize::from(b.unwrap_or(0)) % h.conns.len())
        };
        match op % 13 {
            0 => {
                let len = usize::from(u16::from_le_bytes([
                    input.byte().unwrap_or(0),
                    input.byte().unwrap_or(0),
                ]));
                let buf = input.bytes(len);
                h.raw(buf);
            }
            1 => {
                if h.conns.len() >= 6 {
                    continue;
                }
                let (dst, port) = match input.byte().unwrap_or(0) % 8 {
                    0 => (Ipv4Addr::new(203, 0, 113, 5), 443),
                    1 => (Ipv4Addr::new(203, 0, 113, 5), 80),
                    2 => (Ipv4Addr::new(192, 0, 2, 7), 443), // a name only: sniffed
                    3 => (Ipv4Addr::new(203, 0, 113, 9), 8443),
                    4 => (GW, 3128),
                    5 => (GW, 53),
                    6 => (Ipv4Addr::new(127, 0, 0, 1), 22),
                    _ => match resolve(&mut h) {
                        Some(ip) => (ip, 443),
                        None => continue,
                    },
                };
                h.connect(dst, port);
            }
            2 | 5 => {
                let Some(c) = conn(&h, input.byte()) else {
                    continue;
                };
                let len = input.byte().unwrap_or(0);
                let mut payload = input.bytes(usize::from(len & 0x7f)).to_vec();
                if len & 0x80 != 0 && !payload.is_empty() {
                    // A segment the size a TSO guest sends (dropped unless partial checksums
                    // and TSO are on).
                    payload = payload.repeat(60_000 / payload.len() + 1);
                    payload.truncate(60_000);
                }
                let mutate = if op % 13 == 5 {
                    let at = usize::from(input.byte().unwrap_or(0));
                    Some((at, input.byte().unwrap_or(1) | 1))
                } else {
                    None
                };
                h.data(c, &payload, mutate);
            }
            3 => {
                if let Some(c) = conn(&h, input.byte()) {
                    h.fin(c);
                }
            }
            4 => {
                if let Some(c) = conn(&h, input.byte()) {
                    h.rst(c);
                }
            }
            6..=10 => {
                let j = usize::from(input.byte().unwrap_or(0));
                let j = if h.proxy.is_empty() {
                    continue;
                } else {
                    j % h.proxy.len()
                };
                match op % 13 {
                    6 => h.proxy_accept(j),
                    7 => {
                        let len = usize::from(input.byte().unwrap_or(0));
                        let b = input.bytes(len).to_vec();
                        h.proxy_raw(j, &b);
                    }
                    8 => {
                        let len = input.byte().unwrap_or(0);
                        let mut b = input.bytes(usize::from(len & 0x7f)).to_vec();
                        if len & 0x80 != 0 && !b.is_empty() {
                            b = b.repeat(100_000 / b.len() + 1);
                            b.truncate(100_000);
                        }
                        h.proxy_data(j, &b);
                    }
                    9 => h.proxy_close(j, false),
                    _ => h.proxy_close(j, true),
                }
            }
            11 => h.offload = !h.offload,
            _ => {
                let len = usize::from(input.byte().unwrap_or(0));
                let to_dns = len & 1 == 0;
                let payload = input.bytes(len).to_vec();
                let dst = if to_dns {
                    (GW, 53)
                } else {
                    (Ipv4Addr::new(198, 51, 100, 3), 5001)
                };
                h.udp(dst, &payload);
            }
        }
    }
    h.settle();
    h.check_streams();
    harness::trace(&h);
});
