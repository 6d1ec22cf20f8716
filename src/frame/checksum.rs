//! Internet checksums (RFC 1071): of headers and ICMP messages, of UDP datagrams, and of
//! the TCP/UDP payload of an IPv4 packet for the checksum offloads (VIRTIO_NET_F_CSUM,
//! VIRTIO_NET_F_GUEST_CSUM): moat completes what a guest left partial, from the packet alone,
//! and leaves partial sums for a guest that completes them. etherparse sums the words; only
//! where the fields are is written here.

use std::net::Ipv4Addr;

use etherparse::checksum::Sum16BitWords;
use smoltcp::wire::{IpProtocol, Ipv4Packet};

use crate::telemetry::DropReason;

/// The Internet checksum over `data`, as a number to write big-endian into a header.
pub fn internet_checksum(data: &[u8]) -> u16 {
    // etherparse sums native-endian words: its result is in native byte order.
    u16::from_be_bytes(
        Sum16BitWords::new()
            .add_slice(data)
            .ones_complement()
            .to_ne_bytes(),
    )
}

/// The state of a parsed packet's TCP, UDP or ICMP checksum, as the transport's `checksum()`
/// finds it: only code that would use the packet asks (frames the firewall drops are never
/// summed), and no caller sums by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Checksum {
    /// Summed over the packet and found right.
    Verified,
    /// The guest left it partial (NEEDS_CSUM) and moat computed it from the packet, in its
    /// own copy: right by construction, so not summed a second time.
    Completed,
    /// A UDP datagram without a checksum (0, which IPv4 allows).
    None,
    /// Wrong: the packet was damaged or forged. Dropped by whoever would use it.
    Bad,
}

/// What a TCP or UDP checksum covers besides the segment: the pseudo-header's addresses, and
/// whether moat has just completed the sum itself (a guest's NEEDS_CSUM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pseudo {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub completed: bool,
}

impl L4Checksum {
    /// Whether the packet may be used (its checksum is right, or there is none).
    pub fn ok(self) -> bool {
        self != L4Checksum::Bad
    }

    fn verified_if(right: bool) -> L4Checksum {
        if right {
            L4Checksum::Verified
        } else {
            L4Checksum::Bad
        }
    }
}

/// The checksum state of a UDP datagram (header included, as long as its length field says).
pub fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, datagram: &[u8]) -> L4Checksum {
    let Some(field) = datagram.get(6..8) else {
        return L4Checksum::Bad;
    };
    if field == [0, 0] {
        return L4Checksum::None;
    }
    let Ok(len) = u16::try_from(datagram.len()) else {
        return L4Checksum::Bad;
    };
    L4Checksum::verified_if(
        pseudo_header(src.octets(), dst.octets(), UDP, len)
            .add_slice(datagram)
            .ones_complement()
            == 0,
    )
}

/// The checksum state of a TCP segment (header included).
pub fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> L4Checksum {
    let Ok(len) = u16::try_from(segment.len()) else {
        return L4Checksum::Bad;
    };
    L4Checksum::verified_if(
        pseudo_header(src.octets(), dst.octets(), TCP, len)
            .add_slice(segment)
            .ones_complement()
            == 0,
    )
}

/// The checksum state of an ICMP message (header included; no pseudo-header in IPv4).
pub fn icmp_checksum(message: &[u8]) -> L4Checksum {
    L4Checksum::verified_if(internet_checksum(message) == 0)
}

/// Whether a UDP datagram's checksum is right (a zero checksum means "none" in IPv4).
pub fn udp_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, datagram: &[u8]) -> bool {
    udp_checksum(src, dst, datagram).ok()
}

/// The sum of the IPv4 pseudo-header: addresses, protocol, L4 length.
fn pseudo_header(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> Sum16BitWords {
    Sum16BitWords::new()
        .add_slice(&src)
        .add_slice(&dst)
        .add_2bytes([0, protocol])
        .add_2bytes(l4_len.to_be_bytes())
}

/// Offset of the checksum field in a TCP header.
pub const TCP_CSUM_OFFSET: u16 = 16;
/// Offset of the checksum field in a UDP header.
pub const UDP_CSUM_OFFSET: u16 = 6;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Where the transport header and its checksum field are in an IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Layout {
    /// Start of the TCP/UDP header (the IPv4 header length).
    pub start: usize,
    /// Offset of the checksum field from `start`.
    pub field: u16,
    /// End of the IPv4 packet (its total length; padding after it is ignored).
    pub end: usize,
    pub protocol: u8,
}

impl L4Layout {
    /// The layout of a TCP or UDP packet whose lengths are consistent with `ip`; `None`
    /// otherwise (never trusting a length the guest wrote without checking it).
    pub fn of(ip: &[u8]) -> Option<L4Layout> {
        // smoltcp's checked view: the header and total lengths fit the buffer and each other.
        let packet = Ipv4Packet::new_checked(ip).ok()?;
        if packet.version() != 4 {
            return None;
        }
        let (field, min_len) = match packet.next_header() {
            IpProtocol::Tcp => (TCP_CSUM_OFFSET, 20),
            IpProtocol::Udp => (UDP_CSUM_OFFSET, 8),
            _ => return None,
        };
        if packet.payload().len() < min_len {
            return None;
        }
        Some(L4Layout {
            start: usize::from(packet.header_len()),
            field,
            end: usize::from(packet.total_len()),
            protocol: packet.next_header().into(),
        })
    }

    fn at(&self) -> usize {
        self.start + usize::from(self.field)
    }

    /// The pseudo-header sum of `ip`, the packet this layout was read from.
    fn pseudo(&self, ip: &[u8]) -> Sum16BitWords {
        let packet = Ipv4Packet::new_unchecked(ip);
        pseudo_header(
            packet.src_addr().octets(),
            packet.dst_addr().octets(),
            self.protocol,
            (self.end - self.start) as u16,
        )
    }
}

/// Compute the packet's full TCP/UDP checksum and store it, ignoring whatever the field held
/// (for a guest's NEEDS_CSUM packet, a partial sum moat does not trust).
pub fn fill(ip: &mut [u8]) -> Result<(), DropReason> {
    let l4 = L4Layout::of(ip).ok_or(DropReason::BadVirtioHeader)?;
    let at = l4.at();
    ip[at..at + 2].copy_from_slice(&[0, 0]);
    let sum = l4.pseudo(ip).add_slice(&ip[l4.start..l4.end]);
    let csum = if l4.protocol == UDP {
        sum.to_ones_complement_with_no_zero()
    } else {
        sum.ones_complement()
    };
    // etherparse sums native-endian words: its result goes back in native order.
    ip[at..at + 2].copy_from_slice(&csum.to_ne_bytes());
    Ok(())
}

/// Whether the packet's TCP/UDP checksum is right (a UDP checksum of 0 means "none").
pub fn verify(ip: &[u8]) -> bool {
    let Some(l4) = L4Layout::of(ip) else {
        return false;
    };
    let at = l4.at();
    if l4.protocol == UDP && ip[at..at + 2] == [0, 0] {
        return true;
    }
    l4.pseudo(ip)
        .add_slice(&ip[l4.start..l4.end])
        .ones_complement()
        == 0
}

/// Replace the checksum with the pseudo-header sum, as a driver that completes checksums
/// expects (NEEDS_CSUM): it sums from the L4 header on and stores the complement. Returns
/// the layout, for the header's csum_start and csum_offset.
pub fn leave_partial(ip: &mut [u8]) -> Option<L4Layout> {
    let l4 = L4Layout::of(ip)?;
    let at = l4.at();
    let partial = !l4.pseudo(ip).ones_complement();
    ip[at..at + 2].copy_from_slice(&partial.to_ne_bytes());
    Some(l4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 0, 0, 2], [203, 0, 113, 7], 64)
            .tcp(40000, 443, 7, 64240)
            .ack(9)
            .psh();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64).udp(5353, 53);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn fill_matches_etherparse_and_ignores_the_old_field() {
        for p in [tcp_packet(b"hello, odd length"), udp_packet(b"query")] {
            assert!(verify(&p));
            let mut q = p.clone();
            let at = L4Layout::of(&q).unwrap().at();
            q[at] ^= 0x5a;
            assert!(!verify(&q));
            fill(&mut q).unwrap();
            assert!(q == p, "filled checksum differs from etherparse's");
        }
    }

    #[test]
    fn a_partial_sum_completes_to_the_full_checksum() {
        let full = tcp_packet(&[0xab; 3001]);
        let mut p = full.clone();
        let l4 = leave_partial(&mut p).unwrap();
        // What a driver does with NEEDS_CSUM: sum from csum_start, store the complement.
        let csum = Sum16BitWords::new()
            .add_slice(&p[l4.start..l4.end])
            .ones_complement();
        p[l4.at()..l4.at() + 2].copy_from_slice(&csum.to_ne_bytes());
        assert!(p == full, "completed partial sum differs");
    }

    #[test]
    fn inconsistent_lengths_are_refused() {
        let mut p = tcp_packet(b"x");
        p[2..4].copy_from_slice(&9999u16.to_be_bytes());
        assert_eq!(fill(&mut p), Err(DropReason::BadVirtioHeader));
        let mut short = tcp_packet(b"");
        short[2..4].copy_from_slice(&30u16.to_be_bytes());
        assert!(L4Layout::of(&short).is_none(), "shorter than a TCP header");
        assert!(L4Layout::of(&[0x45]).is_none());
        // Found by cargo-fuzz: a total length within a buffer shorter than an IPv4 header.
        assert!(L4Layout::of(&[0x45, 0, 0, 8, 0, 0, 0, 0]).is_none());
        assert!(fill(&mut [0x45, 0, 0, 8, 0, 0, 0, 0]).is_err());
        assert!(L4Layout::of(&[]).is_none());
        let mut icmp = tcp_packet(b"x");
        icmp[9] = 1;
        assert!(L4Layout::of(&icmp).is_none());
    }
}
