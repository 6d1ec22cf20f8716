//! Building guest-side frames: what a guest would send. Used by the simulated guest's
//! callers (integration tests, the canary, benchmarks) and by moat's unit tests.
//!
//! MAC addresses are anything that converts into six octets ([`Mac`]): plain arrays, or
//! moat's own address type (which converts), so callers pass what they hold.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::Encodable;
use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder};

use crate::Mac;

pub const BROADCAST_MAC: Mac = [0xff; 6];

/// An ARP packet from `src` to `eth_dst`.
pub fn arp(
    op: ArpOperation,
    eth_dst: impl Into<Mac>,
    sender_mac: impl Into<Mac>,
    sender_ip: Ipv4Addr,
    target_mac: impl Into<Mac>,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let (eth_dst, sender_mac, target_mac) = (eth_dst.into(), sender_mac.into(), target_mac.into());
    let packet = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        op,
        &sender_mac,
        &sender_ip.octets(),
        &target_mac,
        &target_ip.octets(),
    )
    .expect("6-byte MACs and 4-byte addresses are valid ARP sizes");
    let builder = PacketBuilder::ethernet2(sender_mac, eth_dst).arp(packet);
    let mut out = Vec::with_capacity(builder.size());
    builder
        .write(&mut out)
        .expect("writing to a Vec cannot fail");
    out
}

/// "Who has `target_ip`? Tell `sender_ip`", broadcast.
pub fn arp_request(
    sender_mac: impl Into<Mac>,
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    arp(
        ArpOperation::REQUEST,
        BROADCAST_MAC,
        sender_mac,
        sender_ip,
        [0; 6],
        target_ip,
    )
}

/// An IPv4 ICMP echo request.
pub fn icmp_echo(
    src_mac: impl Into<Mac>,
    dst_mac: impl Into<Mac>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(src_mac.into(), dst_mac.into())
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(id, seq);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .expect("writing to a Vec cannot fail");
    out
}

/// An IPv4 UDP datagram.
pub fn udp(
    src_mac: impl Into<Mac>,
    dst_mac: impl Into<Mac>,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(src_mac.into(), dst_mac.into())
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, payload)
        .expect("writing to a Vec cannot fail");
    out
}

/// An IPv4 TCP SYN.
pub fn tcp_syn(
    src_mac: impl Into<Mac>,
    dst_mac: impl Into<Mac>,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(src_mac.into(), dst_mac.into())
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 0x1000, 64240)
        .syn();
    let mut out = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut out, &[])
        .expect("writing to a Vec cannot fail");
    out
}

/// A DHCP client message (DISCOVER, REQUEST, ...) as a fresh client sends it: from 0.0.0.0
/// to the broadcast address, unless `ciaddr` is set (renewal: unicast to `server`).
pub fn dhcp(
    mac: impl Into<Mac>,
    kind: MessageType,
    xid: u32,
    ciaddr: Ipv4Addr,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
    gateway_mac: impl Into<Mac>,
) -> Vec<u8> {
    let mac: Mac = mac.into();
    let mut msg = Message::new_with_id(
        xid,
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    msg.set_flags(Flags::default());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    if let Some(addr) = requested {
        opts.insert(DhcpOption::RequestedIpAddress(addr));
    }
    if let Some(addr) = server {
        opts.insert(DhcpOption::ServerIdentifier(addr));
    }
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
    ]));
    let payload = msg.to_vec().expect("a well-formed DHCP message encodes");
    let renewing = ciaddr != Ipv4Addr::UNSPECIFIED;
    let (dst_mac, dst_ip) = match (renewing, server) {
        (true, Some(server)) => (gateway_mac.into(), server),
        _ => (BROADCAST_MAC, Ipv4Addr::BROADCAST),
    };
    udp(mac, dst_mac, (ciaddr, 68), (dst_ip, 67), &payload)
}

/// A minimal TLS 1.2 ClientHello record with one server name (SNI) entry.
pub fn tls_client_hello(name: &str) -> Vec<u8> {
    let n = name.as_bytes();
    let list_len = 3 + n.len();
    let mut sni = vec![0u8, 0]; // extension type: server_name
    sni.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    sni.extend_from_slice(&(list_len as u16).to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sni.extend_from_slice(n);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    body.extend_from_slice(&sni);
    let mut handshake = vec![1]; // ClientHello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    const GUEST_MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    #[test]
    fn arp_request_is_broadcast_and_asks_for_the_target() {
        let f = arp_request(GUEST_MAC, GUEST, GW);
        assert_eq!(f[..6], BROADCAST_MAC);
        assert_eq!(f[6..12], GUEST_MAC);
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Arp(arp)) = p.net else {
            panic!("not ARP: {p:?}");
        };
        assert_eq!(arp.operation(), ArpOperation::REQUEST);
        assert_eq!(arp.sender_protocol_addr(), GUEST.octets());
        assert_eq!(arp.target_protocol_addr(), GW.octets());
        assert_eq!(arp.target_hw_addr(), [0; 6]);
    }

    #[test]
    fn udp_and_syn_parse_with_their_ports_and_checksums() {
        let f = udp(GUEST_MAC, crate::GATEWAY_MAC, (GUEST, 5000), (GW, 53), b"q");
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(TransportSlice::Udp(u)) = p.transport else {
            panic!("not UDP");
        };
        assert_eq!((u.source_port(), u.destination_port()), (5000, 53));
        assert_ne!(u.checksum(), 0, "a computed checksum");
        let f = tcp_syn(GUEST_MAC, crate::GATEWAY_MAC, (GUEST, 40000), (GW, 22));
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP");
        };
        assert!(t.syn() && !t.ack());
        assert_eq!(t.destination_port(), 22);
    }

    #[test]
    fn dhcp_broadcasts_unless_renewing() {
        let discover = dhcp(
            GUEST_MAC,
            MessageType::Discover,
            7,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            crate::GATEWAY_MAC,
        );
        assert_eq!(discover[..6], BROADCAST_MAC);
        assert_eq!(discover[30..34], Ipv4Addr::BROADCAST.octets());
        let renew = dhcp(
            GUEST_MAC,
            MessageType::Request,
            8,
            GUEST,
            None,
            Some(GW),
            crate::GATEWAY_MAC,
        );
        assert_eq!(renew[..6], crate::GATEWAY_MAC, "unicast to the server");
        assert_eq!(renew[26..30], GUEST.octets());
        assert_eq!(renew[30..34], GW.octets());
    }

    #[test]
    fn client_hello_carries_the_name() {
        let hello = tls_client_hello("api.example.com");
        assert_eq!(hello[0], 0x16, "a handshake record");
        let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(hello.len(), 5 + len);
        assert!(hello.ends_with(b"api.example.com"));
    }
}
