#![no_main]
//! Bytes from the host proxy: HTTP CONNECT reply, SOCKS5 method/connect replies,
//! reply addresses and UDP-associate datagrams.
use libfuzzer_sys::fuzz_target;
use moat::egress::{connect, socks5};

fuzz_target!(|data: &[u8]| {
    let _ = connect::parse_reply(data);
    let _ = socks5::parse_method(data);
    let _ = socks5::parse_connect_reply(data);
    let _ = socks5::reply_address(data);
    let _ = socks5::udp_payload(data);
});
