//! `[dns]`: validation and matching.

use super::*;

#[test]
fn dns_mode_and_upstream() {
    let dns = |body: &str| format!("{VM}[dns]\n{body}\n");
    fails(
        &dns("mode = \"dot\""),
        "dns.mode",
        (6, 8),
        "\"dot\" is not a DNS mode; use \"proxy\" or \"upstream\"",
    );
    fails(
        &dns("mode = \"upstream\""),
        "dns.upstream",
        (6, 8),
        "mode = \"upstream\" needs a resolver; add upstream = \"127.0.0.1:53\"",
    );
    fails(
        &dns("upstream = \"127.0.0.1:53\""),
        "dns.upstream",
        (6, 12),
        "is used only with mode = \"upstream\"",
    );
    fails(
        &dns("mode = \"upstream\"\nupstream = \"resolver\""),
        "dns.upstream",
        (7, 12),
        "\"resolver\" is not an IP address and port",
    );
    let p = parse(&dns("mode = \"upstream\"\nupstream = \"127.0.0.53:53\"")).unwrap();
    assert_eq!(
        (p.dns.mode, p.dns.upstream),
        (
            DnsMode::Upstream,
            Some(SocketAddr::from(([127, 0, 0, 53], 53)))
        )
    );
}

#[test]
fn dns_names_and_records() {
    let dns = |body: &str| format!("{VM}[dns]\n{body}\n");
    fails(
        &dns("allow = [\"ok.com\", \"bad name\"]"),
        "dns.allow",
        (6, 20),
        "\"bad name\" is not a DNS name",
    );
    fails(
        &dns("records = { \"api.internal\" = \"x\" }"),
        "dns.records.\"api.internal\"",
        (6, 30),
        "\"x\" is not an IPv4 address; static records are A records",
    );
    fails(
        &dns("records = { \"api.internal\" = \"fd00::1\" }"),
        "dns.records.\"api.internal\"",
        (6, 30),
        "is not an IPv4 address",
    );
    fails(
        &dns("records = { \"*.internal\" = \"10.0.0.1\" }"),
        "dns.records.\"*.internal\"",
        (6, 13),
        "is not a DNS name; static records need a full name such as \"api.internal\" (no wildcards)",
    );
    fails(
        &dns("records = { \"bad name\" = \"10.0.0.1\" }"),
        "dns.records.\"bad name\"",
        (6, 13),
        "is not a DNS name",
    );
    fails(
        &dns("[dns.records]\n\"db.internal\" = \"10.0.0.1\"\n\"DB.internal\" = \"10.0.0.2\""),
        "dns.records.\"DB.internal\"",
        (8, 1),
        "\"db.internal\" has a record already (names are case-insensitive)",
    );
}

#[test]
fn dns_allows_allowlisted_names_and_records() {
    let p = parse(&format!(
        "{VM}[dns]\nallow = [\"*.example.org\", \"Example.net\"]\nrecords = {{ \"Api.Internal.\" = \"10.0.0.1\" }}\n"
    ))
    .unwrap();
    assert_eq!(
        p.dns.records.get("api.internal"),
        Some(&Ipv4Addr::new(10, 0, 0, 1))
    );
    assert!(p.dns.allows("x.example.org") && p.dns.allows("EXAMPLE.NET."));
    assert!(p.dns.allows("API.internal") && p.dns.allows("api.internal."));
    assert!(!p.dns.allows("example.org") && !p.dns.allows("x.example.net"));
    assert!(!Dns::default().allows("example.org"), "no [dns]: nothing");
}
