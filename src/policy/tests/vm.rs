//! `[vm]`.

use super::*;
use crate::frame::{MacAddr, ParseMacError, GATEWAY_MAC};

#[test]
fn vm_name_must_be_a_label() {
    for bad in ["Sandbox", "sand_box", "", "a.b"] {
        fails(
            &vm_with("\"t\"", &format!("{bad:?}")),
            "vm.name",
            (2, 8),
            "not a valid VM name; use 1-63 characters of a-z, 0-9 and '-'",
        );
    }
    let long = "a".repeat(64);
    fails(
        &vm_with("\"t\"", &format!("{long:?}")),
        "vm.name",
        (2, 8),
        "not a valid VM name",
    );
    assert!(parse(&vm_with("\"t\"", &format!("{:?}", "a".repeat(63)))).is_ok());
    assert!(parse(&vm_with("\"t\"", "\"sandbox-17\"")).is_ok());
}

#[test]
fn mac_must_be_unicast_and_not_the_gateways() {
    for bad in [
        "52:54:00:12:34",
        "zz:54:00:12:34:56",
        "52:54:00:12:34:56:78",
        "525400123456",
        "+2:54:00:12:34:56",
        "52:54-00:12:34:56",
    ] {
        fails(
            &vm_with("52:54:00:12:34:56", bad),
            "vm.mac",
            (3, 7),
            "is not a MAC address; write six hex bytes such as 52:54:00:12:34:56",
        );
    }
    fails(
        &vm_with("52:54:00:12:34:56", "ff:ff:ff:ff:ff:ff"),
        "vm.mac",
        (3, 7),
        "is a multicast MAC",
    );
    fails(
        &vm_with("52:54:00:12:34:56", "00:00:00:00:00:00"),
        "vm.mac",
        (3, 7),
        "is the all-zero MAC; use a unicast address",
    );
    fails(
        &vm_with("52:54:00:12:34:56", &GATEWAY_MAC.to_string()),
        "vm.mac",
        (3, 7),
        "is moat's own gateway MAC; use a unicast address",
    );
    let p = parse(&vm_with("52:54:00:12:34:56", "52-54-00-AB-CD-EF")).unwrap();
    assert_eq!(p.vm.mac.to_string(), "52:54:00:ab:cd:ef");
}

#[test]
fn address_needs_a_prefix_with_room_for_the_gateway() {
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.2"),
        "vm.address",
        (4, 11),
        "\"10.0.0.2\" has no prefix; write it like 10.0.0.2/30",
    );
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.300/30"),
        "vm.address",
        (4, 11),
        "not an IPv4 address with a prefix",
    );
    fails(
        &vm_with("10.0.0.2/30", "fd00::2/64"),
        "vm.address",
        (4, 11),
        "not an IPv4 address with a prefix",
    );
    for prefix in [31, 32] {
        fails(
            &vm_with("10.0.0.2/30", &format!("10.0.0.2/{prefix}")),
            "vm.address",
            (4, 11),
            &format!("/{prefix} leaves no room for the guest and its gateway; use /30"),
        );
    }
}

#[test]
fn address_must_be_a_host_of_its_subnet() {
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.0/30"),
        "vm.address",
        (4, 11),
        "10.0.0.0 is the network address of 10.0.0.0/30; use a host address",
    );
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.255/24"),
        "vm.address",
        (4, 11),
        "10.0.0.255 is the broadcast address of 10.0.0.0/24",
    );
    fails(
        &vm_with("10.0.0.2/30", "127.0.0.2/30"),
        "vm.address",
        (4, 11),
        "is a loopback address",
    );
    fails(
        &vm_with("10.0.0.2/30", "224.0.0.2/30"),
        "vm.address",
        (4, 11),
        "is a multicast address",
    );
    fails(
        &vm_with("10.0.0.2/30", "198.19.0.2/30"),
        "vm.address",
        (4, 11),
        "overlaps 198.18.0.0/15, the pool DNS answers come from",
    );
    fails(
        &vm_with("10.0.0.2/30", "198.0.0.2/8"),
        "vm.address",
        (4, 11),
        "overlaps 198.18.0.0/15",
    );
}

#[test]
fn gateway_rules() {
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.2/24"),
        "vm.gateway",
        (4, 11),
        "required for a /24 subnet (only a /30 has an obvious gateway); add gateway = \"10.0.0.1\"",
    );
    let gw = |g: &str| format!("{}gateway = \"{g}\"\n", vm_with("/30", "/24"));
    let p = parse(&gw("10.0.0.254")).unwrap();
    assert_eq!(p.vm.gateway, Ipv4Addr::new(10, 0, 0, 254));
    fails(
        &gw("10.0.1.1"),
        "vm.gateway",
        (5, 11),
        "10.0.1.1 is outside the VM's subnet 10.0.0.0/24",
    );
    fails(
        &gw("10.0.0.2"),
        "vm.gateway",
        (5, 11),
        "is the guest's own address",
    );
    fails(
        &gw("10.0.0.0"),
        "vm.gateway",
        (5, 11),
        "is the network address of 10.0.0.0/24",
    );
    fails(
        &gw("10.0.0.255"),
        "vm.gateway",
        (5, 11),
        "is the broadcast address of 10.0.0.0/24",
    );
    fails(
        &gw("10.0.0.1/24"),
        "vm.gateway",
        (5, 11),
        "is not an IPv4 address; write it like 10.0.0.1 (no prefix)",
    );
}

#[test]
fn mtu_range() {
    for bad in ["67", "9001", "-1", "100000"] {
        fails(
            &format!("{VM}mtu = {bad}\n"),
            "vm.mtu",
            (5, 7),
            &format!("{bad} is outside 68..=9000; use 1500"),
        );
    }
    for ok in [68, 9000] {
        assert_eq!(parse(&format!("{VM}mtu = {ok}\n")).unwrap().vm.mtu, ok);
    }
}

#[test]
fn mac_text_round_trips() {
    let mac: MacAddr = "52:54:00:AB:cd:0F".parse().unwrap();
    assert_eq!(mac, MacAddr([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]));
    assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
    assert_eq!(GATEWAY_MAC.to_string(), "02:6d:6f:61:74:01");
    assert!(!GATEWAY_MAC.is_multicast());
    assert_eq!("52:54:00:ab:cd".parse::<MacAddr>(), Err(ParseMacError));
}
