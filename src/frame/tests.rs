use std::net::Ipv4Addr;

use super::*;
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

/// The checksum state every parsed transport gives when asked.
#[test]
fn parsed_packets_carry_their_checksum_state() {
    fn state(bytes: &[u8], completed: bool) -> L4Checksum {
        let frame = parse_completed(bytes, completed).expect("parses");
        let Network::Ipv4(ip) = frame.net else {
            panic!("not ipv4")
        };
        match ip.transport {
            Transport::Udp(u) => u.checksum(),
            Transport::Tcp(t) => t.checksum(),
            Transport::Icmp(i) => i.checksum(),
        }
    }
    let udp = craft::udp(GUEST_MAC, GATEWAY_MAC, (GUEST, 1000), (GW, 53), b"question");
    let tcp = craft::tcp_syn(GUEST_MAC, GATEWAY_MAC, (GUEST, 40000), (GW, 80));
    for good in [&udp, &tcp, &echo()] {
        assert_eq!(state(good, false), L4Checksum::Verified);
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x5a;
        assert_eq!(state(&bad, false), L4Checksum::Bad);
        assert!(!L4Checksum::Bad.ok());
    }
    let mut unsummed = udp.clone();
    unsummed[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(state(&unsummed, false), L4Checksum::None);
    assert!(L4Checksum::None.ok());
    // What moat completed itself is not summed again; ICMP is never completed.
    assert_eq!(state(&tcp, true), L4Checksum::Completed);
    assert_eq!(state(&udp, true), L4Checksum::Completed);
    assert_eq!(state(&echo(), true), L4Checksum::Verified);
    // A completed sum covers the IP payload: a UDP length short of it is summed as usual.
    let mut short = craft::udp(GUEST_MAC, GATEWAY_MAC, (GUEST, 1000), (GW, 53), b"question");
    short[38..40].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(state(&short, true), L4Checksum::Bad);
}
