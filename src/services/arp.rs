//! ARP replies for the gateway address (the firewall lets only those requests through).

use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder};

use crate::frame::GATEWAY_MAC;
use crate::frame::{Frame, Network};
use crate::policy::Vm;
use crate::telemetry::DropReason;

/// Reply "gateway is at GATEWAY_MAC" to the guest.
pub fn answer(vm: &Vm, frame: &Frame<'_>) -> Result<Vec<u8>, DropReason> {
    let Network::Arp(request) = &frame.net else {
        return Err(DropReason::ArpMalformed);
    };
    let reply = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REPLY,
        &GATEWAY_MAC.0,
        &vm.gateway.octets(),
        &request.sender_mac.0,
        &request.sender_ip.octets(),
    )
    .map_err(|_| DropReason::ArpMalformed)?;
    let builder = PacketBuilder::ethernet2(GATEWAY_MAC.0, vm.mac.0).arp(reply);
    let mut out = Vec::with_capacity(builder.size());
    builder
        .write(&mut out)
        .map_err(|_| DropReason::ArpMalformed)?;
    Ok(out)
}
