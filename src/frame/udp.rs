//! UDP over IPv4: datagrams the guest sends (parsed, their checksum state on demand) and
//! the ones moat builds for it. The wire format is etherparse's.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{PacketBuilder, UdpSlice};

use super::checksum::{self, L4Checksum, Pseudo};
use super::PACKET_HEADROOM;
use crate::telemetry::DropReason;

/// Length of a UDP header.
const UDP_HDR_LEN: usize = 8;

/// A UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    /// The whole UDP datagram (header included), as long as its length field says.
    pub datagram: &'a [u8],
    pub payload: &'a [u8],
    /// What the checksum covers, for [`Udp::checksum`].
    sum: Pseudo,
}

impl Udp<'_> {
    /// The datagram's checksum state, summed when asked: only whoever would use the
    /// datagram asks, so frames the firewall drops are never summed.
    pub fn checksum(&self) -> L4Checksum {
        if self.sum.completed {
            L4Checksum::Completed
        } else {
            checksum::udp_checksum(self.sum.src, self.sum.dst, self.datagram)
        }
    }
}

/// The UDP datagram in an IPv4 packet's payload `l4`, from `src` to `dst`. `completed`:
/// moat computed the checksum over the whole of `l4` (a guest's NEEDS_CSUM).
pub(super) fn parse(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: &[u8],
    completed: bool,
) -> Result<Udp<'_>, DropReason> {
    let udp = UdpSlice::from_slice(l4).map_err(|_| DropReason::L4Malformed)?;
    let len = usize::from(udp.length());
    if len < UDP_HDR_LEN || len > l4.len() {
        return Err(DropReason::L4Malformed);
    }
    let datagram = &l4[..len];
    // A completed sum covers the whole IP payload: it is the datagram's only when the two
    // lengths agree (otherwise the datagram is summed like any other).
    let sum = Pseudo {
        src,
        dst,
        completed: completed && len == l4.len(),
    };
    Ok(Udp {
        src_port: udp.source_port(),
        dst_port: udp.destination_port(),
        datagram,
        payload: &datagram[UDP_HDR_LEN..],
        sum,
    })
}

/// A UDP/IPv4 packet for the guest, behind [`PACKET_HEADROOM`]; `None` if it cannot be built
/// (a payload too long for one datagram).
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Option<Vec<u8>> {
    let builder =
        PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).udp(src.port(), dst.port());
    let mut packet = Vec::with_capacity(PACKET_HEADROOM + builder.size(payload.len()));
    packet.resize(PACKET_HEADROOM, 0);
    builder.write(&mut packet, payload).ok()?;
    Some(packet)
}
