//! The attempts: raw frames first (read straight off the RX queue), then TCP and DNS through
//! the guest-side stack.

use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::MessageType;
use etherparse::{ArpOperation, PacketBuilder};
use smoltcp::socket::tcp::State;

use super::{Expect, Outcome, Witness};
use crate::frame::{self, Network, Transport};
use crate::policy::{
    Destination, DnsMode, MacAddr, NamePattern, OutboundRule, Policy, Protocol, GATEWAY_MAC,
};
use crate::telemetry::DropReason;
use moat_sim::craft;
use moat_sim::guest::{GuestNet, SimGuest};

const QUIET: Duration = Duration::from_millis(600);
const TCP_WAIT: Duration = Duration::from_millis(1500);
const STRANGER_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xde, 0xad, 0x01]);

fn outcome(
    attempt: impl Into<String>,
    expected: Expect,
    got_through: bool,
    detail: impl Into<String>,
) -> Outcome {
    Outcome {
        attempt: attempt.into(),
        expected,
        got_through,
        unable: false,
        detail: detail.into(),
    }
}

/// Whether any frame matching `pred` arrives within `wait`.
fn reply(sim: &mut SimGuest, wait: Duration, pred: impl Fn(&frame::Frame<'_>) -> bool) -> bool {
    sim.recv_until(wait, |bytes| frame::parse(bytes).is_ok_and(|f| pred(&f)))
        .is_ok_and(|got| got.is_some())
}

/// Another address in the guest's /24 that is neither the guest, the gateway nor broadcast.
fn neighbour(policy: &Policy) -> Ipv4Addr {
    let base = u32::from(policy.vm.address) & 0xffff_ff00;
    (0x42..0xfe)
        .map(|h| Ipv4Addr::from(base | h))
        .find(|a| *a != policy.vm.address && *a != policy.vm.gateway && *a != policy.vm.broadcast())
        .unwrap_or(Ipv4Addr::new(10, 0, 0, 66))
}

/// Which moat the attempts run against.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The in-process copy with echoing stand-in proxies: the control must echo.
    Stub,
    /// The deployment's own proxies: forbidden flows are judged by moat's own witness (a
    /// proxy connection opened), and each TCP rule gets a control through the real path
    /// (unless `controls` is off).
    Live {
        controls: bool,
        control_urls: Vec<ControlUrl>,
    },
}

pub fn all(
    net: &mut GuestNet,
    policy: &Policy,
    witness: &dyn Witness,
    mode: &Mode,
) -> Vec<Outcome> {
    let mut out = raw(net.sim(), policy, witness);
    out.extend(through_the_stack(net, policy, witness, mode));
    match mode {
        Mode::Stub => out.extend(stub_control(net, policy)),
        Mode::Live {
            controls: true,
            control_urls,
        } => out.extend(live_controls(net, policy, control_urls)),
        Mode::Live {
            controls: false, ..
        } => {}
    }
    out
}

fn raw(sim: &mut SimGuest, policy: &Policy, counters: &dyn Witness) -> Vec<Outcome> {
    let vm = &policy.vm;
    let (me, mac, gw) = (vm.address, vm.mac, vm.gateway);
    let near = neighbour(policy);
    let other_subnet = if vm.subnet().contains(&Ipv4Addr::new(10, 99, 0, 1)) {
        Ipv4Addr::new(10, 98, 0, 1)
    } else {
        Ipv4Addr::new(10, 99, 0, 1)
    };
    let mut out = Vec::new();
    let send = |sim: &mut SimGuest, f: &[u8]| {
        let _ = sim.send_frame(f);
    };
    let echo_reply_from = |src: Ipv4Addr| move |f: &frame::Frame<'_>| matches!(&f.net, Network::Ipv4(ip) if ip.src == src && matches!(&ip.transport, Transport::Icmp(i) if i.icmp_type == frame::ICMP_ECHO_REPLY));

    // Controls first: the gateway must answer at all, or every "blocked" below means nothing.
    send(
        sim,
        &craft::dhcp(
            mac,
            MessageType::Discover,
            0xca11,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
            GATEWAY_MAC,
        ),
    );
    let offered = reply(
        sim,
        QUIET * 2,
        |f| matches!(&f.net, Network::Ipv4(ip) if matches!(&ip.transport, Transport::Udp(u) if u.src_port == 67)),
    );
    out.push(outcome(
        "control: dhcp offer",
        Expect::Works,
        offered,
        format!("DISCOVER from {mac}"),
    ));
    send(
        sim,
        &craft::icmp_echo(mac, GATEWAY_MAC, me, gw, 7, 1, b"moat-canary"),
    );
    out.push(outcome(
        "control: ping gateway",
        Expect::Works,
        reply(sim, QUIET, echo_reply_from(gw)),
        format!("{me} -> {gw}"),
    ));

    // Other VMs, by ARP and by IP.
    send(sim, &craft::arp_request(mac, me, near));
    let arp_answered = reply(
        sim,
        QUIET,
        |f| matches!(&f.net, Network::Arp(a) if a.sender_ip == near),
    );
    out.push(outcome(
        "arp for another address",
        Expect::Blocked,
        arp_answered,
        format!("who-has {near}"),
    ));
    for (name, dst) in [
        ("ping another vm (same /24)", near),
        ("ping another 10/8 subnet", other_subnet),
    ] {
        send(
            sim,
            &craft::icmp_echo(mac, GATEWAY_MAC, me, dst, 7, 2, b"moat-canary"),
        );
        out.push(outcome(
            name,
            Expect::Blocked,
            reply(sim, QUIET, echo_reply_from(dst)),
            format!("{me} -> {dst}"),
        ));
    }

    // Spoofing.
    let spoofs =
        counters.drops(DropReason::ArpSpoofed) + counters.drops(DropReason::ArpUnsolicited);
    send(
        sim,
        &craft::arp(
            ArpOperation::REPLY,
            craft::BROADCAST_MAC,
            mac,
            gw,
            craft::BROADCAST_MAC,
            gw,
        ),
    );
    send(sim, &craft::arp_request(mac, me, gw));
    let gateway_mac_intact = reply(
        sim,
        QUIET,
        |f| matches!(&f.net, Network::Arp(a) if a.sender_ip == gw && a.sender_mac == GATEWAY_MAC),
    );
    let spoof_dropped = counters.drops(DropReason::ArpSpoofed)
        + counters.drops(DropReason::ArpUnsolicited)
        > spoofs;
    out.push(outcome(
        "arp spoofing of the gateway",
        Expect::Blocked,
        !(gateway_mac_intact && spoof_dropped),
        format!("gratuitous reply claiming {gw}"),
    ));
    send(
        sim,
        &craft::icmp_echo(STRANGER_MAC, GATEWAY_MAC, me, gw, 7, 3, b"moat-canary"),
    );
    out.push(outcome(
        "spoofed source mac",
        Expect::Blocked,
        reply(sim, QUIET, echo_reply_from(gw)),
        format!("from {STRANGER_MAC}"),
    ));
    send(
        sim,
        &craft::icmp_echo(mac, GATEWAY_MAC, near, gw, 7, 4, b"moat-canary"),
    );
    out.push(outcome(
        "spoofed source ip",
        Expect::Blocked,
        reply(sim, QUIET, echo_reply_from(gw)),
        format!("from {near}"),
    ));

    // IPv6 of any kind: nothing answers.
    let link_local = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56,
    ];
    let all_routers = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let solicited_gw = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1];
    let v6 = |dst_mac: [u8; 6], dst: [u8; 16], kind: etherparse::Icmpv6Type| {
        let mut f = Vec::new();
        let _ = PacketBuilder::ethernet2(mac.0, dst_mac)
            .ipv6(link_local, dst, 255)
            .icmpv6(kind)
            .write(&mut f, &[0u8; 16]);
        f
    };
    let ipv6_reply = |f: &frame::Frame<'_>| f.eth.ethertype == 0x86dd;
    send(
        sim,
        &v6(
            [0x33, 0x33, 0, 0, 0, 2],
            all_routers,
            etherparse::Icmpv6Type::RouterSolicitation,
        ),
    );
    out.push(outcome(
        "ipv6 router solicitation",
        Expect::Blocked,
        reply(sim, QUIET, ipv6_reply),
        "expect no RA",
    ));
    send(
        sim,
        &v6(
            [0x33, 0x33, 0xff, 0, 0, 1],
            solicited_gw,
            etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            },
        ),
    );
    out.push(outcome(
        "ipv6 neighbour solicitation",
        Expect::Blocked,
        reply(sim, QUIET, ipv6_reply),
        "expect no NA",
    ));
    let mut syn6 = Vec::new();
    let _ = PacketBuilder::ethernet2(mac.0, GATEWAY_MAC.0)
        .ipv6(
            link_local,
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .tcp(40000, 443, 1, 64240)
        .syn()
        .write(&mut syn6, &[]);
    send(sim, &syn6);
    out.push(outcome(
        "ipv6 tcp syn",
        Expect::Blocked,
        reply(sim, QUIET, ipv6_reply),
        "to 2001:db8::1:443",
    ));

    // DNS elsewhere, UDP to the internet.
    let query = dns_query("example.com.");
    let dns_reply = |src: Ipv4Addr| move |f: &frame::Frame<'_>| matches!(&f.net, Network::Ipv4(ip) if ip.src == src);
    let resolver = Ipv4Addr::new(198, 51, 100, 53);
    send(
        sim,
        &craft::udp(mac, GATEWAY_MAC, (me, 53000), (resolver, 53), &query),
    );
    out.push(outcome(
        "dns to another resolver",
        Expect::Blocked,
        reply(sim, QUIET, dns_reply(resolver)),
        format!("{resolver}:53"),
    ));
    let internet = internet_address(policy);
    let udp_port = closed_port(policy, Protocol::Udp);
    send(
        sim,
        &craft::udp(
            mac,
            GATEWAY_MAC,
            (me, 53001),
            (internet, udp_port),
            b"moat-canary",
        ),
    );
    out.push(outcome(
        "udp to the internet (ip literal)",
        Expect::Blocked,
        reply(sim, QUIET, dns_reply(internet)),
        format!("{internet}:{udp_port}"),
    ));
    out
}

fn dns_query(name: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::query();
    m.metadata.id = 0xca11;
    if let Ok(n) = Name::from_ascii(name) {
        m.add_query(Query::query(n, RecordType::A));
    }
    m.to_vec().unwrap_or_default()
}

/// A documentation-range address no rule's CIDR covers (so it is an IP literal to moat).
fn internet_address(policy: &Policy) -> Ipv4Addr {
    let covered = |ip: Ipv4Addr| policy.outbound.iter().any(|r| r.allows_ip(ip));
    [
        Ipv4Addr::new(203, 0, 113, 10),
        Ipv4Addr::new(198, 51, 100, 10),
        Ipv4Addr::new(192, 0, 2, 10),
    ]
    .into_iter()
    .find(|ip| !covered(*ip))
    .unwrap_or(Ipv4Addr::new(192, 0, 2, 10))
}

/// A port no rule of `protocol` allows.
fn closed_port(policy: &Policy, protocol: Protocol) -> u16 {
    [9u16, 7, 19, 65000, 31337]
        .into_iter()
        .find(|p| {
            !policy
                .outbound
                .iter()
                .any(|r| r.protocol == protocol && r.allows_port(*p))
        })
        .unwrap_or(9)
}

/// A name the policy lets the guest resolve, if any.
fn resolvable(policy: &Policy) -> Option<String> {
    policy.dns.records.keys().next().cloned().or_else(|| {
        policy.dns.allow.first().map(|p| match p {
            NamePattern::Exact(n) => n.clone(),
            NamePattern::Wildcard(s) => format!("canary.{s}"),
        })
    })
}

/// An allowed TCP destination by name: (name, port), resolvable and allowed by a rule.
fn allowed_flow(policy: &Policy) -> Option<(String, u16)> {
    policy
        .outbound
        .iter()
        .filter(|r| r.protocol == Protocol::Tcp)
        .find_map(|r| {
            let port = r.ports.first()?.lo;
            let name = match &r.to {
                None => resolvable(policy)?,
                Some(to) => to.iter().find_map(|d| match d {
                    Destination::Name(NamePattern::Exact(n)) => Some(n.clone()),
                    Destination::Name(NamePattern::Wildcard(s)) => Some(format!("canary.{s}")),
                    Destination::Cidr(_) => None,
                })?,
            };
            (policy.dns.allows(&name)
                && r.allows_name(&name)
                && !policy.dns.records.contains_key(&name))
            .then_some((name, port))
        })
}

/// Connect, send a line, and see whether it comes back (the stand-in proxies echo).
fn exchange(net: &mut GuestNet, dst: Ipv4Addr, port: u16) -> (bool, bool) {
    exchange_with(net, dst, port, b"moat-canary\n")
}

/// Connect, send `payload`, and see whether it comes back (the stand-in proxies echo).
fn exchange_with(net: &mut GuestNet, dst: Ipv4Addr, port: u16, payload: &[u8]) -> (bool, bool) {
    let h = net.tcp_connect(dst, port);
    let established = net
        .run_until(TCP_WAIT, |n| n.tcp(h).state() == State::Established)
        .unwrap_or(false);
    let mut echoed = false;
    if established {
        let _ = net.tcp(h).send_slice(payload);
        let mut got = Vec::new();
        echoed = net
            .run_until(TCP_WAIT, |n| {
                let s = n.tcp(h);
                while s.can_recv() {
                    let _ = s.recv(|d| {
                        got.extend_from_slice(d);
                        (d.len(), ())
                    });
                }
                got.ends_with(payload)
            })
            .unwrap_or(false);
    }
    net.tcp(h).abort();
    let _ = net.poll(Duration::from_millis(5));
    net.remove(h);
    (established, echoed)
}

/// A forbidden TCP attempt that carries bytes (moat may take the handshake to read them):
/// it got through only if moat opened a proxy connection for it or the bytes came back.
pub struct PayloadAttempt {
    pub name: String,
    pub dst: Ipv4Addr,
    pub port: u16,
    pub payload: Vec<u8>,
    pub detail: String,
}

/// The attempts whose first bytes try to talk moat into a destination. To add one (a
/// smuggled Host or SNI name, a request to the explicit proxy port), add a row here; it is
/// judged by moat's own witness (a proxy connection opened) in both modes.
pub fn payload_attempts(policy: &Policy) -> Vec<PayloadAttempt> {
    let internet = internet_address(policy);
    let open_port = policy
        .outbound
        .iter()
        .find(|r| r.protocol == Protocol::Tcp)
        .and_then(|r| r.ports.first())
        .map_or(443, |p| p.lo);
    let mut attempts = vec![PayloadAttempt {
        name: "tcp to the internet (ip literal)".into(),
        dst: internet,
        port: open_port,
        payload: b"moat-canary\n".to_vec(),
        detail: format!("{internet}:{open_port}, allowed port, no name"),
    }];
    // Names smuggled in the first bytes: loopback and the metadata service, as a resolver
    // or URL parser would read them. Skipped where a rule names that address by CIDR on the
    // port (the policy allows it then, by design).
    let named_by_cidr = |ip: Ipv4Addr| {
        policy
            .outbound
            .iter()
            .any(|r| r.protocol == Protocol::Tcp && r.allows_port(open_port) && r.allows_ip(ip))
    };
    let smuggled = [
        ("127.0.0.1", Ipv4Addr::LOCALHOST),
        ("0x7f000001", Ipv4Addr::LOCALHOST),
        ("2130706433", Ipv4Addr::LOCALHOST),
        ("localhost", Ipv4Addr::LOCALHOST),
        ("169.254.169.254", METADATA),
    ];
    for (text, _) in smuggled.into_iter().filter(|(_, ip)| !named_by_cidr(*ip)) {
        attempts.push(PayloadAttempt {
            name: format!("host header smuggling {text}"),
            dst: internet,
            port: open_port,
            payload: format!("GET / HTTP/1.1\r\nHost: {text}\r\n\r\n").into_bytes(),
            detail: format!("{internet}:{open_port}, Host: {text}"),
        });
        attempts.push(PayloadAttempt {
            name: format!("tls sni smuggling {text}"),
            dst: internet,
            port: open_port,
            payload: craft::tls_client_hello(text),
            detail: format!("{internet}:{open_port}, SNI {text}"),
        });
    }
    // The explicit-proxy port: moat's front must refuse these (403), not tunnel them.
    if let Some(port) = policy.proxy.explicit_port {
        let gw = policy.vm.gateway;
        for (request, ip) in [
            ("CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n", Ipv4Addr::LOCALHOST),
            ("CONNECT localhost:22 HTTP/1.1\r\n\r\n", Ipv4Addr::LOCALHOST),
            ("CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n", METADATA),
            (
                "GET http://2130706433:2375/version HTTP/1.1\r\n\r\n",
                Ipv4Addr::LOCALHOST,
            ),
        ] {
            let named = policy.outbound.iter().any(|r| r.allows_ip(ip));
            if named {
                continue;
            }
            let line = request.lines().next().unwrap_or_default();
            attempts.push(PayloadAttempt {
                name: format!("explicit proxy {line}"),
                dst: gw,
                port,
                payload: request.as_bytes().to_vec(),
                detail: format!("{gw}:{port}, {line}"),
            });
        }
    }
    attempts
}

/// The cloud metadata address.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// A forbidden TCP attempt: it got through if moat opened a proxy connection for it (its
/// own witness), or bytes came back.
fn forbidden_tcp(
    net: &mut GuestNet,
    witness: &dyn Witness,
    dst: Ipv4Addr,
    port: u16,
) -> (bool, bool) {
    let before = witness.proxy_flows();
    let (established, echoed) = exchange(net, dst, port);
    let opened = witness.proxy_flows() > before;
    (established, opened || echoed)
}

fn through_the_stack(
    net: &mut GuestNet,
    policy: &Policy,
    witness: &dyn Witness,
    mode: &Mode,
) -> Vec<Outcome> {
    let vm = &policy.vm;
    let near = neighbour(policy);
    let mut out = Vec::new();
    for (name, dst) in [
        ("tcp to another vm :22", near),
        (
            "tcp to another 10/8 subnet :22",
            Ipv4Addr::new(10, 99, 0, 1),
        ),
    ] {
        let (established, through) = forbidden_tcp(net, witness, dst, 22);
        out.push(outcome(
            name,
            Expect::Blocked,
            established || through,
            format!("{dst}:22"),
        ));
    }
    for port in [22u16, 2375, 2376, 10250, 8080] {
        if Some(port) == policy.proxy.explicit_port {
            continue; // the policy's own explicit proxy port, spliced by design
        }
        let (established, through) = forbidden_tcp(net, witness, vm.gateway, port);
        out.push(outcome(
            format!("tcp to gateway :{port}"),
            Expect::Blocked,
            established || through,
            format!("{}:{port}", vm.gateway),
        ));
    }
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let (established, through) = forbidden_tcp(net, witness, metadata, 80);
    out.push(outcome(
        "tcp to cloud metadata :80",
        Expect::Blocked,
        established || through,
        "169.254.169.254:80",
    ));
    let forbidden = "canary-forbidden.invalid";
    let resolved = net
        .resolve(forbidden, QUIET * 2)
        .ok()
        .and_then(|r| r.addr());
    out.push(outcome(
        "dns for a non-allowlisted name",
        Expect::Blocked,
        resolved.is_some(),
        format!("{forbidden} -> {resolved:?}"),
    ));
    for a in payload_attempts(policy) {
        let before = witness.proxy_flows();
        let (_, echoed) = exchange_with(net, a.dst, a.port, &a.payload);
        let opened = witness.proxy_flows() > before;
        out.push(outcome(a.name, Expect::Blocked, opened || echoed, a.detail));
    }
    let internet = internet_address(policy);
    let closed = closed_port(policy, Protocol::Tcp);
    let (established, through) = forbidden_tcp(net, witness, internet, closed);
    out.push(outcome(
        "tcp to the internet, other port",
        Expect::Blocked,
        established || through,
        format!("{internet}:{closed}"),
    ));

    // Control: names the policy allows resolve (in upstream mode through the real resolver,
    // a real request: skipped with --no-controls).
    let real_query = policy.dns.mode == DnsMode::Upstream;
    if matches!(
        mode,
        Mode::Live {
            controls: false,
            ..
        }
    ) && real_query
    {
        return out;
    }
    match resolvable(policy) {
        Some(name) => {
            let got = net.resolve(&name, QUIET * 4).ok().and_then(|r| r.addr());
            out.push(outcome(
                "control: resolve an allowed name",
                Expect::Works,
                got.is_some(),
                format!("{name} -> {got:?}"),
            ));
        }
        None => out.push(outcome(
            "control: resolve an allowed name",
            Expect::Works,
            true,
            "policy allows no names: not applicable",
        )),
    }
    out
}

/// Today's control: an allowed flow through a loopback stand-in that echoes.
fn stub_control(net: &mut GuestNet, policy: &Policy) -> Vec<Outcome> {
    let mut out = Vec::new();
    match allowed_flow(policy) {
        Some((name, port)) => {
            let addr = net.resolve(&name, QUIET * 2).ok().and_then(|r| r.addr());
            let echoed = addr.is_some_and(|a| exchange(net, a, port).1);
            out.push(outcome(
                "control: allowed flow via proxy",
                Expect::Works,
                echoed,
                format!("{name}:{port} through a loopback stand-in proxy"),
            ));
        }
        None => out.push(outcome(
            "control: allowed flow via proxy",
            Expect::Works,
            true,
            "policy allows no named TCP flow: not applicable",
        )),
    }
    out
}

/// `--control-url http://example.com/health`, `https://example.com`, `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub url: String,
    pub http: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl ControlUrl {
    pub fn parse(url: &str) -> Result<ControlUrl, String> {
        let bad = |why: &str| format!("--control-url {url}: {why}");
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("give scheme://host[:port][/path]"))?;
        let (default_port, http) = match scheme {
            "http" => (Some(80), true),
            "https" => (Some(443), false),
            "tcp" => (None, false),
            _ => return Err(bad("scheme must be http, https or tcp")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
            None => (
                authority,
                default_port.ok_or_else(|| bad("tcp:// needs a port"))?,
            ),
        };
        if host.is_empty() || port == 0 || host.contains(['[', ']', '@', ' ']) {
            return Err(bad("give a name or IPv4 address and a port"));
        }
        Ok(ControlUrl {
            url: url.to_string(),
            http,
            host: host.to_ascii_lowercase(),
            port,
            path: path.to_string(),
        })
    }

    fn allowed_by(&self, rule: &OutboundRule) -> bool {
        rule.protocol == Protocol::Tcp
            && rule.allows_port(self.port)
            && match self.host.parse::<Ipv4Addr>() {
                Ok(ip) => rule.allows_ip(ip),
                Err(_) => rule.allows_name(&self.host),
            }
    }
}

const CONTROL_WAIT: Duration = Duration::from_secs(15);

/// One control per TCP rule through the real proxy: its destination from `--control-url`
/// (the first one the rule allows) or from the rule itself (its first exact name, or an
/// allowed DNS name when `to` is absent). A rule with neither is reported, not tried;
/// if no rule yields a control the run fails, since "all blocked" would prove nothing.
fn live_controls(net: &mut GuestNet, policy: &Policy, urls: &[ControlUrl]) -> Vec<Outcome> {
    let mut out = Vec::new();
    for u in urls {
        if !policy.outbound.iter().any(|r| u.allowed_by(r)) {
            out.push(outcome(
                format!("control: {}", u.url),
                Expect::Works,
                false,
                "no [[outbound]] rule allows it: fix --control-url or the policy",
            ));
        }
    }
    let mut tried = 0;
    for (i, rule) in policy.outbound.iter().enumerate() {
        if rule.protocol != Protocol::Tcp {
            continue; // UDP controls need a real UDP service to answer: not attempted
        }
        let chosen = urls
            .iter()
            .find(|u| u.allowed_by(rule))
            .cloned()
            .or_else(|| {
                derived_destination(policy, rule).map(|(host, port)| ControlUrl {
                    url: format!("tcp://{host}:{port}"),
                    http: port == 80,
                    host,
                    port,
                    path: "/".into(),
                })
            });
        let Some(c) = chosen else { continue };
        tried += 1;
        let name = format!("control: rule {} {}:{}", i + 1, c.host, c.port);
        let addr = match c.host.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => net.resolve(&c.host, QUIET * 4).ok().and_then(|r| r.addr()),
        };
        let Some(addr) = addr else {
            out.push(outcome(
                name,
                Expect::Works,
                false,
                format!(
                    "{} does not resolve through moat's DNS ([dns] allow?)",
                    c.host
                ),
            ));
            continue;
        };
        let (through, detail) = control_exchange(net, addr, &c);
        out.push(outcome(name, Expect::Works, through, detail));
    }
    let has_tcp = policy.outbound.iter().any(|r| r.protocol == Protocol::Tcp);
    if tried == 0 && has_tcp {
        out.push(outcome(
            "control: allowed flow via proxy",
            Expect::Works,
            false,
            "no TCP rule names a destination the canary can try: give --control-url (or --no-controls)",
        ));
    }
    out
}

/// A destination a rule allows by name: its first exact name, or with `to` absent an
/// allowed DNS name.
fn derived_destination(policy: &Policy, rule: &OutboundRule) -> Option<(String, u16)> {
    let port = rule.ports.first()?.lo;
    let name = match &rule.to {
        None => resolvable(policy).filter(|n| !policy.dns.records.contains_key(n))?,
        Some(to) => to.iter().find_map(|d| match d {
            Destination::Name(NamePattern::Exact(n)) => Some(n.clone()),
            _ => None,
        })?,
    };
    Some((name, port))
}

/// Open the flow; moat answers the guest's SYN only after the proxy said 2xx, so an
/// established connection is a tunnel the proxy opened. For http, a HEAD request must get
/// an HTTP answer back too.
fn control_exchange(net: &mut GuestNet, addr: Ipv4Addr, c: &ControlUrl) -> (bool, String) {
    let h = net.tcp_connect(addr, c.port);
    // Done when established, or when moat reset the flow (the proxy refused it).
    let _ = net.run_until(CONTROL_WAIT, |n| {
        matches!(n.tcp(h).state(), State::Established | State::Closed)
    });
    let established = net.tcp(h).state() == State::Established;
    let mut result = (
        established,
        if established {
            format!("{} ({addr}:{}): tunnel opened by the proxy", c.url, c.port)
        } else {
            format!(
                "{} ({addr}:{}): no connection through the proxy",
                c.url, c.port
            )
        },
    );
    if established && c.http {
        let req = format!(
            "HEAD {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: moat-canary\r\nConnection: close\r\n\r\n",
            c.path, c.host
        );
        let _ = net.tcp(h).send_slice(req.as_bytes());
        let mut got = Vec::new();
        let answered = net
            .run_until(CONTROL_WAIT, |n| {
                let s = n.tcp(h);
                while s.can_recv() {
                    let _ = s.recv(|d| {
                        got.extend_from_slice(d);
                        (d.len(), ())
                    });
                }
                got.len() >= 12 || !s.may_recv()
            })
            .unwrap_or(false);
        let line = String::from_utf8_lossy(&got[..got.len().min(40)]).into_owned();
        let ok = answered && got.starts_with(b"HTTP/");
        result = (
            ok,
            format!(
                "{} ({addr}:{}): {}",
                c.url,
                c.port,
                if ok {
                    line.lines().next().unwrap_or_default().to_string()
                } else {
                    format!("no HTTP answer ({line:?})")
                }
            ),
        );
    }
    net.tcp(h).abort();
    let _ = net.poll(Duration::from_millis(5));
    net.remove(h);
    result
}
