#![no_main]
//! Arbitrary host text, addresses and ports through `firewall::gate::admit`, under three
//! fixed policies (the example policy; any name on any port; reserved ranges opened by
//! CIDRs, some inside their range and some around it).
//!
//! Input: byte 0 picks the policy (bits 0-1), the protocol (bit 2) and the way the guest
//! named the destination (bits 3-4: host text from SNI / Host / explicit proxy, a bare
//! address, an address moat's DNS handed out for a name); bytes 1-2: the port; then the
//! address (4 bytes, address forms) and the text.
//!
//! Oracle (DESIGN invariant 3), independent of the gate's own code:
//! - an admitted address in a reserved range (DESIGN's list, written out here) is named by
//!   a CIDR of the admitting rule that lies inside that range; any admitted address is
//!   named by a CIDR of that rule (IP literals only through a CIDR);
//! - an admitted name is a plain lowercase DNS name that does not read as an address: its
//!   last label is not a number (WHATWG "ends in a number"), glibc's `inet_aton` does not
//!   take it, and it is neither `localhost` nor below it;
//! - host text admitted as an address is the address `inet_aton` reads in it, if it reads one;
//! - the admitting rule is for this protocol and port, and its proxy is the one returned.
use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use libfuzzer_sys::fuzz_target;
use moat::firewall::gate::{self, NameSource, Requested, Target};
use moat::policy::{Destination, Policy, Protocol, Via};
mod common;

extern "C" {
    // glibc: the reading of "an IPv4 address in text" that resolvers and most C programs use.
    fn inet_aton(cp: *const libc::c_char, inp: *mut libc::in_addr) -> libc::c_int;
}

/// What `inet_aton` reads in `text`, if anything.
fn aton(text: &str) -> Option<Ipv4Addr> {
    let c = CString::new(text).ok()?;
    let mut addr = libc::in_addr { s_addr: 0 };
    // SAFETY: `c` is a valid NUL-terminated string and `addr` a valid in_addr, both live
    // for the call; inet_aton writes only into `addr`.
    let ok = unsafe { inet_aton(c.as_ptr(), &mut addr) };
    (ok != 0).then(|| Ipv4Addr::from(u32::from_be(addr.s_addr)))
}

/// DESIGN invariant 3's reserved destinations, written out independently of `gate::RESERVED`.
fn reserved(ip: Ipv4Addr) -> Option<Ipv4Net> {
    [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "255.255.255.255/32",
    ]
    .iter()
    .map(|n| n.parse::<Ipv4Net>().expect("valid"))
    .find(|n| n.contains(&ip))
}

/// WHATWG URL host parsing's "ends in a number": the last label is all digits, or 0x hex.
fn ends_in_a_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

thread_local! {
    static POLICIES: [Policy; 3] = [
        common::policy(),
        Policy::parse(include_str!("../policies/any_name.toml"), Path::new("any_name.toml")).expect("parses"),
        Policy::parse(include_str!("../policies/cidrs.toml"), Path::new("cidrs.toml")).expect("parses"),
    ];
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (ctl, port) = (data[0], u16::from_be_bytes([data[1], data[2]]));
    let protocol = if ctl & 4 == 0 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let rest = &data[3..];
    let text_of = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let requested = match (ctl >> 3) & 3 {
        0 | 1 => Requested::Text {
            text: text_of(rest),
            source: [
                NameSource::Sni,
                NameSource::HttpHost,
                NameSource::ExplicitProxy,
            ][usize::from(ctl >> 5) % 3],
        },
        kind => {
            let Some(ip) = rest.get(..4) else { return };
            let ip = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
            let dns_name = (kind == 3).then(|| text_of(&rest[4..]));
            Requested::Address { ip, dns_name }
        }
    };
    POLICIES.with(|policies| {
        let policy = &policies[usize::from(ctl & 3) % 3];
        let Ok(admitted) = gate::admit(policy, protocol, requested.clone(), port) else {
            return;
        };
        let rule = &policy.outbound[admitted.rule()];
        assert!(
            rule.protocol == protocol && rule.allows_port(port),
            "rule {} does not cover {protocol:?}:{port}",
            admitted.rule()
        );
        assert_eq!((admitted.port(), admitted.protocol()), (port, protocol));
        assert_eq!(admitted.via(), rule.via);
        let proxy = match rule.via {
            Via::Http => policy.proxy.http,
            Via::Socks5 => policy.proxy.socks5,
        };
        assert_eq!(Some(admitted.proxy()), proxy);
        assert_eq!(admitted.requested(), &requested);
        let cidrs: Vec<Ipv4Net> = rule
            .to
            .iter()
            .flatten()
            .filter_map(|d| match d {
                Destination::Cidr(c) => Some(*c),
                Destination::Name(_) => None,
            })
            .collect();
        let asked_text = match &requested {
            Requested::Text { text, .. } => Some(text.as_str()),
            Requested::Address { dns_name, .. } => dns_name.as_deref(),
        };
        match admitted.target() {
            Target::Ip(ip) => {
                let named =
                    |c: &Ipv4Net| c.contains(ip) && reserved(*ip).is_none_or(|r| r.contains(c));
                assert!(
                    cidrs.iter().any(named),
                    "{requested} admitted as {ip} by rule {} ({:?}): no CIDR there names it{}",
                    admitted.rule(),
                    rule.to,
                    reserved(*ip)
                        .map(|r| format!(" inside {r}"))
                        .unwrap_or_default()
                );
                if let Some(text) = asked_text {
                    let text = text.strip_suffix('.').unwrap_or(text);
                    if let Some(read) = aton(text) {
                        assert_eq!(
                            read, *ip,
                            "{text:?} admitted as {ip}, inet_aton reads {read}"
                        );
                    }
                }
            }
            Target::Name(name) => {
                assert!(!name.is_empty());
                assert!(
                    name.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b"-_.".contains(&b)),
                    "admitted name {name:?} is not a plain lowercase DNS name"
                );
                assert!(
                    !ends_in_a_number(name),
                    "admitted name {name:?} ends in a number: an address"
                );
                assert_eq!(
                    aton(name),
                    None,
                    "admitted name {name:?} reads as an address"
                );
                assert!(
                    name != "localhost" && !name.ends_with(".localhost"),
                    "admitted name {name:?} is loopback"
                );
                assert!(
                    rule.allows_name(name),
                    "rule {} does not allow {name:?}",
                    admitted.rule()
                );
                let text = asked_text.expect("a name admitted for a bare address");
                let lower = text.to_ascii_lowercase();
                assert_eq!(
                    lower.strip_suffix('.').unwrap_or(&lower),
                    name,
                    "admitted a name other than the one asked"
                );
            }
        }
    });
});
