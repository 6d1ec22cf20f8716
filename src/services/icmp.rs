//! ICMP echo replies from the gateway.

use etherparse::{IpNumber, Ipv4Header, PacketBuilder};

use crate::frame::{Frame, Network, Transport, GATEWAY_MAC};
use crate::policy::Vm;
use crate::telemetry::DropReason;

/// TTL of packets the gateway originates.
pub const GATEWAY_TTL: u8 = 64;

/// Echo the request's identifier, sequence number and data back to the guest.
pub fn answer(vm: &Vm, frame: &Frame<'_>) -> Result<Vec<u8>, DropReason> {
    let Network::Ipv4(ip) = &frame.net else {
        return Err(DropReason::L4Malformed);
    };
    let Transport::Icmp(icmp) = &ip.transport else {
        return Err(DropReason::L4Malformed);
    };
    if !icmp.checksum().ok() {
        return Err(DropReason::L4BadChecksum);
    }
    let reply = icmp.echo_reply().ok_or(DropReason::L4Malformed)?;

    let len = u16::try_from(reply.len()).map_err(|_| DropReason::L4Malformed)?;
    let mut header = Ipv4Header::new(
        len,
        GATEWAY_TTL,
        IpNumber::ICMP,
        vm.gateway.octets(),
        ip.src.octets(),
    )
    .map_err(|_| DropReason::L4Malformed)?;
    header.header_checksum = header.calc_header_checksum();
    let builder = PacketBuilder::ethernet2(GATEWAY_MAC.0, vm.mac.0)
        .ip(etherparse::IpHeaders::Ipv4(header, Default::default()));
    let mut out = Vec::with_capacity(builder.size(reply.len()));
    builder
        .write(&mut out, IpNumber::ICMP, &reply)
        .map_err(|_| DropReason::L4Malformed)?;
    Ok(out)
}
