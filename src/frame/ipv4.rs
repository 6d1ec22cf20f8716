//! IPv4, strictly: a validated header without options, not a fragment, carrying TCP, UDP
//! or ICMP (each parsed in its own module). The wire format is etherparse's.

use std::net::Ipv4Addr;

use etherparse::{IpNumber, Ipv4HeaderSlice};

use super::{icmp, tcp, udp, Icmp, Tcp, Udp};
use crate::telemetry::DropReason;

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

/// The IPv4 packet an Ethernet frame carries (`payload`: what follows its header, padding
/// included). `completed`: moat has just completed the packet's TCP/UDP checksum.
pub(super) fn parse(payload: &[u8], completed: bool) -> Result<Ipv4<'_>, DropReason> {
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
    let (src, dst) = (header.source_addr(), header.destination_addr());
    let transport = match header.protocol() {
        IpNumber::UDP => Transport::Udp(udp::parse(src, dst, l4, completed)?),
        IpNumber::TCP => Transport::Tcp(tcp::parse(src, dst, l4, completed)?),
        IpNumber::ICMP => Transport::Icmp(icmp::parse(l4)?),
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok(Ipv4 {
        packet: &payload[..total_len],
        src,
        dst,
        ttl: header.ttl(),
        identification: header.identification(),
        transport,
    })
}
