use std::net::Ipv4Addr;
use std::path::Path;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder};
use proptest::prelude::*;

use super::*;
use crate::frame::virtio_hdr::VIRTIO_NET_HDR_LEN;
use crate::telemetry::Service;
use moat_sim::craft;

const POLICY: &str = r#"
[vm]
name = "dp-test"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/30"
mtu = 1400
"#;

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn datapath() -> Datapath {
    let policy = Policy::parse(POLICY, Path::new("dp-test.toml")).expect("valid test policy");
    Datapath::new(
        Arc::new(policy),
        Arc::default(),
        Arc::new(Counters::default()),
    )
}

fn with_hdr(frame: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN];
    buf.extend_from_slice(frame);
    buf
}

fn dhcp_reply(answer: &[u8]) -> (Ipv4Addr, Message) {
    let frame = frame::parse(answer).expect("reply parses");
    assert_eq!(frame.eth.src, GATEWAY_MAC);
    let Network::Ipv4(ip) = frame.net else {
        panic!("not ipv4")
    };
    assert_eq!(ip.src, GW);
    let Transport::Udp(udp) = ip.transport else {
        panic!("not udp")
    };
    assert_eq!((udp.src_port, udp.dst_port), (67, 68));
    assert!(frame::udp_checksum_ok(ip.src, ip.dst, udp.datagram));
    (
        ip.dst,
        Message::decode(&mut Decoder::new(udp.payload)).expect("dhcp decodes"),
    )
}

#[test]
fn dhcp_handshake_offers_the_policy_address() {
    let mut dp = datapath();
    let discover = craft::dhcp(
        GUEST_MAC,
        MessageType::Discover,
        0x1234,
        Ipv4Addr::UNSPECIFIED,
        None,
        None,
        GATEWAY_MAC,
    );
    let offer = dp.guest_frame(&mut with_hdr(&discover)).expect("an offer");
    let (_, offer) = dhcp_reply(&offer);
    assert_eq!(offer.xid(), 0x1234);
    assert_eq!(offer.yiaddr(), GUEST);
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    let opts = offer.opts();
    assert_eq!(
        opts.get(OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 252)))
    );
    assert_eq!(
        opts.get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![GW]))
    );
    assert_eq!(
        opts.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![GW]))
    );
    assert_eq!(
        opts.get(OptionCode::InterfaceMtu),
        Some(&DhcpOption::InterfaceMtu(1400))
    );
    assert_eq!(
        opts.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(GW))
    );
    assert!(
        matches!(opts.get(OptionCode::AddressLeaseTime), Some(DhcpOption::AddressLeaseTime(t)) if *t > 0)
    );

    let request = craft::dhcp(
        GUEST_MAC,
        MessageType::Request,
        0x1234,
        Ipv4Addr::UNSPECIFIED,
        Some(GUEST),
        Some(GW),
        GATEWAY_MAC,
    );
    let (_, ack) = dhcp_reply(&dp.guest_frame(&mut with_hdr(&request)).expect("an ack"));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), GUEST);

    let wrong = craft::dhcp(
        GUEST_MAC,
        MessageType::Request,
        0x99,
        Ipv4Addr::UNSPECIFIED,
        Some(Ipv4Addr::new(10, 0, 0, 3)),
        Some(GW),
        GATEWAY_MAC,
    );
    let (dst, nak) = dhcp_reply(&dp.guest_frame(&mut with_hdr(&wrong)).expect("a nak"));
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(dst, Ipv4Addr::BROADCAST);

    let renew = craft::dhcp(
        GUEST_MAC,
        MessageType::Request,
        0x55,
        GUEST,
        None,
        Some(GW),
        GATEWAY_MAC,
    );
    let (dst, ack) = dhcp_reply(
        &dp.guest_frame(&mut with_hdr(&renew))
            .expect("a renewal ack"),
    );
    assert_eq!(
        (dst, ack.opts().msg_type()),
        (GUEST, Some(MessageType::Ack))
    );

    let inform = craft::dhcp(
        GUEST_MAC,
        MessageType::Inform,
        0x56,
        GUEST,
        None,
        Some(GW),
        GATEWAY_MAC,
    );
    let (_, ack) = dhcp_reply(
        &dp.guest_frame(&mut with_hdr(&inform))
            .expect("an inform ack"),
    );
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert!(
        ack.opts().get(OptionCode::AddressLeaseTime).is_none(),
        "no lease time in an INFORM ack"
    );

    let release = craft::dhcp(
        GUEST_MAC,
        MessageType::Release,
        0x57,
        GUEST,
        None,
        Some(GW),
        GATEWAY_MAC,
    );
    assert!(dp.guest_frame(&mut with_hdr(&release)).is_none());
    assert_eq!(dp.counters().answers(Service::Dhcp), 6);
    assert_eq!(dp.counters().total_drops(), 0);
}

#[test]
fn dhcp_with_a_bogus_hardware_length_is_dropped_not_panicking() {
    let mut dp = datapath();
    let mut discover = craft::dhcp(
        GUEST_MAC,
        MessageType::Discover,
        1,
        Ipv4Addr::UNSPECIFIED,
        None,
        None,
        GATEWAY_MAC,
    );
    // hlen lives at byte 2 of the BOOTP header: eth 14 + ip 20 + udp 8.
    discover[14 + 20 + 8 + 2] = 200;
    discover[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]); // no UDP checksum
    assert!(dp.guest_frame(&mut with_hdr(&discover)).is_none());
    assert_eq!(dp.counters().drops(DropReason::DhcpMalformed), 1);
}

#[test]
fn arp_reply_names_the_gateway_mac() {
    let mut dp = datapath();
    let reply = dp
        .guest_frame(&mut with_hdr(&craft::arp_request(GUEST_MAC, GUEST, GW)))
        .expect("arp reply");
    let frame = frame::parse(&reply).unwrap();
    assert_eq!(frame.eth.dst, GUEST_MAC);
    let Network::Arp(arp) = frame.net else {
        panic!("not arp")
    };
    assert_eq!(arp.op, crate::frame::ArpOp::Reply);
    assert_eq!((arp.sender_mac, arp.sender_ip), (GATEWAY_MAC, GW));
    assert_eq!((arp.target_mac, arp.target_ip), (GUEST_MAC, GUEST));
}

#[test]
fn echo_reply_mirrors_the_request() {
    let mut dp = datapath();
    let req = craft::icmp_echo(
        GUEST_MAC,
        GATEWAY_MAC,
        GUEST,
        GW,
        0x4242,
        7,
        b"ping payload",
    );
    let reply = dp.guest_frame(&mut with_hdr(&req)).expect("echo reply");
    let frame = frame::parse(&reply).unwrap();
    let Network::Ipv4(ip) = frame.net else {
        panic!()
    };
    assert_eq!((ip.src, ip.dst), (GW, GUEST));
    let Transport::Icmp(icmp) = ip.transport else {
        panic!()
    };
    assert_eq!(icmp.icmp_type, frame::ICMP_ECHO_REPLY);
    assert_eq!(frame::internet_checksum(icmp.message), 0);
    assert_eq!(
        &icmp.message[4..],
        &req[14 + 20 + 4..],
        "id, seq and data are echoed"
    );

    let mut bad = req.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert!(dp.guest_frame(&mut with_hdr(&bad)).is_none());
    assert_eq!(dp.counters().drops(DropReason::L4BadChecksum), 1);
}

#[test]
fn oversized_frames_are_dropped() {
    let mut dp = datapath();
    let big = craft::icmp_echo(GUEST_MAC, GATEWAY_MAC, GUEST, GW, 1, 1, &[0u8; 1400]);
    assert!(dp.guest_frame(&mut with_hdr(&big)).is_none());
    assert_eq!(dp.counters().drops(DropReason::Oversized), 1);
}

/// Valid frames of every class the gateway answers or drops, as seeds for mutation.
fn seeds() -> Vec<Vec<u8>> {
    let other = Ipv4Addr::new(203, 0, 113, 9);
    vec![
        craft::arp_request(GUEST_MAC, GUEST, GW),
        craft::icmp_echo(GUEST_MAC, GATEWAY_MAC, GUEST, GW, 1, 2, b"abcdefgh"),
        craft::dhcp(
            GUEST_MAC,
            MessageType::Discover,
            3,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            GATEWAY_MAC,
        ),
        craft::dhcp(
            GUEST_MAC,
            MessageType::Request,
            3,
            Ipv4Addr::UNSPECIFIED,
            Some(GUEST),
            Some(GW),
            GATEWAY_MAC,
        ),
        craft::tcp_syn(GUEST_MAC, GATEWAY_MAC, (GUEST, 40000), (other, 443)),
        craft::udp(
            GUEST_MAC,
            GATEWAY_MAC,
            (GUEST, 5353),
            (GW, 53),
            b"\x12\x34\x01\x00\x00\x01",
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        mut buf in proptest::collection::vec(any::<u8>(), 0..1600),
        offloads in any::<bool>(),
    ) {
        let mut dp = datapath();
        if offloads {
            // Every offload acked: headers asking for checksum completion and TSO are taken.
            dp.set_offloads(crate::frame::virtio_hdr::Offloads {
                csum: true,
                host_tso4: true,
                guest_csum: true,
                guest_tso4: true,
            });
        }
        let answered = dp.guest_frame(&mut buf).is_some();
        let c = dp.counters();
        let answers: u64 = Service::ALL.iter().map(|s| c.answers(*s)).sum();
        // Every frame is either answered, handled silently (RELEASE) or dropped and counted.
        prop_assert!(answered || c.total_drops() == 1 || answers == 1);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        seed in 0usize..6,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut frame = seeds()[seed].clone();
        for (pos, byte) in edits {
            let i = pos % frame.len();
            frame[i] = byte;
        }
        frame.truncate(cut % (frame.len() + 1));
        let mut dp = datapath();
        let answer = dp.guest_frame(&mut with_hdr(&frame));
        if let Some(answer) = answer {
            // Whatever moat answers is itself a well-formed frame addressed to the guest.
            let parsed = frame::parse(&answer);
            prop_assert!(parsed.is_ok(), "answer does not parse: {:?}", parsed.err());
            let parsed = parsed.unwrap();
            prop_assert_eq!(parsed.eth.src, GATEWAY_MAC);
        }
    }
}

/// A UDP datagram for an allowed association is checked like every other L4 packet: one
/// with a bad checksum is dropped and counted before it reaches the flow table (where
/// its payload would be relayed as it is).
#[test]
fn udp_flow_datagram_with_a_bad_checksum_is_dropped() {
    let text = format!(
        "{POLICY}[proxy]\nsocks5 = \"127.0.0.1:1080\"\n\
         [[outbound]]\nprotocol = \"udp\"\nports = [443]\nto = [\"203.0.113.0/24\"]\n"
    );
    let policy = Policy::parse(&text, Path::new("dp-test.toml")).expect("valid test policy");
    let mut dp = Datapath::new(
        Arc::new(policy),
        Arc::default(),
        Arc::new(Counters::default()),
    );
    let dst = (Ipv4Addr::new(203, 0, 113, 9), 443);
    let good = craft::udp(GUEST_MAC, GATEWAY_MAC, (GUEST, 40000), dst, b"datagram");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert!(dp.guest_frame(&mut with_hdr(&bad)).is_none());
    assert_eq!(dp.counters().drops(DropReason::L4BadChecksum), 1);
    assert_eq!(dp.counters().total_drops(), 1);
    // The control: the same datagram with its checksum right gets past the checks (to the
    // flow table, which has no event loop here to open the association in).
    assert!(dp.guest_frame(&mut with_hdr(&good)).is_none());
    assert_eq!(dp.counters().drops(DropReason::L4BadChecksum), 1);
}
