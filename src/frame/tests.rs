use std::net::Ipv4Addr;

use super::*;
use crate::policy::GATEWAY_MAC;
use moat_sim::craft;

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn echo() -> Vec<u8> {
    craft::icmp_echo(GUEST_MAC, GATEWAY_MAC, GUEST, GW, 7, 9, b"payload")
}

/// Recompute the IPv4 header checksum after a test edited the header.
fn fix_ip_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let c = internet_checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn parses_a_valid_echo_request() {
    let bytes = echo();
    let frame = parse(&bytes).expect("valid frame");
    assert_eq!(frame.eth.src, GUEST_MAC);
    let Network::Ipv4(ip) = frame.net else {
        panic!("not ipv4")
    };
    assert_eq!((ip.src, ip.dst, ip.ttl), (GUEST, GW, 64));
    let Transport::Icmp(icmp) = ip.transport else {
        panic!("not icmp")
    };
    assert_eq!(icmp.icmp_type, ICMP_ECHO_REQUEST);
    assert_eq!(
        internet_checksum(icmp.message),
        0,
        "checksum over a valid message folds to zero"
    );
}

#[test]
fn ethernet_padding_is_accepted() {
    let mut bytes = craft::arp_request(GUEST_MAC, GUEST, GW);
    bytes.resize(60, 0);
    assert!(matches!(
        parse(&bytes),
        Ok(Frame {
            net: Network::Arp(_),
            ..
        })
    ));
    let mut bytes = echo();
    bytes.extend_from_slice(&[0; 10]);
    assert!(parse(&bytes).is_ok());
}

#[test]
fn malformed_ipv4_is_rejected_with_the_right_reason() {
    let base = echo();
    let mut cases: Vec<(Vec<u8>, DropReason)> = Vec::new();

    cases.push((base[..10].to_vec(), DropReason::Truncated));
    cases.push((base[..20].to_vec(), DropReason::Ipv4Malformed));

    let mut bad_sum = base.clone();
    bad_sum[24] ^= 0xff;
    cases.push((bad_sum, DropReason::Ipv4BadChecksum));

    let mut long_total = base.clone();
    long_total[16..18].copy_from_slice(&1000u16.to_be_bytes());
    fix_ip_checksum(&mut long_total);
    cases.push((long_total, DropReason::Ipv4Malformed));

    let mut more_frags = base.clone();
    more_frags[20] |= 0x20;
    fix_ip_checksum(&mut more_frags);
    cases.push((more_frags, DropReason::Ipv4Fragment));

    let mut offset = base.clone();
    offset[21] = 8;
    fix_ip_checksum(&mut offset);
    cases.push((offset, DropReason::Ipv4Fragment));

    let mut ttl0 = base.clone();
    ttl0[22] = 0;
    fix_ip_checksum(&mut ttl0);
    cases.push((ttl0, DropReason::TtlExpired));

    let mut gre = base.clone();
    gre[23] = 47;
    fix_ip_checksum(&mut gre);
    cases.push((gre, DropReason::UnsupportedProtocol));

    // IHL 6 with a NOP option word: total length grows by 4.
    let mut opts = base[..34].to_vec();
    opts.extend_from_slice(&[1, 1, 1, 0]);
    opts.extend_from_slice(&base[34..]);
    opts[14] = 0x46;
    let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut opts);
    cases.push((opts, DropReason::Ipv4Options));

    let mut short_udp = craft::udp(GUEST_MAC, GATEWAY_MAC, (GUEST, 1), (GW, 2), b"abcdef");
    short_udp[38..40].copy_from_slice(&4u16.to_be_bytes()); // UDP length below its header
    cases.push((short_udp, DropReason::L4Malformed));

    for (i, (bytes, want)) in cases.iter().enumerate() {
        assert_eq!(parse(bytes).err(), Some(*want), "case {i}");
    }
}

#[test]
fn udp_checksum_checks() {
    let bytes = craft::udp(GUEST_MAC, GATEWAY_MAC, (GUEST, 1000), (GW, 53), b"question");
    let frame = parse(&bytes).unwrap();
    let Network::Ipv4(ip) = &frame.net else {
        panic!()
    };
    let Transport::Udp(udp) = &ip.transport else {
        panic!()
    };
    assert!(udp_checksum_ok(ip.src, ip.dst, udp.datagram));
    let mut bad = udp.datagram.to_vec();
    bad[9] ^= 1;
    assert!(!udp_checksum_ok(ip.src, ip.dst, &bad));
    bad[6..8].copy_from_slice(&[0, 0]);
    assert!(
        udp_checksum_ok(ip.src, ip.dst, &bad),
        "zero means no checksum"
    );
}

#[test]
fn virtio_header_offloads_only_as_negotiated() {
    use crate::frame::virtio_hdr::{Offloads, TxOffload};
    let none = Offloads::default();
    let all = Offloads {
        csum: true,
        host_tso4: true,
        guest_csum: true,
        guest_tso4: true,
    };
    let check = |hdr: &[u8; 12], o| VirtioNetHdr::parse(hdr).unwrap().check_tx(o);
    let mut hdr = [0u8; 12];
    assert_eq!(check(&hdr, none), Ok(TxOffload::None));
    hdr[0] = 1; // NEEDS_CSUM
    hdr[6] = 34; // csum_start
    hdr[8] = 16; // csum_offset
    assert_eq!(check(&hdr, none), Err(DropReason::BadVirtioHeader));
    assert_eq!(
        check(&hdr, all),
        Ok(TxOffload::Csum {
            start: 34,
            offset: 16
        })
    );
    hdr[1] = 1; // GSO_TCPV4
    assert_eq!(
        check(&hdr, all),
        Err(DropReason::BadVirtioHeader),
        "gso_size 0"
    );
    hdr[4] = 0xb4;
    hdr[5] = 0x05; // gso_size 1460
    assert_eq!(
        check(&hdr, all),
        Ok(TxOffload::Tso {
            start: 34,
            offset: 16,
            mss: 1460
        })
    );
    let csum_only = Offloads { csum: true, ..none };
    assert_eq!(check(&hdr, csum_only), Err(DropReason::BadVirtioHeader));
    hdr[1] = 0x81; // TCPV4 | ECN: not offered
    assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
    hdr[1] = 3; // UDP
    assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
    hdr[1] = 1;
    hdr[0] = 0; // GSO without NEEDS_CSUM
    assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
    hdr[0] = 2; // DATA_VALID is for RX only
    assert_eq!(check(&hdr, all), Err(DropReason::BadVirtioHeader));
    assert_eq!(VirtioNetHdr::parse(&hdr[..5]), Err(DropReason::Truncated));
}
