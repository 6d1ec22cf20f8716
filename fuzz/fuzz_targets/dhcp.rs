#![no_main]
//! DHCP through the datapath: a fixed virtio-net header + Ethernet/IPv4/UDP 68->67 prefix,
//! the fuzz input is the DHCP payload.
use libfuzzer_sys::fuzz_target;
use moat::frame::craft;
use moat::policy::{MacAddr, GATEWAY_MAC};
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
    let _ = GATEWAY_MAC;
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
        let _ = dp.borrow_mut().guest_frame(&mut buf);
    });
});
