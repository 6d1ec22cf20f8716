//! Parse a guest frame once into a typed view.
//!
//! Everything the firewall and the services look at comes from [`parse`]; nothing below the
//! view touches raw bytes again. Parsing is strict: whatever is not a well-formed Ethernet II
//! frame carrying ARP or an unfragmented, option-less IPv4 packet with TCP, UDP or ICMP is
//! rejected here with the [`DropReason`] that says why. The wire formats come from etherparse;
//! only the checks moat needs on top of it (checksums, lengths, fragments) are written here.

pub mod checksum;
pub mod virtio_hdr;

use std::net::Ipv4Addr;

use etherparse::{
    ArpHardwareId, ArpOperation, EtherType, Ethernet2HeaderSlice, Icmpv4Slice, IpNumber,
    Ipv4HeaderSlice, TcpSlice, UdpSlice,
};

use crate::policy::MacAddr;
use crate::telemetry::DropReason;

pub use checksum::{internet_checksum, udp_checksum_ok};
pub use virtio_hdr::VirtioNetHdr;

/// Ethernet II header length.
pub const ETH_HDR_LEN: usize = 14;

/// The Ethernet header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ethernet {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub ethertype: u16,
}

/// A parsed frame: the Ethernet header and what it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub eth: Ethernet,
    pub net: Network<'a>,
}

/// The network layer of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network<'a> {
    Arp(Arp),
    Ipv4(Ipv4<'a>),
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: ArpOp,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

/// ARP operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpOp {
    Request,
    Reply,
    Other(u16),
}

/// An IPv4 packet (header validated, no options, not a fragment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4<'a> {
    /// The whole packet (header and payload, without Ethernet padding).
    pub packet: &'a [u8],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub identification: u16,
    pub transport: Transport<'a>,
}

/// The transport layer of an IPv4 packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport<'a> {
    Udp(Udp<'a>),
    Tcp(Tcp<'a>),
    Icmp(Icmp<'a>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    /// The whole UDP datagram (header included), for checksum checks.
    pub datagram: &'a [u8],
    pub payload: &'a [u8],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub payload: &'a [u8],
}

/// The TCP flags moat cares about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp<'a> {
    pub icmp_type: u8,
    pub code: u8,
    /// The whole ICMP message (header included), for checksum checks and echo replies.
    pub message: &'a [u8],
}

/// ICMP echo request type.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP echo reply type.
pub const ICMP_ECHO_REPLY: u8 = 0;

const ETHERTYPE_VLAN_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// IP packets for the guest (from the stack, UDP associations, the upstream resolver) are
/// built behind this much room: the virtio-net header and the Ethernet header are then
/// written in front of each in place, with no copy per delivered packet.
pub const PACKET_HEADROOM: usize = virtio_hdr::VIRTIO_NET_HDR_LEN + ETH_HDR_LEN;

/// A UDP/IPv4 packet for the guest, behind [`PACKET_HEADROOM`]; `None` if it cannot be built
/// (a payload too long for one datagram).
pub fn udp_packet(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let builder = etherparse::PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut packet = Vec::with_capacity(PACKET_HEADROOM + builder.size(payload.len()));
    packet.resize(PACKET_HEADROOM, 0);
    builder.write(&mut packet, payload).ok()?;
    Some(packet)
}

/// Parse one Ethernet frame (without the virtio-net header).
pub fn parse(bytes: &[u8]) -> Result<Frame<'_>, DropReason> {
    let eth_view = parse_ethernet(bytes)?;
    let payload = &bytes[ETH_HDR_LEN..];
    let net = match EtherType(eth_view.ethertype) {
        EtherType::ARP => Network::Arp(parse_arp(payload)?),
        EtherType::IPV4 => Network::Ipv4(parse_ipv4(payload)?),
        EtherType::IPV6 => return Err(DropReason::Ipv6),
        t if ETHERTYPE_VLAN_TAGS.contains(&t.0) => return Err(DropReason::Vlan),
        _ => return Err(DropReason::UnsupportedEthertype),
    };
    Ok(Frame { eth: eth_view, net })
}

/// Just the Ethernet header (the firewall's link checks need no more).
pub fn parse_ethernet(bytes: &[u8]) -> Result<Ethernet, DropReason> {
    let eth = Ethernet2HeaderSlice::from_slice(bytes).map_err(|_| DropReason::Truncated)?;
    Ok(Ethernet {
        dst: MacAddr(eth.destination()),
        src: MacAddr(eth.source()),
        ethertype: eth.ether_type().0,
    })
}

fn parse_arp(payload: &[u8]) -> Result<Arp, DropReason> {
    let arp =
        etherparse::ArpPacketSlice::from_slice(payload).map_err(|_| DropReason::ArpMalformed)?;
    if arp.hw_addr_type() != ArpHardwareId::ETHERNET
        || arp.proto_addr_type() != EtherType::IPV4
        || arp.hw_addr_size() != 6
        || arp.proto_addr_size() != 4
    {
        return Err(DropReason::ArpMalformed);
    }
    let mac = |s: &[u8]| -> Result<MacAddr, DropReason> {
        Ok(MacAddr(s.try_into().map_err(|_| DropReason::ArpMalformed)?))
    };
    let ip = |s: &[u8]| -> Result<Ipv4Addr, DropReason> {
        let b: [u8; 4] = s.try_into().map_err(|_| DropReason::ArpMalformed)?;
        Ok(Ipv4Addr::from(b))
    };
    let op = match arp.operation() {
        ArpOperation::REQUEST => ArpOp::Request,
        ArpOperation::REPLY => ArpOp::Reply,
        other => ArpOp::Other(other.0),
    };
    Ok(Arp {
        op,
        sender_mac: mac(arp.sender_hw_addr())?,
        sender_ip: ip(arp.sender_protocol_addr())?,
        target_mac: mac(arp.target_hw_addr())?,
        target_ip: ip(arp.target_protocol_addr())?,
    })
}

fn parse_ipv4(payload: &[u8]) -> Result<Ipv4<'_>, DropReason> {
    let header = Ipv4HeaderSlice::from_slice(payload).map_err(|_| DropReason::Ipv4Malformed)?;
    let header_len = header.slice().len();
    let total_len = usize::from(header.total_len());
    // Ethernet pads short frames, so the buffer may be longer than the packet, never shorter.
    if total_len < header_len || total_len > payload.len() {
        return Err(DropReason::Ipv4Malformed);
    }
    if header.to_header().calc_header_checksum() != header.header_checksum() {
        return Err(DropReason::Ipv4BadChecksum);
    }
    if !header.options().is_empty() {
        return Err(DropReason::Ipv4Options);
    }
    if header.is_fragmenting_payload() {
        return Err(DropReason::Ipv4Fragment);
    }
    if header.ttl() == 0 {
        return Err(DropReason::TtlExpired);
    }
    let l4 = &payload[header_len..total_len];
    let transport = match header.protocol() {
        IpNumber::UDP => {
            let udp = UdpSlice::from_slice(l4).map_err(|_| DropReason::L4Malformed)?;
            let len = usize::from(udp.length());
            if len < 8 || len > l4.len() {
                return Err(DropReason::L4Malformed);
            }
            Transport::Udp(Udp {
                src_port: udp.source_port(),
                dst_port: udp.destination_port(),
                datagram: &l4[..len],
                payload: &l4[8..len],
            })
        }
        IpNumber::TCP => {
            let tcp = TcpSlice::from_slice(l4).map_err(|_| DropReason::L4Malformed)?;
            Transport::Tcp(Tcp {
                src_port: tcp.source_port(),
                dst_port: tcp.destination_port(),
                seq: tcp.sequence_number(),
                ack: tcp.acknowledgment_number(),
                flags: TcpFlags {
                    syn: tcp.syn(),
                    ack: tcp.ack(),
                    fin: tcp.fin(),
                    rst: tcp.rst(),
                },
                payload: tcp.payload(),
            })
        }
        IpNumber::ICMP => {
            let icmp = Icmpv4Slice::from_slice(l4).map_err(|_| DropReason::L4Malformed)?;
            Transport::Icmp(Icmp {
                icmp_type: icmp.type_u8(),
                code: icmp.code_u8(),
                message: l4,
            })
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok(Ipv4 {
        packet: &payload[..total_len],
        src: header.source_addr(),
        dst: header.destination_addr(),
        ttl: header.ttl(),
        identification: header.identification(),
        transport,
    })
}

/// The octets, for moat-sim's frame crafting (which takes `impl Into<[u8; 6]>`: the test kit
/// cannot know moat's type), so tests and the canary pass a `MacAddr` as they hold it.
impl From<MacAddr> for [u8; 6] {
    fn from(mac: MacAddr) -> [u8; 6] {
        mac.0
    }
}

#[cfg(test)]
mod tests;
