//! Hostile guest: one test per attack class. Each asserts the verdict (no answer), the drop
//! counter, that nothing reached the proxy, and that moat still serves afterwards.

mod support;

use std::net::Ipv4Addr;

use etherparse::PacketBuilder;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use moat::frame::{internet_checksum, MacAddr};
use moat::telemetry::DropReason;
use moat_sim::craft;
use moat_sim::guest::SimGuest;
use support::proxy::{origin, ProxyMode, TestProxy};
use support::*;

/// A served VM with a proxy that records every CONNECT (nothing may reach it here).
struct Scene {
    served: Served,
    proxy: TestProxy,
    guest: SimGuest,
}

fn scene(limits: &str) -> Scene {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let text = format!(
        "[vm]\nname = \"hostile\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nhttp = \"{}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"ok.example\"]\n\
         [dns]\nallow = [\"ok.example\"]\n[limits]\n{limits}\n",
        proxy.addr
    );
    let served = Served::start(&text, true);
    let guest = served.guest();
    Scene {
        served,
        proxy,
        guest,
    }
}

impl Scene {
    fn send(&mut self, frame: &[u8]) {
        self.guest.send_frame(frame).unwrap();
    }

    /// No answer, the counters moved as expected, nothing reached the proxy, and a ping to
    /// the gateway still works.
    fn assert_contained(&mut self, what: &str, reasons: &[(DropReason, u64)]) {
        assert_silent(&mut self.guest, what);
        eventually(what, || {
            reasons
                .iter()
                .all(|(r, n)| self.served.counters.drops(*r) >= *n)
        });
        assert!(
            self.proxy.requests().is_empty(),
            "{what}: reached the proxy {:?}",
            self.proxy.requests()
        );
        self.guest
            .send_frame(&craft::icmp_echo(
                GUEST_MAC, GW_MAC, GUEST, GW, 99, 99, b"alive",
            ))
            .unwrap();
        recv_matching(&mut self.guest, "moat still answers", |_| true);
    }
}

fn ipv4_with(edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = craft::icmp_echo(GUEST_MAC, GW_MAC, GUEST, GW, 1, 1, b"0123456789abcdef");
    edit(&mut f);
    f[24..26].copy_from_slice(&[0, 0]);
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let c = internet_checksum(&f[14..14 + ihl]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn spoofed_mac_and_ip() {
    let mut s = scene("");
    s.send(&craft::icmp_echo(
        MacAddr([0x52, 0x54, 0, 6, 6, 6]),
        GW_MAC,
        GUEST,
        GW,
        1,
        1,
        b"",
    ));
    s.send(&craft::icmp_echo(
        GUEST_MAC,
        GW_MAC,
        Ipv4Addr::new(10, 0, 0, 9),
        GW,
        1,
        1,
        b"",
    ));
    s.send(&craft::tcp_syn(
        GUEST_MAC,
        GW_MAC,
        (Ipv4Addr::new(10, 0, 0, 9), 1),
        (Ipv4Addr::new(203, 0, 113, 1), 443),
    ));
    s.assert_contained(
        "spoofing",
        &[
            (DropReason::SpoofedSrcMac, 1),
            (DropReason::SpoofedSrcIp, 2),
        ],
    );
}

#[test]
fn gratuitous_arp_replies_and_arp_for_every_address_in_the_24() {
    let mut s = scene("");
    s.send(&craft::arp(
        etherparse::ArpOperation::REPLY,
        craft::BROADCAST_MAC,
        GUEST_MAC,
        GUEST,
        craft::BROADCAST_MAC,
        GUEST,
    ));
    s.send(&craft::arp_request(GUEST_MAC, GUEST, GUEST));
    for host in 0..=255u8 {
        let target = Ipv4Addr::new(10, 0, 0, host);
        if target != GW {
            s.send(&craft::arp_request(GUEST_MAC, GUEST, target));
        }
    }
    s.assert_contained(
        "arp sweep",
        &[
            (DropReason::ArpUnsolicited, 2),
            (DropReason::ArpNotForGateway, 254),
        ],
    );
}

#[test]
fn ipv6_of_every_kind() {
    let mut s = scene("");
    let src = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56,
    ];
    let kinds = [
        etherparse::Icmpv6Type::RouterSolicitation,
        etherparse::Icmpv6Type::Unknown {
            type_u8: 134,
            code_u8: 0,
            bytes5to8: [0; 4],
        }, // RA
        etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        }, // NS
        etherparse::Icmpv6Type::Unknown {
            type_u8: 136,
            code_u8: 0,
            bytes5to8: [0; 4],
        }, // NA
        etherparse::Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
    ];
    for kind in kinds {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC.0, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(
                src,
                [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                255,
            )
            .icmpv6(kind)
            .write(&mut f, &[0; 8])
            .unwrap();
        s.send(&f);
    }
    let mut syn = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC.0, GW_MAC.0)
        .ipv6(
            src,
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .tcp(1, 443, 1, 1000)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    s.send(&syn);
    s.assert_contained("ipv6", &[(DropReason::Ipv6, 6)]);
}

#[test]
fn vlan_and_qinq_tags() {
    let mut s = scene("");
    let mut single = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC.0, GW_MAC.0)
        .single_vlan(etherparse::VlanId::try_new(7).unwrap())
        .ipv4(GUEST.octets(), GW.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut single, &[])
        .unwrap();
    let mut double = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC.0, GW_MAC.0)
        .double_vlan(
            etherparse::VlanId::try_new(7).unwrap(),
            etherparse::VlanId::try_new(8).unwrap(),
        )
        .ipv4(GUEST.octets(), GW.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut double, &[])
        .unwrap();
    s.send(&single);
    s.send(&double);
    s.assert_contained("vlan", &[(DropReason::Vlan, 2)]);
}

#[test]
fn ip_fragments_options_and_ttl() {
    let mut s = scene("");
    let frags = [
        ipv4_with(|f| f[20] |= 0x20), // more fragments
        ipv4_with(|f| f[21] = 1),     // offset 8: overlapping/tiny tail
        ipv4_with(|f| {
            f[20] |= 0x20;
            f.truncate(14 + 20 + 4);
            f[16..18].copy_from_slice(&24u16.to_be_bytes())
        }), // first fragment without a full L4 header
    ];
    for f in &frags {
        s.send(f);
    }
    for _ in 0..500 {
        s.send(&frags[0]); // a fragment flood
    }
    let mut opts = craft::icmp_echo(GUEST_MAC, GW_MAC, GUEST, GW, 1, 1, b"x");
    opts.splice(34..34, [1u8, 1, 1, 0]);
    opts[14] = 0x46;
    let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    let opts = ipv4_with(|f| *f = opts.clone());
    s.send(&opts);
    s.send(&ipv4_with(|f| f[22] = 0));
    s.assert_contained(
        "fragments",
        &[
            (DropReason::Ipv4Fragment, 503),
            (DropReason::Ipv4Options, 1),
            (DropReason::TtlExpired, 1),
        ],
    );
    // TTL 1 to the gateway is fine (the gateway is the destination).
    s.send(&ipv4_with(|f| f[22] = 1));
    recv_matching(&mut s.guest, "echo with ttl 1", |_| true);
}

#[test]
fn broadcast_and_multicast() {
    let mut s = scene("");
    s.send(&craft::udp(
        GUEST_MAC,
        craft::BROADCAST_MAC,
        (GUEST, 5000),
        (Ipv4Addr::BROADCAST, 5000),
        b"x",
    ));
    s.send(&craft::udp(
        GUEST_MAC,
        GW_MAC,
        (GUEST, 5000),
        (Ipv4Addr::new(10, 0, 0, 255), 5000),
        b"x",
    ));
    s.send(&craft::udp(
        GUEST_MAC,
        MacAddr([1, 0, 0x5e, 0, 0, 0xfb]),
        (GUEST, 5353),
        (Ipv4Addr::new(224, 0, 0, 251), 5353),
        b"x",
    ));
    s.send(&craft::udp(
        GUEST_MAC,
        GW_MAC,
        (GUEST, 5353),
        (Ipv4Addr::new(224, 0, 0, 251), 5353),
        b"x",
    ));
    s.assert_contained(
        "broadcast",
        &[(DropReason::Broadcast, 2), (DropReason::Multicast, 2)],
    );
}

#[test]
fn tcp_without_handshake_syn_fin_and_a_syn_flood_past_max_flows() {
    let mut s = scene("max_flows = 16");
    let ok = {
        let mut m = Message::query();
        m.metadata.id = 5;
        m.add_query(Query::query(
            Name::from_ascii("ok.example.").unwrap(),
            RecordType::A,
        ));
        s.send(&craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 5300),
            (GW, 53),
            &m.to_vec().unwrap(),
        ));
        let reply = recv_matching(&mut s.guest, "dns answer", |_| true);
        let payload = &reply[14 + 20 + 8..];
        moat::dns::a_records(payload)[0]
    };
    // A bare ACK and a data segment for no connection; a SYN+FIN.
    let mut ack = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC.0, GW_MAC.0)
        .ipv4(GUEST.octets(), ok.octets(), 64)
        .tcp(40000, 443, 5, 1000)
        .ack(1)
        .write(&mut ack, b"data")
        .unwrap();
    let mut synfin = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC.0, GW_MAC.0)
        .ipv4(GUEST.octets(), ok.octets(), 64)
        .tcp(40001, 443, 5, 1000)
        .syn()
        .fin()
        .write(&mut synfin, &[])
        .unwrap();
    s.send(&ack);
    s.send(&synfin);
    // A SYN flood to an allowed destination: 16 flows open, the rest are refused.
    for port in 0..200u16 {
        s.send(&craft::tcp_syn(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 30000 + port),
            (ok, 443),
        ));
    }
    eventually("flood refused past max_flows", || {
        s.served.counters.drops(DropReason::FlowLimit) >= 184
    });
    assert!(s.served.counters.drops(DropReason::TcpNoFlow) >= 1);
    assert!(s.served.counters.drops(DropReason::TcpBadFlags) >= 1);
    assert!(
        s.proxy.requests().len() <= 16,
        "at most max_flows reached the proxy"
    );
}

#[test]
fn udp_flood_and_dns_tunnelling_shapes() {
    let mut s = scene("");
    for i in 0..2000u16 {
        s.send(&craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 10000 + (i % 100)),
            (Ipv4Addr::new(203, 0, 113, 7), 9999),
            b"flood",
        ));
    }
    let q = |name: &str, t: RecordType| {
        let mut m = Message::query();
        m.metadata.id = 1;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    };
    let label = "a".repeat(63);
    let long = format!("{label}.{label}.{label}.tunnel.test.");
    for (name, t) in [
        (long.as_str(), RecordType::TXT),
        ("x.tunnel.test.", RecordType::NULL),
        ("x.tunnel.test.", RecordType::ANY),
    ] {
        s.send(&craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 5000),
            (GW, 53),
            &q(name, t),
        ));
    }
    let mut many = Message::query();
    for i in 0..20 {
        many.add_query(Query::query(
            Name::from_ascii(format!("q{i}.tunnel.test.")).unwrap(),
            RecordType::A,
        ));
    }
    s.send(&craft::udp(
        GUEST_MAC,
        GW_MAC,
        (GUEST, 5000),
        (GW, 53),
        &many.to_vec().unwrap(),
    ));
    // DNS answers (NXDOMAIN, FORMERR) come back; drain them, then check nothing else did.
    let mut replies = 0;
    while s.guest.recv_frame(QUIET).unwrap().is_some() {
        replies += 1;
    }
    assert_eq!(
        replies, 4,
        "one NXDOMAIN/FORMERR per query, nothing for the flood"
    );
    assert_eq!(
        s.served.counters.dns(moat::telemetry::DnsOutcome::NxDomain),
        3
    );
    assert_eq!(
        s.served.counters.dns(moat::telemetry::DnsOutcome::FormErr),
        1
    );
    s.assert_contained("udp flood", &[(DropReason::NotAllowed, 2000)]);
}

#[test]
fn dhcp_from_other_macs_and_starvation() {
    let mut s = scene("");
    for i in 0..200u8 {
        let mac = MacAddr([0x52, 0x54, 0, 0xee, 0, i]);
        s.send(&craft::dhcp(
            mac,
            dhcproto::v4::MessageType::Discover,
            u32::from(i),
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            GW_MAC,
        ));
    }
    s.assert_contained("dhcp starvation", &[(DropReason::SpoofedSrcMac, 200)]);
    // The VM's own MAC still gets its (one) address.
    s.send(&craft::dhcp(
        GUEST_MAC,
        dhcproto::v4::MessageType::Discover,
        7,
        Ipv4Addr::UNSPECIFIED,
        None,
        None,
        GW_MAC,
    ));
    recv_matching(&mut s.guest, "offer", |_| true);
}

#[test]
fn short_and_oversized_frames_and_bogus_virtio_headers() {
    let mut s = scene("");
    s.send(&[0u8; 6]);
    s.send(&[0u8; 13]);
    s.send(&craft::icmp_echo(
        GUEST_MAC,
        GW_MAC,
        GUEST,
        GW,
        1,
        1,
        &[0u8; 3000],
    ));
    let frame = craft::icmp_echo(GUEST_MAC, GW_MAC, GUEST, GW, 1, 1, b"x");
    for hdr in [
        [0u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // gso TCPv4
        [0, 0x80, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0], // gso ECN + absurd hdr_len/gso_size
        [1, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0], // NEEDS_CSUM with offsets past the frame
    ] {
        s.guest.send_frame_with_hdr(&hdr, &frame).unwrap();
    }
    s.assert_contained(
        "bad sizes and headers",
        &[
            (DropReason::Truncated, 2),
            (DropReason::Oversized, 1),
            (DropReason::BadVirtioHeader, 3),
        ],
    );
}
