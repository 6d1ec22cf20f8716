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
    assert_eq!(err.kind(), Some(ErrorKind::Invalid));
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
    assert_eq!(err.kind(), None);
    assert!(err.location().is_none() && err.located().is_none());
    let msg = err.to_string();
    assert!(
        msg.starts_with("/nonexistent/moat.toml: cannot read the policy: "),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1);
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

mod diagnostics;
mod dns;
mod forward;
mod limits;
mod outbound;
mod proxy;
mod report;
mod vm;
