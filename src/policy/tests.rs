use std::net::Ipv4Addr;
use std::path::Path;

use super::*;

const VM: &str = "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n";
const PROXY: &str = "[proxy]\nhttp = \"127.0.0.1:3128\"\nsocks5 = \"127.0.0.1:1080\"\n";

fn parse(text: &str) -> Result<Policy, PolicyError> {
    Policy::parse(text, Path::new("p.toml"))
}

/// Assert `text` fails on `key` at `line` with `reason` in the message; return the message.
#[track_caller]
fn fails(text: &str, key: &str, line: usize, reason: &str) -> String {
    let err = parse(text).expect_err("policy should be invalid");
    let msg = err.to_string();
    assert_eq!(err.key(), Some(key), "{msg}");
    assert!(
        msg.starts_with(&format!("p.toml:{line}:")),
        "line {line}: {msg}"
    );
    assert!(msg.contains(reason), "reason {reason:?}: {msg}");
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    msg
}

#[test]
fn example_policies_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Policy::load(&root.join("policy/example.toml")).expect("example.toml is valid");
    assert_eq!(p.vm.name, "sandbox-17");
    assert_eq!(p.vm.address, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(p.vm.gateway, Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(p.outbound.len(), 2);
    assert_eq!(p.forward[0].guest_port, 3000);
    assert!(p.summary().contains("sandbox-17"));
    let d = Policy::load(&root.join("policy/deny-all.toml")).expect("deny-all.toml is valid");
    assert!(d.outbound.is_empty() && d.forward.is_empty() && d.dns.allow.is_empty());
}

#[test]
fn gateway_defaults_to_the_other_host_of_a_slash_30() {
    let p = parse(VM).unwrap();
    assert_eq!(
        (p.vm.gateway, p.vm.prefix_len, p.vm.mtu),
        (Ipv4Addr::new(10, 0, 0, 1), 30, 1500)
    );
    let p = parse(&VM.replace("10.0.0.2/30", "10.0.0.1/30")).unwrap();
    assert_eq!(p.vm.gateway, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(p.vm.broadcast(), Ipv4Addr::new(10, 0, 0, 3));
}

#[test]
fn syntax_and_unknown_and_missing_keys() {
    fails("[vm\nname = 1", "vm", 1, "");
    fails(
        &format!("{VM}nmae = \"x\"\n"),
        "vm.nmae",
        5,
        "unknown field `nmae`",
    );
    fails(
        &format!("{VM}[vpn]\nx = 1\n"),
        "vpn",
        5,
        "unknown field `vpn`",
    );
    fails(
        "[vm]\nname = \"t\"\naddress = \"10.0.0.2/30\"\n",
        "vm.mac",
        1,
        "missing field `mac`",
    );
    fails(
        &format!("{VM}[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nvai = \"http\"\n"),
        "outbound[0].vai",
        8,
        "unknown field",
    );
}

#[test]
fn vm_section_errors() {
    fails(
        &VM.replace("\"t\"", "\"Sandbox_1\""),
        "vm.name",
        2,
        "not a valid VM name",
    );
    fails(
        &VM.replace("52:54:00:12:34:56", "52:54:00:12:34"),
        "vm.mac",
        3,
        "not a MAC address",
    );
    fails(
        &VM.replace("52:54:00:12:34:56", "zz:54:00:12:34:56"),
        "vm.mac",
        3,
        "not a MAC address",
    );
    fails(
        &VM.replace("52:54:00:12:34:56", "01:00:5e:00:00:01"),
        "vm.mac",
        3,
        "multicast",
    );
    fails(
        &VM.replace("52:54:00:12:34:56", "00:00:00:00:00:00"),
        "vm.mac",
        3,
        "not a usable MAC",
    );
    fails(
        &VM.replace("52:54:00:12:34:56", "02:6d:6f:61:74:01"),
        "vm.mac",
        3,
        "gateway MAC",
    );
    fails(
        &VM.replace("10.0.0.2/30", "10.0.0.2"),
        "vm.address",
        4,
        "with a prefix",
    );
    fails(
        &VM.replace("10.0.0.2/30", "10.0.0.300/30"),
        "vm.address",
        4,
        "with a prefix",
    );
    fails(
        &VM.replace("10.0.0.2/30", "10.0.0.2/31"),
        "vm.address",
        4,
        "no room",
    );
    fails(
        &VM.replace("10.0.0.2/30", "10.0.0.0/30"),
        "vm.address",
        4,
        "network or broadcast",
    );
    fails(
        &VM.replace("10.0.0.2/30", "10.0.0.2/24"),
        "vm.gateway",
        4,
        "required for a /24",
    );
    let gw = |g: &str| format!("{VM}gateway = \"{g}\"\n");
    fails(&gw("10.0.1.1"), "vm.gateway", 5, "outside the VM's subnet");
    fails(&gw("10.0.0.2"), "vm.gateway", 5, "guest's own address");
    fails(&gw("10.0.0.3"), "vm.gateway", 5, "network or broadcast");
    fails(&gw("gateway"), "vm.gateway", 5, "not an IPv4 address");
    fails(&format!("{VM}mtu = 20\n"), "vm.mtu", 5, "outside 68..=9000");
    fails(
        &format!("{VM}mtu = 100000\n"),
        "vm.mtu",
        5,
        "outside 68..=9000",
    );
}

#[test]
fn outbound_errors() {
    let rule = |body: &str| format!("{VM}{PROXY}[[outbound]]\n{body}");
    fails(
        &rule("protocol = \"icmp\"\nports = [1]\n"),
        "outbound[0].protocol",
        9,
        "not a protocol",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = []\n"),
        "outbound[0].ports",
        10,
        "is empty",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [0]\n"),
        "outbound[0].ports",
        10,
        "0 is not a port",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [65536]\n"),
        "outbound[0].ports",
        10,
        "65536 is not a port",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [\"90-80\"]\n"),
        "outbound[0].ports",
        10,
        "runs backwards",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [\"80-\"]\n"),
        "outbound[0].ports",
        10,
        "not a port range",
    );
    fails(
        &rule("protocol = \"udp\"\nports = [53]\nvia = \"http\"\n"),
        "outbound[0].via",
        11,
        "udp cannot go through an HTTP",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nvia = \"ssh\"\n"),
        "outbound[0].via",
        11,
        "not a proxy kind",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nto = [\"exa mple.com\"]\n"),
        "outbound[0].to",
        11,
        "neither a DNS name",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nto = [\"10.0.0.0/33\"]\n"),
        "outbound[0].to",
        11,
        "not a valid CIDR",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nto = [\"2001:db8::/32\"]\n"),
        "outbound[0].to",
        11,
        "IPv6 is not supported",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nto = [\"203.0.113.7\"]\n"),
        "outbound[0].to",
        11,
        "bare IP address",
    );
    // A rule needing a proxy that [proxy] does not name.
    let no_proxy = format!("{VM}[[outbound]]\nprotocol = \"tcp\"\nports = [443]\n");
    fails(&no_proxy, "outbound[0].via", 6, "no http address");
    let no_socks = format!(
        "{VM}[proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"udp\"\nports = [443]\n"
    );
    fails(&no_socks, "outbound[0].via", 8, "no socks5 address");
    // The second rule is numbered 1.
    let two = format!("{VM}{PROXY}[[outbound]]\nprotocol = \"tcp\"\nports = [80]\n[[outbound]]\nprotocol = \"tcp\"\nports = [0]\n");
    fails(&two, "outbound[1].ports", 13, "0 is not a port");
}

#[test]
fn proxy_dns_forward_limits_errors() {
    fails(
        &format!("{VM}[proxy]\nhttp = \"localhost\"\n"),
        "proxy.http",
        6,
        "not an address:port",
    );
    fails(
        &format!("{VM}[proxy]\nexplicit_port = 3128\n"),
        "proxy.explicit_port",
        6,
        "needs proxy.http",
    );
    fails(
        &format!("{VM}[proxy]\nhttp = \"127.0.0.1:3128\"\nexplicit_port = 0\n"),
        "proxy.explicit_port",
        7,
        "not a port",
    );
    fails(
        &format!("{VM}[dns]\nmode = \"upstream\"\n"),
        "dns.upstream",
        6,
        "needs an upstream",
    );
    fails(
        &format!("{VM}[dns]\nmode = \"dot\"\n"),
        "dns.mode",
        6,
        "not a DNS mode",
    );
    fails(
        &format!("{VM}[dns]\nallow = [\"ok.com\", \"bad name\"]\n"),
        "dns.allow",
        6,
        "not a DNS name",
    );
    fails(
        &format!("{VM}[dns]\nrecords = {{ \"api.internal\" = \"x\" }}\n"),
        "dns.records.api.internal",
        6,
        "not an IPv4 address",
    );
    let fwd = |body: &str| format!("{VM}[[forward]]\n{body}");
    fails(
        &fwd("listen = \"127.0.0.1\"\nguest_port = 80\n"),
        "forward[0].listen",
        6,
        "not an address:port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 0\n"),
        "forward[0].guest_port",
        7,
        "not a port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 80\nfrom = [\"everyone\"]\n"),
        "forward[0].from",
        8,
        "not a CIDR",
    );
    let dup = format!("{VM}[[forward]]\nlisten = \"127.0.0.1:8080\"\nguest_port = 80\n[[forward]]\nlisten = \"0.0.0.0:8080\"\nguest_port = 81\n");
    fails(&dup, "forward[1].listen", 9, "overlaps forward[0].listen");
    fails(
        &format!("{VM}[limits]\nmax_flows = 0\n"),
        "limits.max_flows",
        6,
        "outside 1..=1000000",
    );
    fails(
        &format!("{VM}[limits]\negress_bps = -5\n"),
        "limits.egress_bps",
        6,
        "negative",
    );
}

#[test]
fn name_patterns_match_as_documented() {
    let p = parse(&format!("{VM}{PROXY}[[outbound]]\nprotocol = \"tcp\"\nports = [443, \"8000-8002\"]\nto = [\"example.com\", \"*.example.org\", \"203.0.113.0/24\"]\n[dns]\nallow = [\"*.example.org\"]\nrecords = {{ \"Api.Internal\" = \"10.0.0.1\" }}\n")).unwrap();
    let r = &p.outbound[0];
    assert!(r.allows_port(443) && r.allows_port(8001) && !r.allows_port(80));
    assert!(r.allows_name("example.com") && r.allows_name("EXAMPLE.com."));
    assert!(!r.allows_name("www.example.com"));
    assert!(r.allows_name("a.example.org") && r.allows_name("a.b.example.org"));
    assert!(!r.allows_name("example.org") && !r.allows_name("badexample.org"));
    assert!(
        r.allows_ip(Ipv4Addr::new(203, 0, 113, 9)) && !r.allows_ip(Ipv4Addr::new(198, 51, 100, 1))
    );
    assert!(
        p.dns.allows("x.example.org")
            && p.dns.allows("api.internal")
            && !p.dns.allows("example.org")
    );
    let any = parse(&format!(
        "{VM}{PROXY}[[outbound]]\nprotocol = \"tcp\"\nports = [443]\n"
    ))
    .unwrap();
    assert!(any.outbound[0].allows_name("anything.test"));
    assert!(
        !any.outbound[0].allows_ip(Ipv4Addr::new(203, 0, 113, 1)),
        "no IP literals without a CIDR"
    );
}
