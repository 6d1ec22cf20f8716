//! The gateway through the real vhost-user socket: ARP, DHCP and ping are answered, and
//! nothing else is; every drop lands on the right counter.

mod support;

use std::net::Ipv4Addr;

use dhcproto::v4::{Message, MessageType};
use dhcproto::{Decodable, Decoder};
use moat::frame::{self, ArpOp, MacAddr, Network, Transport};
use moat::telemetry::{DropReason, Service, Traffic};
use moat_sim::craft;
use support::*;

#[test]
fn config_space_carries_policy_mac_mtu_and_link_up() {
    let served = Served::start(POLICY, true);
    let guest = served.guest();
    let config = guest.config().expect("config space");
    assert_eq!(config.mac, GUEST_MAC.0);
    assert_eq!(config.status & 1, 1, "link up");
    assert_eq!(config.mtu, 1500);
}

#[test]
fn arp_is_answered_for_the_gateway_only() {
    let served = Served::start(POLICY, true);
    let mut guest = served.guest();

    guest
        .send_frame(&craft::arp_request(GUEST_MAC, GUEST, GW))
        .unwrap();
    let reply = recv_matching(
        &mut guest,
        "arp reply",
        |f| matches!(frame::parse(f), Ok(p) if matches!(p.net, Network::Arp(_))),
    );
    let Network::Arp(arp) = frame::parse(&reply).unwrap().net else {
        unreachable!()
    };
    assert_eq!(
        (arp.op, arp.sender_mac, arp.sender_ip),
        (ArpOp::Reply, GW_MAC, GW)
    );

    for other in [
        Ipv4Addr::new(10, 0, 0, 3),
        Ipv4Addr::new(10, 0, 0, 254),
        Ipv4Addr::new(10, 1, 0, 1),
    ] {
        guest
            .send_frame(&craft::arp_request(GUEST_MAC, GUEST, other))
            .unwrap();
    }
    assert_silent(&mut guest, "arp for other addresses");
    eventually("3 arp_not_for_gateway drops", || {
        served.counters.drops(DropReason::ArpNotForGateway) == 3
    });
    assert_eq!(served.counters.answers(Service::Arp), 1);
}

#[test]
fn dhcp_handshake_yields_the_policy_address() {
    let served = Served::start(POLICY, true);
    let mut guest = served.guest();
    let dhcp_of = |f: &[u8]| -> Option<Message> {
        let parsed = frame::parse(f).ok()?;
        let Network::Ipv4(ip) = parsed.net else {
            return None;
        };
        let Transport::Udp(udp) = ip.transport else {
            return None;
        };
        (udp.src_port == 67)
            .then(|| Message::decode(&mut Decoder::new(udp.payload)).ok())
            .flatten()
    };
    guest
        .send_frame(&craft::dhcp(
            GUEST_MAC,
            MessageType::Discover,
            42,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            GW_MAC,
        ))
        .unwrap();
    let offer = dhcp_of(&recv_matching(&mut guest, "offer", |f| {
        dhcp_of(f).is_some()
    }))
    .unwrap();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), GUEST);
    guest
        .send_frame(&craft::dhcp(
            GUEST_MAC,
            MessageType::Request,
            42,
            Ipv4Addr::UNSPECIFIED,
            Some(offer.yiaddr()),
            Some(GW),
            GW_MAC,
        ))
        .unwrap();
    let ack = dhcp_of(&recv_matching(&mut guest, "ack", |f| dhcp_of(f).is_some())).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), GUEST);

    // Another MAC asking (DHCP starvation style) gets nothing.
    let other = MacAddr([0x52, 0x54, 0, 9, 9, 9]);
    guest
        .send_frame(&craft::dhcp(
            other,
            MessageType::Discover,
            43,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            GW_MAC,
        ))
        .unwrap();
    assert_silent(&mut guest, "dhcp from another mac");
    eventually("spoofed mac drop", || {
        served.counters.drops(DropReason::SpoofedSrcMac) == 1
    });
}

#[test]
fn ping_to_the_gateway_is_answered_and_nothing_else_is() {
    let served = Served::start(POLICY, true);
    let mut guest = served.guest();
    for seq in 0..20u16 {
        guest
            .send_frame(&craft::icmp_echo(
                GUEST_MAC,
                GW_MAC,
                GUEST,
                GW,
                9,
                seq,
                b"0123456789",
            ))
            .unwrap();
        let reply = recv_matching(&mut guest, "echo reply", |_| true);
        let Network::Ipv4(ip) = frame::parse(&reply).unwrap().net else {
            panic!("not ipv4")
        };
        let Transport::Icmp(icmp) = ip.transport else {
            panic!("not icmp")
        };
        assert_eq!(icmp.icmp_type, frame::ICMP_ECHO_REPLY);
        assert_eq!(u16::from_be_bytes([icmp.message[6], icmp.message[7]]), seq);
    }
    let forbidden = [
        (
            craft::icmp_echo(
                GUEST_MAC,
                GW_MAC,
                GUEST,
                Ipv4Addr::new(10, 0, 0, 3),
                1,
                1,
                b"",
            ),
            DropReason::NotAllowed,
        ),
        (
            craft::icmp_echo(
                GUEST_MAC,
                GW_MAC,
                GUEST,
                Ipv4Addr::new(203, 0, 113, 1),
                1,
                1,
                b"",
            ),
            DropReason::NotAllowed,
        ),
        (
            craft::tcp_syn(GUEST_MAC, GW_MAC, (GUEST, 40000), (GW, 22)),
            DropReason::GatewayPortClosed,
        ),
        (
            craft::tcp_syn(
                GUEST_MAC,
                GW_MAC,
                (GUEST, 40001),
                (Ipv4Addr::new(10, 0, 0, 3), 22),
            ),
            DropReason::ReservedDestination,
        ),
        (
            craft::icmp_echo(
                MacAddr([0x52, 0x54, 0, 1, 1, 1]),
                GW_MAC,
                GUEST,
                GW,
                1,
                1,
                b"",
            ),
            DropReason::SpoofedSrcMac,
        ),
        (
            craft::icmp_echo(GUEST_MAC, GW_MAC, Ipv4Addr::new(10, 0, 0, 7), GW, 1, 1, b""),
            DropReason::SpoofedSrcIp,
        ),
    ];
    for (bytes, _) in &forbidden {
        guest.send_frame(bytes).unwrap();
    }
    assert_silent(&mut guest, "forbidden traffic");
    eventually("drop counters", || {
        served.counters.drops(DropReason::NotAllowed) == 2
            && served.counters.drops(DropReason::ReservedDestination) == 1
            && served.counters.drops(DropReason::GatewayPortClosed) == 1
            && served.counters.drops(DropReason::SpoofedSrcMac) == 1
            && served.counters.drops(DropReason::SpoofedSrcIp) == 1
    });
    assert_eq!(served.counters.answers(Service::IcmpEcho), 20);
    assert_eq!(served.counters.traffic(Traffic::RxFrames), 20);
}
