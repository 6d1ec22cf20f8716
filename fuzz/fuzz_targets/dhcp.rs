#![no_main]
//! DHCP through the datapath: a fixed virtio-net header + Ethernet/IPv4/UDP 68->67 prefix,
//! the fuzz input is the DHCP payload.
//!
//! Oracle (the datapath proptest's, for DHCP): the message is answered, dropped and counted
//! once, or consumed silently (RELEASE, DECLINE); an answer is a well-formed frame from the
//! gateway's MAC and address, UDP 67 -> 68 with a valid checksum, a BOOTREPLY that carries
//! the request's transaction id and client hardware address, offering the policy's address
//! if anything.
use libfuzzer_sys::fuzz_target;
use moat::frame::{self, MacAddr, Network, Transport, GATEWAY_MAC};
use moat_sim::craft;
use moat::telemetry::Service;
use std::net::Ipv4Addr;
mod common;

thread_local! {
    static DP: std::cell::RefCell<moat::datapath::Datapath> = std::cell::RefCell::new(common::datapath());
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 1400 {
        return;
    }
    let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let frame = craft::udp(
        mac,
        MacAddr([0xff; 6]),
        (Ipv4Addr::UNSPECIFIED, 68),
        (Ipv4Addr::BROADCAST, 67),
        data,
    );
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&frame);
    DP.with(|dp| {
        let mut dp = dp.borrow_mut();
        let c = std::sync::Arc::clone(dp.counters());
        let drops = c.total_drops();
        let answers = c.answers(Service::Dhcp);
        let answer = dp.guest_frame(&mut buf);
        let dropped = c.total_drops() - drops;
        assert!(dropped <= 1, "{dropped} drops for one frame");
        let Some(answer) = answer else {
            return;
        };
        assert_eq!(dropped, 0, "answered and dropped");
        assert_eq!(c.answers(Service::Dhcp), answers + 1, "answer not counted");
        let f = frame::parse(&answer).unwrap_or_else(|e| panic!("answer does not parse: {e:?}"));
        assert_eq!(f.eth.src, GATEWAY_MAC);
        let Network::Ipv4(ip) = f.net else { panic!("not IPv4") };
        assert_eq!(ip.src, Ipv4Addr::new(10, 0, 0, 1), "not from the gateway");
        let Transport::Udp(udp) = ip.transport else { panic!("not UDP") };
        assert_eq!((udp.src_port, udp.dst_port), (67, 68));
        assert!(frame::udp_checksum_ok(ip.src, ip.dst, udp.datagram), "bad UDP checksum");
        let reply = udp.payload;
        assert!(reply.len() >= 240, "short BOOTP reply");
        assert_eq!(reply[0], 2, "not a BOOTREPLY");
        assert_eq!(reply[4..8], data[4..8], "another transaction id");
        assert_eq!(reply[28..34], data[28..34], "another client hardware address");
        let yiaddr = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
        assert!(
            yiaddr == Ipv4Addr::UNSPECIFIED || yiaddr == Ipv4Addr::new(10, 0, 0, 2),
            "offered {yiaddr}"
        );
    });
});
