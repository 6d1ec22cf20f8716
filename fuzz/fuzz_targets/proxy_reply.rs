#![no_main]
//! Bytes from the host proxy: HTTP CONNECT reply, SOCKS5 method/connect replies,
//! reply addresses and UDP-associate datagrams.
//!
//! Oracle: what a parser says it consumed lies inside the input (an accepted CONNECT
//! reply's header_len, a SOCKS5 reply's length), and a verdict does not change when more
//! bytes follow a complete reply (they belong to the stream); a UDP payload is a suffix of
//! the datagram.
use libfuzzer_sys::fuzz_target;
use moat::egress::{connect, socks5};

fuzz_target!(|data: &[u8]| {
    match connect::parse_reply(data) {
        connect::Reply::Accepted { header_len } => {
            assert!(
                header_len <= data.len(),
                "header_len {header_len} > {}",
                data.len()
            );
            assert!(header_len > 0);
            assert_eq!(
                connect::parse_reply(&data[..header_len]),
                connect::Reply::Accepted { header_len },
                "the header alone is not the same reply"
            );
        }
        connect::Reply::Refused(code) => assert!(!(200..300).contains(&code)),
        connect::Reply::Incomplete => assert!(data.len() < connect::MAX_REPLY),
        connect::Reply::Malformed => {}
    }
    for parse in [socks5::parse_method, socks5::parse_connect_reply] {
        if let socks5::Reply::Done(n) = parse(data) {
            assert!(
                n <= data.len(),
                "socks5 reply of {n} bytes in {}",
                data.len()
            );
            assert_eq!(parse(&data[..n]), socks5::Reply::Done(n));
        }
    }
    let _ = socks5::reply_address(data);
    if let Some(payload) = socks5::udp_payload(data) {
        assert!(data.ends_with(payload) && payload.len() + 4 <= data.len());
    }
});
