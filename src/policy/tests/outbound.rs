//! `[[outbound]]`: validation and matching.

use super::*;

#[test]
fn outbound_protocol_and_via() {
    fails(
        &rule("protocol = \"icmp\"\nports = [1]\n"),
        "outbound[0].protocol",
        (9, 12),
        "\"icmp\" is not a protocol; use \"tcp\" or \"udp\"",
    );
    fails(
        &rule("protocol = \"udp\"\nports = [53]\nvia = \"http\"\n"),
        "outbound[0].via",
        (11, 7),
        "udp cannot go through an HTTP CONNECT proxy; use via = \"socks5\"",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nvia = \"ssh\"\n"),
        "outbound[0].via",
        (11, 7),
        "\"ssh\" is not a proxy kind",
    );
}

#[test]
fn outbound_ports() {
    fails(
        &rule("protocol = \"tcp\"\nports = []\n"),
        "outbound[0].ports",
        (10, 9),
        "is empty, so the rule allows nothing",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80, 0]\n"),
        "outbound[0].ports",
        (10, 14),
        "0 is not a port; use 1..=65535",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [65536]\n"),
        "outbound[0].ports",
        (10, 10),
        "65536 is not a port",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [\"90-80\"]\n"),
        "outbound[0].ports",
        (10, 10),
        "range 90-80 runs backwards; write it as \"80-90\"",
    );
    for bad in ["80-", "a-b", "80", "0-10", "1-65536", "1-2-3"] {
        fails(
            &rule(&format!("protocol = \"tcp\"\nports = [{bad:?}]\n")),
            "outbound[0].ports",
            (10, 10),
            "is not a port range; write \"lo-hi\"",
        );
    }
    let p = parse(&rule(
        "protocol = \"tcp\"\nports = [\"1-65535\", \" 8000 - 8002 \"]\n",
    ))
    .unwrap();
    assert_eq!(
        p.outbound[0].ports,
        [
            PortRange { lo: 1, hi: 65535 },
            PortRange { lo: 8000, hi: 8002 }
        ]
    );
    // The second rule is numbered 1.
    let two =
        rule("protocol = \"tcp\"\nports = [80]\n[[outbound]]\nprotocol = \"tcp\"\nports = [0]\n");
    fails(&two, "outbound[1].ports", (13, 10), "0 is not a port");
}

#[test]
fn outbound_destinations() {
    let to = |list: &str| {
        rule(&format!(
            "protocol = \"tcp\"\nports = [80]\nto = [{list}]\n"
        ))
    };
    fails(
        &to("\"ok.example\", \"exa mple.com\""),
        "outbound[0].to",
        (11, 21),
        "\"exa mple.com\" is neither a DNS name",
    );
    for bad in ["*", "a.*.com", "-a.com", "a..com", "**.a.com", "1.2.3"] {
        fails(
            &to(&format!("{bad:?}")),
            "outbound[0].to",
            (11, 7),
            "is neither a DNS name (\"example.com\", \"*.example.com\") nor an IPv4 CIDR",
        );
    }
    fails(
        &to("\"10.0.0.0/33\""),
        "outbound[0].to",
        (11, 7),
        "\"10.0.0.0/33\" is not a valid CIDR",
    );
    fails(
        &to("\"2001:db8::/32\""),
        "outbound[0].to",
        (11, 7),
        "\"2001:db8::/32\": IPv6 is not supported",
    );
    fails(
        &to("\"2001:db8::1\""),
        "outbound[0].to",
        (11, 7),
        "IPv6 is not supported",
    );
    fails(
        &to("\"203.0.113.7\""),
        "outbound[0].to",
        (11, 7),
        "is a bare IP address; write it as a CIDR, like \"203.0.113.7/32\"",
    );
    fails(
        &to("\"203.0.113.7/24\""),
        "outbound[0].to",
        (11, 7),
        "has host bits set; write 203.0.113.0/24 for the network or 203.0.113.7/32 for one address",
    );
    fails(
        &to(""),
        "outbound[0].to",
        (11, 6),
        "is empty, so the rule allows nothing; remove `to` to allow any name",
    );
    let p = parse(&to("\"Example.COM.\", \"*.Example.org\", \"0.0.0.0/0\"")).unwrap();
    assert_eq!(
        p.outbound[0].to.as_deref().unwrap(),
        [
            Destination::Name(NamePattern::Exact("example.com".into())),
            Destination::Name(NamePattern::Wildcard("example.org".into())),
            Destination::Cidr("0.0.0.0/0".parse().unwrap()),
        ]
    );
}

#[test]
fn rules_need_their_proxy() {
    // A defaulted via is blamed on protocol.
    let no_http = format!("{VM}[[outbound]]\nprotocol = \"tcp\"\nports = [443]\n");
    fails(
        &no_http,
        "outbound[0].via",
        (6, 12),
        "goes through the HTTP proxy (the default for tcp) but [proxy] has no http address; add http = \"127.0.0.1:3128\"",
    );
    let no_socks = format!(
        "{VM}[proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nvia = \"socks5\"\n"
    );
    fails(
        &no_socks,
        "outbound[0].via",
        (10, 7),
        "goes through the SOCKS5 proxy but [proxy] has no socks5 address; add socks5 = \"127.0.0.1:1080\"",
    );
    let udp = format!("{VM}[[outbound]]\nprotocol = \"udp\"\nports = [443]\n");
    fails(
        &udp,
        "outbound[0].via",
        (6, 12),
        "(the default for udp) but [proxy] has no socks5 address",
    );
}

#[test]
fn name_patterns_match_as_documented() {
    let exact = NamePattern::Exact("example.com".into());
    let wild = NamePattern::Wildcard("example.com".into());
    assert!(exact.matches("example.com") && exact.matches("EXAMPLE.com."));
    assert!(!exact.matches("www.example.com") && !exact.matches("example.co"));
    assert!(wild.matches("a.example.com") && wild.matches("a.b.example.com"));
    assert!(wild.matches("A.Example.COM."));
    assert!(!wild.matches("example.com") && !wild.matches("badexample.com"));
    assert!(!wild.matches(".example.com") && !wild.matches(""));
    assert_eq!(wild.to_string(), "*.example.com");
}

#[test]
fn rules_match_ports_names_and_ips() {
    let p = parse(&rule(
        "protocol = \"tcp\"\nports = [443, \"8000-8002\"]\nto = [\"example.com\", \"*.example.org\", \"203.0.113.0/24\"]\n",
    ))
    .unwrap();
    let r = &p.outbound[0];
    assert!(r.allows_port(443) && r.allows_port(8000) && r.allows_port(8002));
    assert!(!r.allows_port(80) && !r.allows_port(8003));
    assert!(r.allows_name("example.com") && r.allows_name("a.b.example.org"));
    assert!(!r.allows_name("www.example.com") && !r.allows_name("example.org"));
    assert!(!r.allows_name("203.0.113.9"), "a CIDR is not a name");
    assert!(r.allows_ip(Ipv4Addr::new(203, 0, 113, 9)));
    assert!(!r.allows_ip(Ipv4Addr::new(198, 51, 100, 1)));

    let any = parse(&rule("protocol = \"tcp\"\nports = [443]\n")).unwrap();
    assert!(any.outbound[0].allows_name("anything.test"));
    assert!(
        !any.outbound[0].allows_ip(Ipv4Addr::new(203, 0, 113, 1)),
        "no IP literals without a CIDR"
    );
}
