use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use super::*;

const VM: &str = "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n";
const PROXY: &str = "[proxy]\nhttp = \"127.0.0.1:3128\"\nsocks5 = \"127.0.0.1:1080\"\n";

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::parse(text, Path::new("p.toml"))
}

/// Assert `text` fails on `key` at `line:col` with `reason` in the message; return the error.
#[track_caller]
fn fails(text: &str, key: &str, (line, col): (usize, usize), reason: &str) -> PolicyError {
    let err = parse(text).expect_err("policy should be invalid");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("p.toml:{line}:{col}: {key}: ")),
        "want p.toml:{line}:{col}: {key}: ...\n got {msg}"
    );
    assert!(msg.contains(reason), "reason {reason:?}: {msg}");
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    assert_eq!(err.key(), Some(key));
    err
}

/// `VM` with `from` replaced by `to`.
fn vm_with(from: &str, to: &str) -> String {
    VM.replace(from, to)
}

fn rule(body: &str) -> String {
    format!("{VM}{PROXY}[[outbound]]\n{body}")
}

#[test]
fn example_policies_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Policy::load(&root.join("policy/example.toml")).expect("example.toml is valid");
    assert_eq!(p.vm.name, "sandbox-17");
    assert_eq!(p.vm.mac, "52:54:00:12:34:56".parse().unwrap());
    assert_eq!(
        (p.vm.address, p.vm.prefix_len, p.vm.gateway),
        (Ipv4Addr::new(10, 0, 0, 2), 30, Ipv4Addr::new(10, 0, 0, 1))
    );
    assert_eq!(p.proxy.http, Some("127.0.0.1:3128".parse().unwrap()));
    assert_eq!(p.proxy.socks5, Some("127.0.0.1:1080".parse().unwrap()));
    assert_eq!(p.proxy.explicit_port, Some(3128));
    assert_eq!(p.outbound.len(), 2);
    let web = &p.outbound[0];
    assert_eq!((web.protocol, web.via), (Protocol::Tcp, Via::Http));
    assert!(web.allows_port(80) && web.allows_port(443));
    assert!(web.allows_name("example.com") && web.allows_name("www.example.com"));
    assert!(web.allows_ip(Ipv4Addr::new(203, 0, 113, 10)));
    assert_eq!(
        (p.outbound[1].protocol, p.outbound[1].via),
        (Protocol::Udp, Via::Socks5)
    );
    assert!(p.dns.allows("example.com") && p.dns.allows("api.internal"));
    assert_eq!(p.forward.len(), 1);
    assert_eq!(
        (p.forward[0].listen, p.forward[0].guest_port),
        ("127.0.0.1:8080".parse().unwrap(), 3000)
    );
    assert_eq!(p.limits.max_flows, 4096);

    let d = Policy::load(&root.join("policy/deny-all.toml")).expect("deny-all.toml is valid");
    assert_eq!((d.vm.mac, d.vm.address), (p.vm.mac, p.vm.address));
    assert!(d.outbound.is_empty() && d.forward.is_empty());
    assert!(d.dns.allow.is_empty() && d.dns.records.is_empty());
    assert!(d.proxy.http.is_none() && d.proxy.socks5.is_none());
    assert!(!d.dns.allows("example.com"));
}

#[test]
fn defaults_fill_optional_keys() {
    let p = parse(VM).unwrap();
    assert_eq!(
        (p.vm.gateway, p.vm.prefix_len, p.vm.mtu),
        (Ipv4Addr::new(10, 0, 0, 1), 30, 1500)
    );
    assert_eq!(p.vm.netmask(), Ipv4Addr::new(255, 255, 255, 252));
    assert_eq!(p.vm.broadcast(), Ipv4Addr::new(10, 0, 0, 3));
    assert_eq!(p.vm.subnet().to_string(), "10.0.0.0/30");
    assert_eq!(p.dns.mode, DnsMode::Proxy);
    assert_eq!(
        (
            p.limits.max_flows,
            p.limits.egress_bps,
            p.limits.ingress_bps
        ),
        (4096, 0, 0)
    );
    // The other host of a /30 is the gateway, whichever the guest has.
    let p = parse(&vm_with("10.0.0.2/30", "10.0.0.1/30")).unwrap();
    assert_eq!(p.vm.gateway, Ipv4Addr::new(10, 0, 0, 2));
    // via: http for tcp, socks5 for udp.
    let p = parse(&format!(
        "{}[[outbound]]\nprotocol = \"udp\"\nports = [53]\n",
        rule("protocol = \"tcp\"\nports = [443]\n")
    ))
    .unwrap();
    assert_eq!(
        (p.outbound[0].via, p.outbound[1].via),
        (Via::Http, Via::Socks5)
    );
    // forward.from: loopback only.
    let p = parse(&format!(
        "{VM}[[forward]]\nlisten = \"127.0.0.1:8080\"\nguest_port = 80\n"
    ))
    .unwrap();
    let from: Vec<String> = p.forward[0].from.iter().map(|n| n.to_string()).collect();
    assert_eq!(from, ["127.0.0.0/8", "::1/128"]);
}

#[test]
fn error_line_is_file_line_col_key_reason() {
    let err = parse(&vm_with("52:54:00:12:34:56", "01:00:5e:00:00:01")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "p.toml:3:7: vm.mac: \"01:00:5e:00:00:01\" is a multicast MAC; use a unicast address such as 52:54:00:12:34:56"
    );
    let loc = err.location().unwrap();
    assert_eq!(
        (loc.file, loc.line, loc.col, loc.key),
        (Path::new("p.toml"), 3, 7, "vm.mac")
    );
    assert!(matches!(err, PolicyError::Invalid { .. }));
}

#[test]
fn columns_count_characters_not_bytes() {
    fails(
        &format!("# café ü\n{}", vm_with("\"t\"", "\"t\" # ü\nmtu = 1")),
        "vm.mtu",
        (4, 7),
        "outside 68..=9000",
    );
    fails(
        &format!("{VM}[dns]\nallow = [\"ü.example\", \"ok\"]\n"),
        "dns.allow",
        (6, 10),
        "not a DNS name",
    );
}

#[test]
fn unreadable_file_is_an_io_error() {
    let err = Policy::load(Path::new("/nonexistent/moat.toml")).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }));
    assert_eq!(err.key(), None);
    let msg = err.to_string();
    assert!(
        msg.starts_with("/nonexistent/moat.toml: cannot read the policy: "),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1);
}

#[test]
fn syntax_errors() {
    let err = fails("[vm\nname = 1\n", "vm", (1, 4), "fix the TOML syntax");
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err:?}");
    fails(
        &format!("{VM}mtu = 1500 x\n"),
        "vm.mtu",
        (5, 7),
        "string values must be quoted",
    );
    fails(
        &format!("{VM}name = \"u\"\n"),
        "vm.name",
        (5, 1),
        "duplicate key; a key may appear once in a table, keep one",
    );
    fails(
        &format!("{VM}{PROXY}[[outbound]]\nports = [80\n"),
        "outbound[0].ports",
        (9, 12),
        "unclosed array, expected `]`; fix the TOML syntax",
    );
}

#[test]
fn unknown_keys_anywhere() {
    let err = fails(
        &format!("{VM}nmae = \"x\"\n"),
        "vm.nmae",
        (5, 1),
        "unknown key `nmae`; did you mean `name`?",
    );
    assert!(matches!(err, PolicyError::UnknownKey { .. }), "{err:?}");
    fails(
        &format!("{VM}[vpn]\nx = 1\n"),
        "vpn",
        (5, 2),
        "unknown key `vpn`; remove it (allowed here: `vm`, `proxy`, `outbound`, `dns`, `forward`, `limits`)",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nvai = \"http\"\n"),
        "outbound[0].vai",
        (11, 1),
        "did you mean `via`?",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto_ = []\n"),
        "outbound[1].to_",
        (14, 1),
        "did you mean `to`?",
    );
    fails(
        "vm = { name = \"t\", mac = \"52:54:00:12:34:56\", adress = \"10.0.0.2/30\" }\n",
        "vm.adress",
        (1, 47),
        "did you mean `address`?",
    );
    fails(
        &format!("{VM}[dns]\nalow = []\n"),
        "dns.alow",
        (6, 1),
        "did you mean `allow`?",
    );
    fails(
        &format!("{VM}[[forward]]\nlisten = \"127.0.0.1:1\"\nguest_port = 1\nfrom_cidr = []\n"),
        "forward[0].from_cidr",
        (8, 1),
        "unknown key `from_cidr`",
    );
    fails(
        &format!("{VM}[limits]\nmax_flow = 1\n"),
        "limits.max_flow",
        (6, 1),
        "did you mean `max_flows`?",
    );
    fails(
        &format!("{VM}[vm.extra]\nx = 1\n"),
        "vm.extra",
        (5, 5),
        "unknown key `extra`",
    );
}

#[test]
fn missing_required_keys() {
    let err = fails(
        "[proxy]\nhttp = \"127.0.0.1:3128\"\n",
        "vm",
        (1, 1),
        "add a [vm] table with name, mac and address",
    );
    assert!(matches!(err, PolicyError::MissingKey { .. }), "{err:?}");
    fails("", "vm", (1, 1), "required key is missing");
    fails(
        "\n[vm]\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n",
        "vm.name",
        (2, 1),
        "required key is missing; add name = \"sandbox-17\"",
    );
    fails(
        "[vm]\nname = \"t\"\naddress = \"10.0.0.2/30\"\n",
        "vm.mac",
        (1, 1),
        "add mac = \"52:54:00:12:34:56\"",
    );
    fails(
        "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\n",
        "vm.address",
        (1, 1),
        "add address = \"10.0.0.2/30\"",
    );
    fails(
        &format!("{VM}{PROXY}[[outbound]]\nports = [1]\n"),
        "outbound[0].protocol",
        (8, 1),
        "add protocol = \"tcp\"",
    );
    fails(
        &format!("{VM}{PROXY}[[outbound]]\nprotocol = \"tcp\"\n"),
        "outbound[0].ports",
        (8, 1),
        "add ports = [443]",
    );
    fails(
        &format!("{VM}[[forward]]\nguest_port = 1\n"),
        "forward[0].listen",
        (5, 1),
        "add listen = \"127.0.0.1:8080\"",
    );
}

#[test]
fn values_of_the_wrong_type() {
    fails(
        &format!("{VM}mtu = \"big\"\n"),
        "vm.mtu",
        (5, 7),
        "invalid type: string \"big\", expected an integer",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [true]\n"),
        "outbound[0].ports",
        (10, 10),
        "expected a port such as 443 or a range such as \"8000-8100\"",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = 443\n"),
        "outbound[0].ports",
        (10, 9),
        "expected an array",
    );
    fails(
        &vm_with("\"t\"", "7"),
        "vm.name",
        (2, 8),
        "expected a string",
    );
}

#[test]
fn vm_name_must_be_a_label() {
    for bad in ["Sandbox", "sand_box", "", "a.b"] {
        fails(
            &vm_with("\"t\"", &format!("{bad:?}")),
            "vm.name",
            (2, 8),
            "not a valid VM name; use 1-63 characters of a-z, 0-9 and '-'",
        );
    }
    let long = "a".repeat(64);
    fails(
        &vm_with("\"t\"", &format!("{long:?}")),
        "vm.name",
        (2, 8),
        "not a valid VM name",
    );
    assert!(parse(&vm_with("\"t\"", &format!("{:?}", "a".repeat(63)))).is_ok());
    assert!(parse(&vm_with("\"t\"", "\"sandbox-17\"")).is_ok());
}

#[test]
fn mac_must_be_unicast_and_not_the_gateways() {
    for bad in [
        "52:54:00:12:34",
        "zz:54:00:12:34:56",
        "52:54:00:12:34:56:78",
        "525400123456",
        "+2:54:00:12:34:56",
        "52:54-00:12:34:56",
    ] {
        fails(
            &vm_with("52:54:00:12:34:56", bad),
            "vm.mac",
            (3, 7),
            "is not a MAC address; write six hex bytes such as 52:54:00:12:34:56",
        );
    }
    fails(
        &vm_with("52:54:00:12:34:56", "ff:ff:ff:ff:ff:ff"),
        "vm.mac",
        (3, 7),
        "is a multicast MAC",
    );
    fails(
        &vm_with("52:54:00:12:34:56", "00:00:00:00:00:00"),
        "vm.mac",
        (3, 7),
        "is the all-zero MAC; use a unicast address",
    );
    fails(
        &vm_with("52:54:00:12:34:56", &GATEWAY_MAC.to_string()),
        "vm.mac",
        (3, 7),
        "is moat's own gateway MAC; use a unicast address",
    );
    let p = parse(&vm_with("52:54:00:12:34:56", "52-54-00-AB-CD-EF")).unwrap();
    assert_eq!(p.vm.mac.to_string(), "52:54:00:ab:cd:ef");
}

#[test]
fn address_needs_a_prefix_with_room_for_the_gateway() {
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.2"),
        "vm.address",
        (4, 11),
        "\"10.0.0.2\" has no prefix; write it like 10.0.0.2/30",
    );
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.300/30"),
        "vm.address",
        (4, 11),
        "not an IPv4 address with a prefix",
    );
    fails(
        &vm_with("10.0.0.2/30", "fd00::2/64"),
        "vm.address",
        (4, 11),
        "not an IPv4 address with a prefix",
    );
    for prefix in [31, 32] {
        fails(
            &vm_with("10.0.0.2/30", &format!("10.0.0.2/{prefix}")),
            "vm.address",
            (4, 11),
            &format!("/{prefix} leaves no room for the guest and its gateway; use /30"),
        );
    }
}

#[test]
fn address_must_be_a_host_of_its_subnet() {
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.0/30"),
        "vm.address",
        (4, 11),
        "10.0.0.0 is the network address of 10.0.0.0/30; use a host address",
    );
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.255/24"),
        "vm.address",
        (4, 11),
        "10.0.0.255 is the broadcast address of 10.0.0.0/24",
    );
    fails(
        &vm_with("10.0.0.2/30", "127.0.0.2/30"),
        "vm.address",
        (4, 11),
        "is a loopback address",
    );
    fails(
        &vm_with("10.0.0.2/30", "224.0.0.2/30"),
        "vm.address",
        (4, 11),
        "is a multicast address",
    );
    fails(
        &vm_with("10.0.0.2/30", "198.19.0.2/30"),
        "vm.address",
        (4, 11),
        "overlaps 198.18.0.0/15, the pool DNS answers come from",
    );
    fails(
        &vm_with("10.0.0.2/30", "198.0.0.2/8"),
        "vm.address",
        (4, 11),
        "overlaps 198.18.0.0/15",
    );
}

#[test]
fn gateway_rules() {
    fails(
        &vm_with("10.0.0.2/30", "10.0.0.2/24"),
        "vm.gateway",
        (4, 11),
        "required for a /24 subnet (only a /30 has an obvious gateway); add gateway = \"10.0.0.1\"",
    );
    let gw = |g: &str| format!("{}gateway = \"{g}\"\n", vm_with("/30", "/24"));
    let p = parse(&gw("10.0.0.254")).unwrap();
    assert_eq!(p.vm.gateway, Ipv4Addr::new(10, 0, 0, 254));
    fails(
        &gw("10.0.1.1"),
        "vm.gateway",
        (5, 11),
        "10.0.1.1 is outside the VM's subnet 10.0.0.0/24",
    );
    fails(
        &gw("10.0.0.2"),
        "vm.gateway",
        (5, 11),
        "is the guest's own address",
    );
    fails(
        &gw("10.0.0.0"),
        "vm.gateway",
        (5, 11),
        "is the network address of 10.0.0.0/24",
    );
    fails(
        &gw("10.0.0.255"),
        "vm.gateway",
        (5, 11),
        "is the broadcast address of 10.0.0.0/24",
    );
    fails(
        &gw("10.0.0.1/24"),
        "vm.gateway",
        (5, 11),
        "is not an IPv4 address; write it like 10.0.0.1 (no prefix)",
    );
}

#[test]
fn mtu_range() {
    for bad in ["67", "9001", "-1", "100000"] {
        fails(
            &format!("{VM}mtu = {bad}\n"),
            "vm.mtu",
            (5, 7),
            &format!("{bad} is outside 68..=9000; use 1500"),
        );
    }
    for ok in [68, 9000] {
        assert_eq!(parse(&format!("{VM}mtu = {ok}\n")).unwrap().vm.mtu, ok);
    }
}

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
fn proxy_addresses() {
    let proxy = |body: &str| format!("{VM}[proxy]\n{body}\n");
    fails(
        &proxy("http = \"localhost:3128\""),
        "proxy.http",
        (6, 8),
        "\"localhost:3128\" is not an IP address and port; write it like 127.0.0.1:3128",
    );
    fails(
        &proxy("socks5 = \"127.0.0.1\""),
        "proxy.socks5",
        (6, 10),
        "is not an IP address and port",
    );
    fails(
        &proxy("http = \"127.0.0.1:0\""),
        "proxy.http",
        (6, 8),
        "port 0 cannot be connected to",
    );
    fails(
        &proxy("socks5 = \"0.0.0.0:1080\""),
        "proxy.socks5",
        (6, 10),
        "0.0.0.0 is not an address to connect to",
    );
    let p = parse(&proxy("http = \"[::1]:3128\"")).unwrap();
    assert_eq!(p.proxy.http, Some("[::1]:3128".parse().unwrap()));
}

#[test]
fn explicit_port_rules() {
    let proxy = |body: &str| format!("{VM}[proxy]\n{body}\n");
    fails(
        &proxy("explicit_port = 3128"),
        "proxy.explicit_port",
        (6, 17),
        "needs proxy.http, where the spliced connections go",
    );
    fails(
        &proxy("http = \"127.0.0.1:3128\"\nexplicit_port = 0"),
        "proxy.explicit_port",
        (7, 17),
        "0 is not a port; use 1..=65535",
    );
    fails(
        &proxy("http = \"127.0.0.1:3128\"\nexplicit_port = 53"),
        "proxy.explicit_port",
        (7, 17),
        "53 is the gateway's DNS port",
    );
}

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
fn forward_rules() {
    let fwd = |body: &str| format!("{VM}[[forward]]\n{body}\n");
    fails(
        &fwd("listen = \"127.0.0.1\"\nguest_port = 80"),
        "forward[0].listen",
        (6, 10),
        "\"127.0.0.1\" is not an IP address and port; write it like 127.0.0.1:8080",
    );
    fails(
        &fwd("listen = \"127.0.0.1:0\"\nguest_port = 80"),
        "forward[0].listen",
        (6, 10),
        "port 0 would listen on a random port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 0"),
        "forward[0].guest_port",
        (7, 14),
        "0 is not a port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 70000"),
        "forward[0].guest_port",
        (7, 14),
        "70000 is not a port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 80\nfrom = [\"everyone\"]"),
        "forward[0].from",
        (8, 9),
        "\"everyone\" is not a valid CIDR",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 80\nfrom = [\"192.168.1.7/24\"]"),
        "forward[0].from",
        (8, 9),
        "has host bits set; write 192.168.1.0/24",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 80\nfrom = []"),
        "forward[0].from",
        (8, 8),
        "is empty, so no peer may connect",
    );
    let p = parse(&fwd(
        "listen = \"0.0.0.0:8080\"\nguest_port = 80\nfrom = [\"192.0.2.0/24\", \"2001:db8::/32\"]",
    ))
    .unwrap();
    assert_eq!(p.forward[0].from.len(), 2);
}

#[test]
fn forward_listen_addresses_must_not_overlap() {
    let two = |a: &str, b: &str| {
        format!("{VM}[[forward]]\nlisten = \"{a}\"\nguest_port = 80\n[[forward]]\nlisten = \"{b}\"\nguest_port = 81\n")
    };
    fails(
        &two("127.0.0.1:8080", "127.0.0.1:8080"),
        "forward[1].listen",
        (9, 10),
        "127.0.0.1:8080 overlaps forward[0].listen (127.0.0.1:8080); give each forward its own port",
    );
    fails(
        &two("127.0.0.1:8080", "0.0.0.0:8080"),
        "forward[1].listen",
        (9, 10),
        "0.0.0.0:8080 overlaps forward[0].listen (127.0.0.1:8080)",
    );
    fails(
        &two("[::]:8080", "127.0.0.1:8080"),
        "forward[1].listen",
        (9, 10),
        "overlaps forward[0].listen ([::]:8080)",
    );
    assert!(parse(&two("127.0.0.1:8080", "127.0.0.2:8080")).is_ok());
    assert!(parse(&two("0.0.0.0:8080", "0.0.0.0:8081")).is_ok());
}

#[test]
fn limits_rules() {
    for bad in ["0", "1000001", "-1"] {
        fails(
            &format!("{VM}[limits]\nmax_flows = {bad}\n"),
            "limits.max_flows",
            (6, 13),
            &format!("{bad} is outside 1..=1000000"),
        );
    }
    fails(
        &format!("{VM}[limits]\negress_bps = -5\n"),
        "limits.egress_bps",
        (6, 14),
        "-5 is negative; use 0 for unlimited",
    );
    fails(
        &format!("{VM}[limits]\ningress_bps = -1\n"),
        "limits.ingress_bps",
        (6, 15),
        "is negative",
    );
    fails(
        &format!("{VM}[limits]\nburst_bytes = -1\n"),
        "limits.burst_bytes",
        (6, 15),
        "-1 is negative; use 0 for the default depth",
    );
    let p = parse(&format!(
        "{VM}[limits]\nmax_flows = 1000000\negress_bps = 125000000\nburst_bytes = 262144\n"
    ))
    .unwrap();
    assert_eq!(
        (
            p.limits.max_flows,
            p.limits.egress_bps,
            p.limits.ingress_bps,
            p.limits.burst_bytes
        ),
        (1_000_000, 125_000_000, 0, 262_144)
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

#[test]
fn mac_text_round_trips() {
    let mac: MacAddr = "52:54:00:AB:cd:0F".parse().unwrap();
    assert_eq!(mac, MacAddr([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]));
    assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
    assert_eq!(GATEWAY_MAC.to_string(), "02:6d:6f:61:74:01");
    assert!(!GATEWAY_MAC.is_multicast());
    assert_eq!("52:54:00:ab:cd".parse::<MacAddr>(), Err(ParseMacError));
}

#[test]
fn summary_names_everything_that_is_allowed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Policy::load(&root.join("policy/example.toml")).unwrap();
    let s = p.summary();
    for needle in [
        "sandbox-17",
        "52:54:00:12:34:56",
        "10.0.0.2/30",
        "gateway 10.0.0.1",
        "mtu 1500",
        "http 127.0.0.1:3128",
        "socks5 127.0.0.1:1080",
        "explicit port 3128",
        "*.example.com",
        "203.0.113.0/24",
        "80,443",
        "api.internal -> 10.0.0.1",
        "127.0.0.1:8080 -> guest port 3000",
        "max_flows 4096",
    ] {
        assert!(s.contains(needle), "{needle:?} missing from\n{s}");
    }
    let d = Policy::load(&root.join("policy/deny-all.toml")).unwrap();
    let s = d.summary();
    assert!(s.contains("nothing leaves the VM"), "{s}");
    assert!(s.contains("every name is NXDOMAIN"), "{s}");
}
