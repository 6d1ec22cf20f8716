//! The little of the wire the simulated guest needs beyond etherparse and smoltcp: the
//! virtio-net header's layout (virtio 1.2, 5.1.6) and completing an IPv4 packet's L4
//! checksum, as a NIC does for a driver that lets it (NEEDS_CSUM, DATA_VALID).

use etherparse::checksum::Sum16BitWords;

/// Length of the virtio-net header with VIRTIO_F_VERSION_1 (or MRG_RXBUF).
pub const VIRTIO_NET_HDR_LEN: usize = 12;

const F_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
/// Offset of the checksum field in a TCP header.
const TCP_CSUM_OFFSET: u16 = 16;
/// Offset of the checksum field in a UDP header.
const UDP_CSUM_OFFSET: u16 = 6;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The header of a TCPv4 segment of up to 64 KiB handed to the device (HOST_TSO4) with a
/// partial checksum: headers end at `hdr_len`, the TCP header starts at `csum_start`, the
/// device cuts `mss`-byte segments.
pub fn tso_hdr(hdr_len: u16, mss: u16, csum_start: u16) -> [u8; VIRTIO_NET_HDR_LEN] {
    let mut b = [0u8; VIRTIO_NET_HDR_LEN];
    b[0] = F_NEEDS_CSUM;
    b[1] = GSO_TCPV4;
    b[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    b[4..6].copy_from_slice(&mss.to_le_bytes());
    b[6..8].copy_from_slice(&csum_start.to_le_bytes());
    b[8..10].copy_from_slice(&TCP_CSUM_OFFSET.to_le_bytes());
    // num_buffers: one descriptor chain.
    b[10..12].copy_from_slice(&1u16.to_le_bytes());
    b
}

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

/// Compute the full TCP/UDP checksum of an IPv4 packet and store it, whatever the field
/// held. `None` (and nothing written) when the packet is not TCP or UDP or its lengths are
/// inconsistent.
pub fn fill_l4_checksum(ip: &mut [u8]) -> Option<()> {
    let vihl = *ip.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let start = usize::from(vihl & 0xf) * 4;
    let end = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    if start < 20 || end > ip.len() {
        return None;
    }
    let protocol = *ip.get(9)?;
    let (field, min_len) = match protocol {
        TCP => (TCP_CSUM_OFFSET, 20),
        UDP => (UDP_CSUM_OFFSET, 8),
        _ => return None,
    };
    if end < start + min_len {
        return None;
    }
    let at = start + usize::from(field);
    ip[at..at + 2].copy_from_slice(&[0, 0]);
    let sum = Sum16BitWords::new()
        .add_slice(&ip[12..20])
        .add_2bytes([0, protocol])
        .add_2bytes(((end - start) as u16).to_be_bytes())
        .add_slice(&ip[start..end]);
    let csum = if protocol == UDP {
        sum.to_ones_complement_with_no_zero()
    } else {
        sum.ones_complement()
    };
    // Native order, as etherparse summed.
    ip[at..at + 2].copy_from_slice(&csum.to_ne_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    #[test]
    fn filled_checksums_match_etherparse() {
        let tcp = PacketBuilder::ipv4([10, 0, 0, 2], [203, 0, 113, 7], 64)
            .tcp(40000, 443, 7, 64240)
            .ack(9);
        let mut p = Vec::new();
        tcp.write(&mut p, b"hello, odd length").unwrap();
        let udp = PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64).udp(5353, 53);
        let mut q = Vec::new();
        udp.write(&mut q, b"query").unwrap();
        for good in [p, q] {
            let mut bad = good.clone();
            let at = 20 + if good[9] == TCP { 16 } else { 6 };
            bad[at] ^= 0x5a;
            fill_l4_checksum(&mut bad).unwrap();
            assert_eq!(bad, good);
        }
        assert!(fill_l4_checksum(&mut [0x45, 0, 0, 8, 0, 0, 0, 0]).is_none());
        assert_eq!(internet_checksum(&[0xff, 0xff]), 0);
    }
}
