use std::net::Ipv4Addr;
use std::path::Path;

use dhcproto::v4::MessageType;
use etherparse::{ArpOperation, PacketBuilder};

use super::*;
use crate::frame::parse;
use crate::policy::{Policy, Vm};
use moat_sim::craft;

const POLICY: &str = r#"
[vm]
name = "fw-test"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
"#;

fn setup() -> (Firewall, Vm) {
    let policy = Policy::parse(POLICY, Path::new("fw-test.toml")).expect("test policy is valid");
    (Firewall::new(&policy), policy.vm)
}

fn verdict_of(fw: &Firewall, bytes: &[u8]) -> Verdict {
    match parse(bytes) {
        Ok(frame) => fw.verdict(&frame),
        Err(reason) => Verdict::Drop(reason),
    }
}

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const OTHER_VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const OTHER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

#[test]
fn arp_for_gateway_is_answered_and_nothing_else() {
    let (fw, vm) = setup();
    let cases = [
        (
            craft::arp_request(vm.mac, GUEST, GW),
            Verdict::Answer(Service::Arp),
        ),
        (
            craft::arp_request(vm.mac, GUEST, OTHER_VM),
            Verdict::Drop(DropReason::ArpNotForGateway),
        ),
        (
            craft::arp_request(vm.mac, GUEST, GUEST),
            Verdict::Drop(DropReason::ArpUnsolicited),
        ),
        (
            craft::arp_request(vm.mac, OTHER_VM, GW),
            Verdict::Drop(DropReason::ArpSpoofed),
        ),
        (
            craft::arp_request(OTHER_MAC, GUEST, GW),
            Verdict::Drop(DropReason::SpoofedSrcMac),
        ),
        (
            craft::arp(
                ArpOperation::REPLY,
                GATEWAY_MAC,
                vm.mac,
                GUEST,
                GATEWAY_MAC,
                GW,
            ),
            Verdict::Drop(DropReason::ArpUnsolicited),
        ),
        (
            // Claiming to be the gateway.
            craft::arp(
                ArpOperation::REPLY,
                craft::BROADCAST_MAC,
                vm.mac,
                GW,
                craft::BROADCAST_MAC,
                GW,
            ),
            Verdict::Drop(DropReason::ArpSpoofed),
        ),
    ];
    for (i, (bytes, want)) in cases.iter().enumerate() {
        assert_eq!(verdict_of(&fw, bytes), *want, "case {i}");
    }
}

#[test]
fn ip_rules() {
    let (fw, vm) = setup();
    let g = GATEWAY_MAC;
    let cases = [
        (
            craft::icmp_echo(vm.mac, g, GUEST, GW, 1, 1, b"hi"),
            Verdict::Answer(Service::IcmpEcho),
        ),
        (
            craft::icmp_echo(vm.mac, g, GUEST, OTHER_VM, 1, 1, b"hi"),
            Verdict::Drop(DropReason::NotAllowed),
        ),
        (
            craft::icmp_echo(vm.mac, g, GUEST, Ipv4Addr::new(203, 0, 113, 1), 1, 1, b""),
            Verdict::Drop(DropReason::NotAllowed),
        ),
        (
            craft::icmp_echo(vm.mac, g, OTHER_VM, GW, 1, 1, b""),
            Verdict::Drop(DropReason::SpoofedSrcIp),
        ),
        (
            craft::icmp_echo(vm.mac, OTHER_MAC, GUEST, OTHER_VM, 1, 1, b""),
            Verdict::Drop(DropReason::DstMacNotGateway),
        ),
        (
            craft::tcp_syn(vm.mac, g, (GUEST, 40000), (GW, 22)),
            Verdict::Drop(DropReason::GatewayPortClosed),
        ),
        (
            craft::tcp_syn(vm.mac, g, (GUEST, 40000), (OTHER_VM, 22)),
            Verdict::Flow,
        ),
        (
            craft::udp(vm.mac, g, (GUEST, 5000), (GW, 9999), b"x"),
            Verdict::Drop(DropReason::GatewayPortClosed),
        ),
        (
            craft::udp(
                vm.mac,
                craft::BROADCAST_MAC,
                (GUEST, 5000),
                (Ipv4Addr::BROADCAST, 9999),
                b"x",
            ),
            Verdict::Drop(DropReason::Broadcast),
        ),
        (
            craft::udp(
                vm.mac,
                g,
                (GUEST, 5000),
                (Ipv4Addr::new(10, 0, 0, 255), 9999),
                b"x",
            ),
            Verdict::Drop(DropReason::Broadcast),
        ),
        (
            craft::udp(
                vm.mac,
                MacAddr([1, 0, 0x5e, 0, 0, 1]),
                (GUEST, 5000),
                (Ipv4Addr::new(224, 0, 0, 1), 9),
                b"x",
            ),
            Verdict::Drop(DropReason::Multicast),
        ),
        (
            craft::udp(
                vm.mac,
                g,
                (GUEST, 5000),
                (Ipv4Addr::new(224, 0, 0, 1), 9),
                b"x",
            ),
            Verdict::Drop(DropReason::Multicast),
        ),
    ];
    for (i, (bytes, want)) in cases.iter().enumerate() {
        assert_eq!(verdict_of(&fw, bytes), *want, "case {i}");
    }
}

#[test]
fn dhcp_is_answered_from_unspecified_or_own_address_only() {
    let (fw, vm) = setup();
    let discover = craft::dhcp(
        vm.mac,
        MessageType::Discover,
        7,
        Ipv4Addr::UNSPECIFIED,
        None,
        None,
        GATEWAY_MAC,
    );
    assert_eq!(verdict_of(&fw, &discover), Verdict::Answer(Service::Dhcp));
    let renew = craft::dhcp(
        vm.mac,
        MessageType::Request,
        7,
        GUEST,
        None,
        Some(GW),
        GATEWAY_MAC,
    );
    assert_eq!(verdict_of(&fw, &renew), Verdict::Answer(Service::Dhcp));
    let spoofed = craft::dhcp(
        vm.mac,
        MessageType::Request,
        7,
        OTHER_VM,
        None,
        Some(GW),
        GATEWAY_MAC,
    );
    assert_eq!(
        verdict_of(&fw, &spoofed),
        Verdict::Drop(DropReason::SpoofedSrcIp)
    );
    let other_mac = craft::dhcp(
        OTHER_MAC,
        MessageType::Discover,
        7,
        Ipv4Addr::UNSPECIFIED,
        None,
        None,
        GATEWAY_MAC,
    );
    assert_eq!(
        verdict_of(&fw, &other_mac),
        Verdict::Drop(DropReason::SpoofedSrcMac)
    );
}

#[test]
fn non_ipv4_ethertypes_are_dropped() {
    let (fw, vm) = setup();
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(vm.mac.0, GATEWAY_MAC.0)
        .ipv6(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::RouterSolicitation)
        .write(&mut ipv6, &[])
        .unwrap();
    assert_eq!(verdict_of(&fw, &ipv6), Verdict::Drop(DropReason::Ipv6));

    let mut vlan = Vec::new();
    PacketBuilder::ethernet2(vm.mac.0, GATEWAY_MAC.0)
        .single_vlan(etherparse::VlanId::try_new(10).unwrap())
        .ipv4(GUEST.octets(), GW.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut vlan, &[])
        .unwrap();
    assert_eq!(verdict_of(&fw, &vlan), Verdict::Drop(DropReason::Vlan));

    let mut other = craft::icmp_echo(vm.mac, GATEWAY_MAC, GUEST, GW, 1, 1, b"");
    other[12..14].copy_from_slice(&0x88ccu16.to_be_bytes()); // LLDP
    assert_eq!(
        verdict_of(&fw, &other),
        Verdict::Drop(DropReason::UnsupportedEthertype)
    );
}
