//! ARP for Ethernet and IPv4 (the only kind moat answers): the wire format is etherparse's.

use std::net::Ipv4Addr;

use etherparse::{ArpHardwareId, ArpOperation, ArpPacketSlice, EtherType};

use super::MacAddr;
use crate::telemetry::DropReason;

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

/// The ARP packet an Ethernet frame carries (`payload`: what follows its header).
pub(super) fn parse(payload: &[u8]) -> Result<Arp, DropReason> {
    let arp = ArpPacketSlice::from_slice(payload).map_err(|_| DropReason::ArpMalformed)?;
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
