#![no_main]
//! Request heads on the explicit-proxy port -> `egress::explicit::read_head`.
//!
//! Oracle:
//! - a request's head_len lies inside the input, and the head alone reads as the same
//!   request (the bytes after it are the guest's stream, not part of the decision);
//! - the host is non-empty (the gate gets something to judge) and the port is not 0;
//! - CONNECT: the guest gets a 200 and nothing is rewritten for the origin;
//! - absolute form: the origin gets one origin-form head that ends with CRLFCRLF (and has
//!   no other blank line: no second request smuggled in), says `Connection: close`, has
//!   exactly one Host header and it names the host the gate judges (with the port, if the
//!   URL had one), and no Proxy-Authorization / Proxy-Connection header;
//! - NeedMore only for a short input.
use libfuzzer_sys::fuzz_target;
use moat::egress::explicit::{read_head, Head, MAX_HEAD};

fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn header_named<'a>(line: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let colon = line.iter().position(|b| *b == b':')?;
    line[..colon]
        .eq_ignore_ascii_case(name.as_bytes())
        .then(|| line[colon + 1..].trim_ascii())
}

fuzz_target!(|data: &[u8]| {
    match read_head(data) {
        Head::NeedMore => assert!(data.len() < MAX_HEAD, "NeedMore past MAX_HEAD"),
        Head::Malformed(why) => assert!(!why.is_empty()),
        Head::Request { host, port, front } => {
            assert!(
                front.head_len > 0 && front.head_len <= data.len(),
                "head_len {} of {}",
                front.head_len,
                data.len()
            );
            assert!(
                !host.is_empty(),
                "a request with an empty host: {:?}",
                String::from_utf8_lossy(&data[..front.head_len])
            );
            assert_ne!(port, 0);
            assert_eq!(
                read_head(&data[..front.head_len]),
                Head::Request {
                    host: host.clone(),
                    port,
                    front: front.clone()
                },
                "the head alone is another request"
            );
            if front.to_origin.is_empty() {
                assert!(
                    front.to_guest.starts_with(b"HTTP/1.1 200 "),
                    "CONNECT without a 200 for the guest"
                );
                return;
            }
            assert!(front.to_guest.is_empty());
            let head = &front.to_origin;
            assert!(
                head.ends_with(b"\r\n\r\n"),
                "rewritten head does not end with CRLFCRLF: {:?}",
                String::from_utf8_lossy(head)
            );
            let first_blank = head.windows(4).position(|w| w == b"\r\n\r\n");
            assert_eq!(
                first_blank,
                Some(head.len() - 4),
                "a blank line inside the rewritten head: {:?}",
                String::from_utf8_lossy(head)
            );
            assert!(
                !head[..head.len() - 2].windows(2).any(|w| w == b"\n\n"),
                "bare blank line in the rewritten head"
            );
            let body: Vec<&[u8]> = lines(&head[..head.len() - 4]).collect();
            assert!(
                body.iter()
                    .skip(1)
                    .any(|l| header_named(l, "connection") == Some(b"close")),
                "no Connection: close"
            );
            assert!(
                body.iter()
                    .skip(1)
                    .all(|l| header_named(l, "proxy-authorization").is_none()
                        && header_named(l, "proxy-connection").is_none()),
                "proxy header passed to the origin"
            );
            let hosts: Vec<&[u8]> = body
                .iter()
                .skip(1)
                .filter_map(|l| header_named(l, "host"))
                .collect();
            assert_eq!(
                hosts.len(),
                1,
                "{} Host headers for the origin",
                hosts.len()
            );
            let with_port = format!("{host}:{port}");
            assert!(
                hosts[0] == host.as_bytes() || hosts[0] == with_port.as_bytes(),
                "origin's Host {:?} is not the admitted host {host:?}",
                String::from_utf8_lossy(hosts[0])
            );
            assert!(
                !body[0].contains(&b'\r') && body[0].ends_with(b" HTTP/1.1")
                    || body[0].ends_with(b" HTTP/1.0")
            );
        }
    }
});
