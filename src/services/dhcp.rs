//! DHCP server for the one VM: it offers the policy's address and nothing else.
//!
//! The wire format is dhcproto's; the server logic (RFC 2131 for a single static lease) is
//! here because no crate implements a server we can embed in the data path.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use etherparse::PacketBuilder;

use crate::frame::{Frame, MacAddr, Network, Transport, GATEWAY_MAC};
use crate::policy::Vm;
use crate::services::icmp::GATEWAY_TTL;
use crate::telemetry::DropReason;

/// Lease time offered: one day. The lease never changes while the VM lives.
pub const LEASE_SECS: u32 = 86_400;

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;

/// Answer a DHCP message from the guest. `Ok(None)`: handled, nothing to send (RELEASE).
pub fn answer(vm: &Vm, frame: &Frame<'_>) -> Result<Option<Vec<u8>>, DropReason> {
    let Network::Ipv4(ip) = &frame.net else {
        return Err(DropReason::DhcpMalformed);
    };
    let Transport::Udp(udp) = &ip.transport else {
        return Err(DropReason::DhcpMalformed);
    };
    if !udp.checksum().ok() {
        return Err(DropReason::L4BadChecksum);
    }
    let request =
        Message::decode(&mut Decoder::new(udp.payload)).map_err(|_| DropReason::DhcpMalformed)?;
    // Check hlen before chaddr(): dhcproto slices chaddr by the (guest-controlled) hlen.
    if request.opcode() != Opcode::BootRequest
        || request.htype() != HType::Eth
        || request.hlen() != 6
    {
        return Err(DropReason::DhcpMalformed);
    }
    if request.chaddr() != vm.mac.0 || frame.eth.src != vm.mac {
        return Err(DropReason::DhcpWrongClient);
    }
    let msg_type = request.opts().msg_type().ok_or(DropReason::DhcpMalformed)?;
    let reply = match msg_type {
        MessageType::Discover => reply(vm, &request, MessageType::Offer),
        MessageType::Request => {
            if let Some(DhcpOption::ServerIdentifier(server)) =
                request.opts().get(OptionCode::ServerIdentifier)
            {
                if *server != vm.gateway {
                    // The client chose another server: nothing for us to say.
                    return Err(DropReason::DhcpIgnored);
                }
            }
            let wanted = match request.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(addr)) => *addr,
                _ => request.ciaddr(),
            };
            if wanted == vm.address {
                reply(vm, &request, MessageType::Ack)
            } else {
                reply(vm, &request, MessageType::Nak)
            }
        }
        MessageType::Inform => reply(vm, &request, MessageType::Ack),
        MessageType::Release => return Ok(None),
        _ => return Err(DropReason::DhcpIgnored),
    };
    encode(vm, &request, &reply).map(Some)
}

/// Build the reply message (options per RFC 2131 table 3).
fn reply(vm: &Vm, request: &Message, kind: MessageType) -> Message {
    let inform = request.opts().msg_type() == Some(MessageType::Inform);
    let yiaddr = if kind == MessageType::Nak || inform {
        Ipv4Addr::UNSPECIFIED
    } else {
        vm.address
    };
    let mut msg = Message::new_with_id(
        request.xid(),
        if inform {
            request.ciaddr()
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        yiaddr,
        Ipv4Addr::UNSPECIFIED,
        request.giaddr(),
        &vm.mac.0,
    );
    msg.set_opcode(Opcode::BootReply).set_flags(request.flags());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(vm.gateway));
    if kind == MessageType::Nak {
        return msg;
    }
    opts.insert(DhcpOption::SubnetMask(vm.netmask()));
    opts.insert(DhcpOption::Router(vec![vm.gateway]));
    opts.insert(DhcpOption::DomainNameServer(vec![vm.gateway]));
    opts.insert(DhcpOption::BroadcastAddr(vm.broadcast()));
    opts.insert(DhcpOption::InterfaceMtu(vm.mtu));
    if !inform {
        opts.insert(DhcpOption::AddressLeaseTime(LEASE_SECS));
        opts.insert(DhcpOption::Renewal(LEASE_SECS / 2));
        opts.insert(DhcpOption::Rebinding(LEASE_SECS / 8 * 7));
    }
    msg
}

/// Wrap the reply in UDP/IPv4/Ethernet. A NAK, or a client that asked for broadcast, gets a
/// broadcast; a client that has an address gets it unicast; otherwise unicast to the offered
/// address at the client's MAC (RFC 2131 4.1).
fn encode(vm: &Vm, request: &Message, reply: &Message) -> Result<Vec<u8>, DropReason> {
    let payload = reply.to_vec().map_err(|_| DropReason::DhcpMalformed)?;
    let nak = reply.opts().msg_type() == Some(MessageType::Nak);
    let (dst_mac, dst_ip) = if nak || request.flags().broadcast() {
        (MacAddr([0xff; 6]), Ipv4Addr::BROADCAST)
    } else if request.ciaddr() != Ipv4Addr::UNSPECIFIED {
        (vm.mac, request.ciaddr())
    } else {
        (vm.mac, reply.yiaddr())
    };
    let builder = PacketBuilder::ethernet2(GATEWAY_MAC.0, dst_mac.0)
        .ipv4(vm.gateway.octets(), dst_ip.octets(), GATEWAY_TTL)
        .udp(SERVER_PORT, CLIENT_PORT);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, &payload)
        .map_err(|_| DropReason::DhcpMalformed)?;
    Ok(out)
}
