//! The virtio-net offloads, both ways: what a guest's TX header asks of moat (a partial
//! checksum to complete, a 64 KiB TCP segment), and what moat's RX header tells the guest
//! (checksums known good, a 64 KiB segment with its checksum left partial).
//!
//! A guest's partial checksum is completed in moat's copy before anything looks at the
//! frame, so the firewall, the services and smoltcp all see an ordinary frame; the parsed
//! view says the sum was [`L4Checksum::Completed`] rather than summing it again.

use etherparse::EtherType;

use super::checksum::{self, L4Layout};
use super::tcp;
use super::virtio_hdr::{Offloads, OutHdr, TxOffload, MAX_GSO_FRAME, VIRTIO_NET_HDR_LEN};
use super::{Ethernet, Frame, MacAddr, VirtioNetHdr, ETH_HDR_LEN, GATEWAY_MAC, PACKET_HEADROOM};
use crate::telemetry::DropReason;

#[cfg(doc)]
use super::L4Checksum;

/// TCP's protocol number.
const TCP: u8 = 6;

impl Offloads {
    /// The largest TX buffer (header + frame) worth reading when the VM's frames are at most
    /// `max_frame_len`: anything longer is dropped as oversized without being copied.
    pub fn max_tx_len(self, max_frame_len: usize) -> usize {
        VIRTIO_NET_HDR_LEN
            + if self.host_tso4 {
                MAX_GSO_FRAME
            } else {
                max_frame_len
            }
    }
}

/// A guest TX buffer whose virtio-net header was read and checked against the acked
/// offloads: the frame behind it, not yet parsed.
#[derive(Debug)]
pub struct TxFrame<'a> {
    offload: TxOffload,
    bytes: &'a mut [u8],
}

impl<'a> TxFrame<'a> {
    /// Read the header of `buf` (header then frame). A frame longer than `max_frame_len`
    /// (or, for a TSO segment, than the largest IPv4 packet) is refused as oversized.
    pub fn read(
        buf: &'a mut [u8],
        offloads: Offloads,
        max_frame_len: usize,
    ) -> Result<TxFrame<'a>, DropReason> {
        let offload = VirtioNetHdr::parse(buf)?.check_tx(offloads)?;
        let bytes = &mut buf[VIRTIO_NET_HDR_LEN..];
        let max = match offload {
            TxOffload::Tso { .. } => MAX_GSO_FRAME,
            _ => max_frame_len,
        };
        if bytes.len() > max {
            return Err(DropReason::Oversized);
        }
        Ok(TxFrame { offload, bytes })
    }

    /// The frame (Ethernet onwards), as the guest wrote it.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// Complete a partial checksum the header asked for, then parse the frame.
    pub fn parse(self) -> Result<Frame<'a>, DropReason> {
        let completed = complete_checksum(self.bytes, self.offload)?;
        super::parse_completed(self.bytes, completed)
    }
}

/// A guest's partial checksum (NEEDS_CSUM), completed in place. The offsets the guest gave
/// must be where the frame's own IPv4 and TCP/UDP headers put the field; the checksum is
/// computed from the frame alone. Returns whether there was one to complete.
fn complete_checksum(frame: &mut [u8], offload: TxOffload) -> Result<bool, DropReason> {
    let (start, offset, tso) = match offload {
        TxOffload::None => return Ok(false),
        TxOffload::Csum { start, offset } => (start, offset, false),
        TxOffload::Tso { start, offset, .. } => (start, offset, true),
    };
    let eth = super::parse_ethernet(frame).map_err(|_| DropReason::BadVirtioHeader)?;
    if EtherType(eth.ethertype) != EtherType::IPV4 {
        return Err(DropReason::BadVirtioHeader);
    }
    let ip = &mut frame[ETH_HDR_LEN..];
    let l4 = L4Layout::of(ip).ok_or(DropReason::BadVirtioHeader)?;
    if usize::from(start) != ETH_HDR_LEN + l4.start
        || offset != l4.field
        || tso && l4.protocol != TCP
    {
        return Err(DropReason::BadVirtioHeader);
    }
    checksum::fill(ip)?;
    Ok(true)
}

/// Why an IP packet for the guest did not become a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxRefused {
    /// Not built behind [`PACKET_HEADROOM`] (never: every producer builds so).
    NoHeadroom,
    /// Over the MTU and not a TCP segment the guest can take whole: `len` bytes of packet.
    Oversized { len: usize },
}

/// Make an IP packet built behind [`PACKET_HEADROOM`] a frame for the guest: its Ethernet
/// header (gateway to `guest`) written in place, behind the room for its virtio-net header,
/// and what that header must say. A packet over `mtu` (only smoltcp's TCP makes those, and
/// only for a guest that takes 64 KiB segments) goes as a TSO segment with its checksum
/// left partial.
pub fn to_guest(
    buf: &mut [u8],
    guest: MacAddr,
    mtu: usize,
    offloads: Offloads,
) -> Result<OutHdr, RxRefused> {
    let Some((head, packet)) = buf.split_at_mut_checked(PACKET_HEADROOM) else {
        return Err(RxRefused::NoHeadroom);
    };
    let eth = Ethernet {
        dst: guest,
        src: GATEWAY_MAC,
        ethertype: EtherType::IPV4.0,
    };
    head[VIRTIO_NET_HDR_LEN..].copy_from_slice(&eth.to_bytes());
    let len = packet.len();
    if len > mtu {
        tso_header(packet, mtu).ok_or(RxRefused::Oversized { len })
    } else if offloads.guest_csum {
        // smoltcp computed every checksum: the guest need not verify them again.
        Ok(OutHdr::DataValid)
    } else {
        Ok(OutHdr::Plain)
    }
}

/// The RX header of a TCP segment over the MTU, its checksum left partial; `None` if the
/// packet is not TCP over IPv4 (smoltcp makes no other large packets).
fn tso_header(ip: &mut [u8], mtu: usize) -> Option<OutHdr> {
    let l4 = checksum::leave_partial(ip)?;
    if l4.protocol != TCP {
        return None;
    }
    let headers = l4.start + tcp::header_len(ip.get(l4.start..l4.end)?)?;
    Some(OutHdr::Tso {
        hdr_len: (ETH_HDR_LEN + headers) as u16,
        mss: mtu.checked_sub(headers).filter(|&m| m > 0)? as u16,
        csum_start: (ETH_HDR_LEN + l4.start) as u16,
        csum_offset: l4.field,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::frame::{L4Checksum, Network, Transport};
    use moat_sim::craft;

    const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
    const ALL: Offloads = Offloads {
        csum: true,
        host_tso4: true,
        guest_csum: true,
        guest_tso4: true,
    };

    /// A guest TX buffer: a NEEDS_CSUM header at (`start`, `offset`), then a TCP SYN whose
    /// checksum field holds garbage (a partial sum moat does not trust).
    fn needs_csum(start: u16, offset: u16) -> Vec<u8> {
        let mut hdr = VirtioNetHdr::rx_bytes(0);
        hdr[0] = 1; // NEEDS_CSUM
        hdr[6..8].copy_from_slice(&start.to_le_bytes());
        hdr[8..10].copy_from_slice(&offset.to_le_bytes());
        let mut buf = hdr.to_vec();
        buf.extend(craft::tcp_syn(
            GUEST_MAC,
            GATEWAY_MAC,
            (GUEST, 40000),
            (DST, 80),
        ));
        let at = VIRTIO_NET_HDR_LEN + ETH_HDR_LEN + 20 + 16;
        buf[at..at + 2].copy_from_slice(&[0xde, 0xad]);
        buf
    }

    #[test]
    fn a_partial_checksum_is_completed_and_says_so() {
        let mut buf = needs_csum(34, 16);
        let frame = TxFrame::read(&mut buf, ALL, 1514)
            .and_then(TxFrame::parse)
            .expect("parses");
        let Network::Ipv4(ip) = frame.net else {
            panic!("not ipv4")
        };
        let Transport::Tcp(tcp) = ip.transport else {
            panic!("not tcp")
        };
        assert_eq!(tcp.checksum(), L4Checksum::Completed);
        assert!(checksum::verify(ip.packet), "the completed sum is right");
    }

    #[test]
    fn offsets_elsewhere_than_the_frame_says_are_refused() {
        for (start, offset) in [(35, 16), (34, 6), (0, 0)] {
            let mut buf = needs_csum(start, offset);
            let parsed = TxFrame::read(&mut buf, ALL, 1514).and_then(TxFrame::parse);
            assert_eq!(parsed.err(), Some(DropReason::BadVirtioHeader));
        }
        let mut buf = needs_csum(34, 16);
        assert_eq!(
            TxFrame::read(&mut buf, Offloads::default(), 1514).err(),
            Some(DropReason::BadVirtioHeader),
            "NEEDS_CSUM without VIRTIO_NET_F_CSUM"
        );
        assert_eq!(
            TxFrame::read(&mut buf, ALL, 40).err(),
            Some(DropReason::Oversized)
        );
    }

    /// An IP packet behind the headroom, as the stack makes them.
    fn from_stack(payload: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(DST.octets(), GUEST.octets(), 64)
            .tcp(80, 40000, 1, 64240)
            .ack(1);
        let mut out = vec![0u8; PACKET_HEADROOM];
        b.write(&mut out, &vec![7u8; payload]).expect("writes");
        out
    }

    #[test]
    fn packets_for_the_guest_get_their_headers() {
        let none = Offloads::default();
        let mut small = from_stack(100);
        assert_eq!(
            to_guest(&mut small, GUEST_MAC, 1500, none),
            Ok(OutHdr::Plain)
        );
        assert_eq!(
            to_guest(&mut small, GUEST_MAC, 1500, ALL),
            Ok(OutHdr::DataValid)
        );
        let frame = crate::frame::parse(&small[VIRTIO_NET_HDR_LEN..]).expect("a frame");
        assert_eq!((frame.eth.src, frame.eth.dst), (GATEWAY_MAC, GUEST_MAC));

        let mut large = from_stack(4000);
        assert_eq!(
            to_guest(&mut large, GUEST_MAC, 1500, ALL),
            Ok(OutHdr::Tso {
                hdr_len: 54,
                mss: 1460,
                csum_start: 34,
                csum_offset: 16
            })
        );
        let mut udp = vec![0u8; PACKET_HEADROOM];
        etherparse::PacketBuilder::ipv4(DST.octets(), GUEST.octets(), 64)
            .udp(53, 40000)
            .write(&mut udp, &[0u8; 2000])
            .expect("writes");
        assert_eq!(
            to_guest(&mut udp, GUEST_MAC, 1500, ALL),
            Err(RxRefused::Oversized { len: 2028 })
        );
        assert_eq!(
            to_guest(&mut [0u8; 10], GUEST_MAC, 1500, ALL),
            Err(RxRefused::NoHeadroom)
        );
    }
}
