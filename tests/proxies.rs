//! moat against the real proxies from Debian: tinyproxy (HTTP CONNECT, and the explicit
//! proxy port) and dante (SOCKS5). Names resolve to loopback at the proxy: the tests use
//! "localhost", which the proxies resolve from /etc/hosts.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use moat::telemetry::FlowEvent;
use moat_sim::guest::{tcp_drain, GuestNet};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use support::peers::{available, dante, tinyproxy};
use support::proxy::{origin, pattern, Fnv};
use support::*;

const T: Duration = Duration::from_secs(15);

fn policy(http: SocketAddr, socks5: SocketAddr, origin_port: u16, via: &str) -> String {
    format!(
        r#"
[vm]
name = "proxies"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[proxy]
http = "{http}"
socks5 = "{socks5}"
explicit_port = 3128
[[outbound]]
protocol = "tcp"
ports = [{origin_port}]
to = ["localhost", "127.0.0.1/32"]
via = "{via}"
[dns]
allow = ["localhost"]
"#
    )
}

fn established(net: &mut GuestNet, dst: Ipv4Addr, port: u16) -> SocketHandle {
    net.tcp_established(dst, port, T)
        .unwrap()
        .unwrap_or_else(|| panic!("{dst}:{port} not established"))
}

fn send_all(net: &mut GuestNet, h: SocketHandle, data: &[u8]) {
    assert!(net.tcp_send_all(h, data, T).unwrap());
}

fn recv_exact(net: &mut GuestNet, h: SocketHandle, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    net.tcp_recv(h, T, |d| {
        got.extend_from_slice(d);
        got.len() >= len
    })
    .unwrap();
    got
}

/// Echo 4 MiB through the proxy (sending and receiving at once), check it byte for byte.
fn echo_and_check(net: &mut GuestNet, h: SocketHandle) {
    send_all(net, h, b"E");
    let data = pattern(0, 4 << 20);
    let (mut sent, mut got) = (0usize, Fnv::default());
    let mut received = 0usize;
    assert!(
        net.run_until(Duration::from_secs(60), |n| {
            let s = n.tcp(h);
            if sent < data.len() {
                if let Ok(k) = s.send_slice(&data[sent..]) {
                    sent += k;
                }
            }
            tcp_drain(s, |d| {
                got.update(d);
                received += d.len();
            });
            received == data.len()
        })
        .unwrap(),
        "echoed {received} of {} bytes",
        data.len()
    );
    let mut want = Fnv::default();
    want.update(&data);
    assert_eq!(got.0, want.0, "byte-exact both ways");
}

/// Upload 4 MiB after the mode byte, half-close, check the origin's (length, hash).
fn upload_and_check(net: &mut GuestNet, h: SocketHandle) {
    send_all(net, h, b"U");
    let data = pattern(0, 4 << 20);
    let mut hash = Fnv::default();
    hash.update(&data);
    send_all(net, h, &data);
    net.tcp(h).close();
    let reply = recv_exact(net, h, 16);
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        data.len() as u64
    );
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), hash.0);
}

#[test]
fn tinyproxy_connect_by_name_is_byte_exact() {
    if !available("tinyproxy", "tinyproxy") {
        return;
    }
    let origin = origin();
    let proxy = tinyproxy();
    let served = Served::start(&policy(proxy.addr, proxy.addr, origin.port(), "http"), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("localhost", T).expect("allowed name");
    let h = established(&mut net, addr, origin.port());
    // tinyproxy tears a tunnel down when either side half-closes, so no half-close here.
    echo_and_check(&mut net, h);
    net.tcp(h).close();
    assert!(net
        .run_until(T, |_| served.counters.flows(FlowEvent::Closed) == 1)
        .unwrap());
}

#[test]
fn tinyproxy_connect_to_an_ip_literal_named_by_cidr() {
    if !available("tinyproxy", "tinyproxy") {
        return;
    }
    let origin = origin();
    let proxy = tinyproxy();
    let served = Served::start(&policy(proxy.addr, proxy.addr, origin.port(), "http"), true);
    let mut net = guest_net(&served);
    let h = established(&mut net, Ipv4Addr::LOCALHOST, origin.port());
    send_all(&mut net, h, b"Eliteral");
    assert_eq!(recv_exact(&mut net, h, 7), b"literal");
}

#[test]
fn explicit_proxy_port_tunnels_through_tinyproxy() {
    if !available("tinyproxy", "tinyproxy") {
        return;
    }
    let origin = origin();
    let proxy = tinyproxy();
    let served = Served::start(&policy(proxy.addr, proxy.addr, origin.port(), "http"), true);
    let mut net = guest_net(&served);
    // The guest talks to the gateway's proxy port and speaks HTTP proxy protocol itself.
    let h = established(&mut net, GW, 3128);
    let port = origin.port();
    send_all(
        &mut net,
        h,
        format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes(),
    );
    let mut head = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(h);
        while !head.ends_with(b"\r\n\r\n") && s.can_recv() {
            let mut b = [0u8; 1];
            if s.recv_slice(&mut b).is_err() {
                break;
            }
            head.push(b[0]);
        }
        head.ends_with(b"\r\n\r\n")
    })
    .unwrap();
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    send_all(&mut net, h, b"Espliced");
    assert_eq!(recv_exact(&mut net, h, 7), b"spliced");
}

#[test]
fn dante_socks5_connect_by_name_is_byte_exact() {
    if !available("danted", "dante-server") {
        return;
    }
    let origin = origin();
    let socks = dante();
    let served = Served::start(
        &policy(socks.addr, socks.addr, origin.port(), "socks5"),
        true,
    );
    let mut net = guest_net(&served);
    let addr = net.resolve_a("localhost", T).expect("allowed name");
    let h = established(&mut net, addr, origin.port());
    upload_and_check(&mut net, h);
    // The guest keeps running its stack so the last ACKs flow and moat retires the flow.
    assert!(net
        .run_until(T, |_| served.counters.flows(FlowEvent::Closed) == 1)
        .unwrap());
}

#[test]
fn dante_refusing_a_destination_resets_the_guest() {
    if !available("danted", "dante-server") {
        return;
    }
    let socks = dante();
    // 203.0.113.0/24 is allowed by moat's policy here, but dante only relays to loopback.
    let text = policy(socks.addr, socks.addr, 80, "socks5")
        .replace("\"127.0.0.1/32\"", "\"203.0.113.0/24\"");
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    let h = net.tcp_connect(Ipv4Addr::new(203, 0, 113, 80), 80);
    let mut opened = false;
    net.run_until(T, |n| {
        opened |= n.tcp(h).state() == State::Established;
        n.tcp(h).state() == State::Closed
    })
    .unwrap();
    assert!(!opened);
    assert_eq!(net.tcp(h).state(), State::Closed, "reset");
    eventually("proxy failure counted", || {
        served.counters.flows(FlowEvent::ProxyFailed) == 1
    });
}

/// A UDP echo server on loopback.
fn udp_echo() -> SocketAddr {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    addr
}

#[test]
fn dante_udp_associate_carries_datagrams_both_ways() {
    if !available("danted", "dante-server") {
        return;
    }
    let echo = udp_echo();
    let socks = dante();
    let text = format!(
        "[vm]\nname = \"udp\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nsocks5 = \"{}\"\n[[outbound]]\nprotocol = \"udp\"\nports = [{}]\nto = [\"localhost\", \"127.0.0.1/32\"]\n\
         [dns]\nallow = [\"localhost\"]\n",
        socks.addr,
        echo.port()
    );
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    let dst = net.resolve_a("localhost", T).expect("allowed name");
    let h = net.udp_bind(40123);
    let endpoint = smoltcp::wire::IpEndpoint::new(smoltcp::wire::IpAddress::Ipv4(dst), echo.port());
    let datagrams: Vec<Vec<u8>> = (0..5u8)
        .map(|i| support::proxy::pattern(u64::from(i) * 1000, 200 + usize::from(i) * 100))
        .collect();
    for d in &datagrams {
        net.udp(h).send_slice(d, endpoint).unwrap();
    }
    let mut echoed: Vec<Vec<u8>> = Vec::new();
    net.run_until(T, |n| {
        while let Ok((data, meta)) = n.udp(h).recv() {
            assert_eq!(
                meta.endpoint, endpoint,
                "replies come from the destination the guest used"
            );
            echoed.push(data.to_vec());
        }
        echoed.len() == datagrams.len()
    })
    .unwrap();
    echoed.sort();
    let mut want = datagrams.clone();
    want.sort();
    assert_eq!(echoed, want, "every datagram echoed byte for byte");
    // UDP to a destination no rule names: dropped, nothing comes back.
    let other = smoltcp::wire::IpEndpoint::new(
        smoltcp::wire::IpAddress::Ipv4(Ipv4Addr::new(198, 51, 100, 1)),
        echo.port(),
    );
    net.udp(h).send_slice(b"nope", other).unwrap();
    net.run_until(Duration::from_millis(500), |_| false)
        .unwrap();
    assert!(net.udp(h).recv().is_err());
    assert!(
        served
            .counters
            .drops(moat::telemetry::DropReason::NotAllowed)
            >= 1
    );
}

/// What became of a connection moat must not carry: it is never answered (SYN dropped),
/// or it opens and is reset once its first bytes name nothing the policy allows. Never
/// does a byte come back.
fn refused(net: &mut GuestNet, dst: Ipv4Addr, port: u16, first: &[u8]) -> &'static str {
    let h = net.tcp_connect(dst, port);
    let opened = net
        .run_until(Duration::from_millis(1500), |n| {
            matches!(n.tcp(h).state(), State::Established | State::Closed)
        })
        .unwrap();
    let outcome = match net.tcp(h).state() {
        State::SynSent if !opened => "dropped",
        State::Closed => "reset at once",
        State::Established => {
            send_all(net, h, first);
            let mut back = Vec::new();
            assert!(
                net.run_until(T, |n| {
                    let s = n.tcp(h);
                    tcp_drain(s, |d| {
                        back.extend_from_slice(d);
                    });
                    s.state() == State::Closed
                })
                .unwrap(),
                "{dst}:{port} {:?}: carried, still {:?}",
                String::from_utf8_lossy(first),
                net.tcp(h).state()
            );
            assert!(
                back.is_empty(),
                "{dst}:{port}: {} bytes came back",
                back.len()
            );
            "reset after its first bytes"
        }
        other => panic!("{dst}:{port}: {other:?}"),
    };
    net.remove(h);
    outcome
}

/// The guest speaks HTTP proxy protocol to gateway:3128 and gets back: the status line
/// (`None` if the connection closed without one).
fn explicit_request(net: &mut GuestNet, request: &str) -> Option<String> {
    let h = established(net, GW, 3128);
    send_all(net, h, request.as_bytes());
    let mut head = Vec::new();
    net.tcp_recv(h, T, |d| {
        head.extend_from_slice(d);
        head.windows(2).any(|w| w == b"\r\n")
    })
    .unwrap();
    net.tcp(h).abort();
    net.poll(Duration::ZERO).unwrap();
    net.remove(h);
    let head = String::from_utf8_lossy(&head).to_string();
    head.lines().next().map(str::to_string)
}

/// tinyproxy's own log is the witness: of every attempt the policy forbids (names and
/// addresses it does not allow, reserved ranges, other ports, the explicit proxy port
/// asked for forbidden targets), none reached it; the one allowed flow did, and is the
/// only connection and request tinyproxy ever saw.
#[test]
fn tinyproxy_never_sees_what_the_policy_forbids() {
    if !available("tinyproxy", "tinyproxy") {
        return;
    }
    let origin = origin();
    let proxy = tinyproxy();
    let port = origin.port();
    let served = Served::start(&policy(proxy.addr, proxy.addr, port, "http"), true);
    let mut net = guest_net(&served);
    let local = net.resolve_a("localhost", T).expect("allowed name");
    let evil = net.resolve("evil.test", T).unwrap();
    assert!(evil.is_nxdomain(), "{evil:?}");
    let forbidden: Vec<(Ipv4Addr, u16, Vec<u8>)> = vec![
        // IP literals no CIDR covers, named (or not) by their first bytes.
        (
            Ipv4Addr::new(198, 51, 100, 7),
            port,
            b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_vec(),
        ),
        (
            Ipv4Addr::new(198, 51, 100, 8),
            port,
            moat_sim::craft::tls_client_hello("evil.test"),
        ),
        (
            Ipv4Addr::new(198, 51, 100, 9),
            port,
            b"\x00\x01 nameless".to_vec(),
        ),
        // The allowed name and the allowed loopback CIDR, on a port no rule has.
        (local, 22, b"E".to_vec()),
        (Ipv4Addr::LOCALHOST, 22, b"E".to_vec()),
        // Reserved ranges and another VM.
        (Ipv4Addr::new(169, 254, 169, 254), port, b"E".to_vec()),
        (Ipv4Addr::new(192, 168, 1, 1), port, b"E".to_vec()),
        (Ipv4Addr::new(10, 0, 0, 3), port, b"E".to_vec()),
        // A synthetic address moat never handed out.
        (Ipv4Addr::new(198, 18, 99, 99), port, b"E".to_vec()),
    ];
    for (dst, p, first) in &forbidden {
        let outcome = refused(&mut net, *dst, *p, first);
        eprintln!("{dst}:{p}: {outcome}");
    }
    for request in [
        format!("CONNECT evil.test:{port} HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n"),
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n".to_string(),
        format!("CONNECT 192.0.2.1:{port} HTTP/1.1\r\nHost: 192.0.2.1:{port}\r\n\r\n"),
        format!("GET http://evil.test:{port}/ HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n"),
    ] {
        let status = explicit_request(&mut net, &request);
        let first = request.lines().next().unwrap_or_default();
        assert!(
            !status.as_deref().unwrap_or_default().contains(" 200 "),
            "explicit proxy port: {first} answered {status:?}"
        );
    }
    // The control: the allowed flow reaches tinyproxy (and the log shows it).
    let h = established(&mut net, local, port);
    send_all(&mut net, h, b"Eallowed");
    assert_eq!(recv_exact(&mut net, h, 7), b"allowed");
    // (`localhost` is loopback: moat names the flow 127.0.0.1, or localhost by DNS.)
    let allowed = [
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1"),
        format!("CONNECT localhost:{port} HTTP/1.1"),
    ];
    let (connects, requests) = wait_for("tinyproxy logs the allowed request", DEADLINE, || {
        let seen = support::peers::tinyproxy_seen(&proxy);
        (!seen.1.is_empty()).then_some(seen)
    });
    assert!(
        connects == 1 && requests.len() == 1 && allowed.contains(&requests[0]),
        "tinyproxy saw something besides the allowed flow:\n{}",
        proxy.log()
    );
}

/// dante's own log is the witness for SOCKS5: what the policy forbids (TCP and UDP) never
/// reached it; the allowed TCP flow and UDP association did.
#[test]
fn dante_never_sees_what_the_policy_forbids() {
    if !available("danted", "dante-server") {
        return;
    }
    let origin = origin();
    let echo = udp_echo();
    let socks = dante();
    let port = origin.port();
    let text = format!(
        "[vm]\nname = \"socks\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nsocks5 = \"{s}\"\n\
         [[outbound]]\nprotocol = \"tcp\"\nports = [{port}]\nto = [\"127.0.0.1/32\"]\nvia = \"socks5\"\n\
         [[outbound]]\nprotocol = \"udp\"\nports = [{u}]\nto = [\"127.0.0.1/32\"]\n",
        s = socks.addr,
        u = echo.port()
    );
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    for (dst, p, first) in [
        (
            Ipv4Addr::new(198, 51, 100, 7),
            port,
            b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_vec(),
        ),
        (Ipv4Addr::LOCALHOST, 22, b"E".to_vec()),
        (Ipv4Addr::new(169, 254, 169, 254), port, b"E".to_vec()),
        (Ipv4Addr::new(10, 0, 0, 3), port, b"E".to_vec()),
    ] {
        let outcome = refused(&mut net, dst, p, &first);
        eprintln!("{dst}:{p}: {outcome}");
    }
    let h = net.udp_bind(40124);
    for (dst, p) in [
        (Ipv4Addr::new(198, 51, 100, 1), echo.port()),
        (Ipv4Addr::LOCALHOST, echo.port() ^ 1),
        (Ipv4Addr::new(169, 254, 169, 254), echo.port()),
    ] {
        let to = smoltcp::wire::IpEndpoint::new(smoltcp::wire::IpAddress::Ipv4(dst), p);
        net.udp(h).send_slice(b"nope", to).unwrap();
    }
    net.run_until(Duration::from_millis(500), |_| false)
        .unwrap();
    assert!(net.udp(h).recv().is_err(), "no reply to forbidden UDP");
    let before = dante_seen(&socks.log());
    assert_eq!(
        before,
        (0, vec![]),
        "dante saw forbidden attempts:\n{}",
        socks.log()
    );
    // The controls: the allowed TCP flow and UDP association reach dante, and its log shows it.
    let t = established(&mut net, Ipv4Addr::LOCALHOST, port);
    send_all(&mut net, t, b"Eallowed");
    assert_eq!(recv_exact(&mut net, t, 7), b"allowed");
    let to = smoltcp::wire::IpEndpoint::new(
        smoltcp::wire::IpAddress::Ipv4(Ipv4Addr::LOCALHOST),
        echo.port(),
    );
    net.udp(h).send_slice(b"allowed", to).unwrap();
    let mut back = None;
    net.run_until(T, |n| {
        back = n.udp(h).recv().ok().map(|(d, _)| d.to_vec());
        back.is_some()
    })
    .unwrap();
    assert_eq!(back.as_deref(), Some(&b"allowed"[..]));
    let want = vec![
        format!("tcp/connect -> 127.0.0.1.{port}"),
        "udp/udpassociate".to_string(),
    ];
    let seen = wait_for("dante logs the allowed flows", DEADLINE, || {
        let seen = dante_seen(&socks.log());
        (seen.1.len() >= 2).then_some(seen)
    });
    assert_eq!(
        seen,
        (2, want),
        "dante saw only the allowed flow and association:\n{}",
        socks.log()
    );
}

/// What dante's log (`log: connect`) says reached it: client connections accepted (less the
/// start-up probe), and each SOCKS request it passed, as `tcp/connect -> ADDR.PORT` or
/// `udp/udpassociate`.
fn dante_seen(log: &str) -> (usize, Vec<String>) {
    let accepts = log.lines().filter(|l| l.contains(": tcp/accept [")).count();
    let requests = log
        .lines()
        .filter_map(|l| {
            if l.contains(": udp/udpassociate [") {
                Some("udp/udpassociate".to_string())
            } else {
                let (_, rest) = l.split_once(": tcp/connect [")?;
                let dst = rest.split_whitespace().skip_while(|w| *w != "->").nth(2)?;
                Some(format!("tcp/connect -> {dst}"))
            }
        })
        .collect();
    (accepts.saturating_sub(1), requests)
}

/// Naming by the flow's first bytes, seen by a real proxy: an IP-literal flow whose HTTP
/// Host or TLS SNI names an allowed host goes to tinyproxy as CONNECT to that name (its log
/// shows it). tinyproxy cannot reach those names (it connects only to loopback) and answers
/// 502; a tinyproxy that allows CONNECT only to port 443 answers 403. Either refusal of a
/// real proxy resets the guest's connection and is counted.
#[test]
fn tinyproxy_sees_flows_named_by_host_and_sni_and_its_refusals_reset_the_guest() {
    if !available("tinyproxy", "tinyproxy") {
        return;
    }
    let origin = origin();
    let port = origin.port();
    let text = |proxy: SocketAddr| {
        policy(proxy, proxy, port, "http").replace(
            "to = [\"localhost\", \"127.0.0.1/32\"]",
            "to = [\"*.example.com\", \"127.0.0.1/32\"]",
        )
    };
    let proxy = tinyproxy();
    let served = Served::start(&text(proxy.addr), true);
    let mut net = guest_net(&served);
    for (dst, first, want) in [
        (
            Ipv4Addr::new(198, 51, 100, 20),
            b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n".to_vec(),
            format!("CONNECT www.example.com:{port} HTTP/1.1"),
        ),
        (
            Ipv4Addr::new(198, 51, 100, 21),
            moat_sim::craft::tls_client_hello("api.example.com"),
            format!("CONNECT api.example.com:{port} HTTP/1.1"),
        ),
    ] {
        let outcome = refused(&mut net, dst, port, &first);
        assert_eq!(outcome, "reset after its first bytes", "{want}");
        wait_for(&format!("tinyproxy's log shows {want}"), DEADLINE, || {
            support::peers::tinyproxy_seen(&proxy)
                .1
                .contains(&want)
                .then_some(())
        });
    }
    eventually("both refusals counted", || {
        served.counters.flows(FlowEvent::ProxyFailed) == 2
    });

    // ConnectPort 443: tinyproxy refuses CONNECT to the origin's port with 403.
    let strict = support::peers::tinyproxy_with(support::peers::free_port(), "ConnectPort 443");
    let served = Served::start(&text(strict.addr), true);
    let mut net = guest_net(&served);
    let h = net.tcp_connect(Ipv4Addr::LOCALHOST, port);
    let mut opened = false;
    assert!(net
        .run_until(T, |n| {
            opened |= n.tcp(h).state() == State::Established;
            n.tcp(h).state() == State::Closed
        })
        .unwrap());
    assert!(
        !opened,
        "a refused CONNECT never opens the guest's connection"
    );
    eventually("the refusal counted", || {
        served.counters.flows(FlowEvent::ProxyFailed) == 1
    });
    let refused_line = format!("Refused CONNECT method on port {port}");
    wait_for("tinyproxy's log shows its refusal", DEADLINE, || {
        let log = strict.log();
        let requests = support::peers::tinyproxy_seen(&strict).1;
        (requests == [format!("CONNECT 127.0.0.1:{port} HTTP/1.1")] && log.contains(&refused_line))
            .then_some(())
    });
}

/// `limits.max_flows` counts everything moat holds open for the guest: TCP flows,
/// DNS-over-TCP connections to the gateway and UDP associations, one budget.
#[test]
fn max_flows_counts_dns_over_tcp_connections_and_udp_associations() {
    if !available("danted", "dante-server") {
        return;
    }
    let origin = origin();
    let echo = udp_echo();
    let socks = dante();
    let text = format!(
        "[vm]\nname = \"budget\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nsocks5 = \"{s}\"\n\
         [[outbound]]\nprotocol = \"tcp\"\nports = [{t}]\nto = [\"127.0.0.1/32\"]\nvia = \"socks5\"\n\
         [[outbound]]\nprotocol = \"udp\"\nports = [{u}]\nto = [\"127.0.0.1/32\"]\n\
         [dns]\nallow = [\"a.example\"]\n[limits]\nmax_flows = 3\n",
        s = socks.addr,
        t = origin.port(),
        u = echo.port()
    );
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    let refused_syn = |net: &mut GuestNet, dst: Ipv4Addr, port: u16| {
        let h = net.tcp_connect(dst, port);
        net.run_until(Duration::from_millis(1500), |n| {
            n.tcp(h).state() != State::SynSent
        })
        .unwrap();
        let state = net.tcp(h).state();
        net.remove(h);
        // Past max_flows a SYN is refused at once with a RST (never left waiting).
        state == State::Closed
    };
    // Two DNS-over-TCP connections and one UDP association: the budget of 3 is spent.
    let dns1 = established(&mut net, GW, 53);
    let dns2 = established(&mut net, GW, 53);
    let u = net.udp_bind(40125);
    let to = smoltcp::wire::IpEndpoint::new(
        smoltcp::wire::IpAddress::Ipv4(Ipv4Addr::LOCALHOST),
        echo.port(),
    );
    net.udp(u).send_slice(b"one", to).unwrap();
    let mut back = None;
    net.run_until(T, |n| {
        back = n.udp(u).recv().ok().map(|(d, _)| d.to_vec());
        back.is_some()
    })
    .unwrap();
    assert_eq!(back.as_deref(), Some(&b"one"[..]), "the association works");
    // Nothing more opens: a TCP flow, a third DNS-over-TCP connection, a second association.
    assert!(
        refused_syn(&mut net, Ipv4Addr::LOCALHOST, origin.port()),
        "a TCP flow past the budget"
    );
    assert!(
        refused_syn(&mut net, GW, 53),
        "a DNS-over-TCP connection past the budget"
    );
    let u2 = net.udp_bind(40126);
    net.udp(u2).send_slice(b"two", to).unwrap();
    net.run_until(Duration::from_millis(1500), |_| false)
        .unwrap();
    assert!(
        net.udp(u2).recv().is_err(),
        "a UDP association past the budget"
    );
    assert!(
        served
            .counters
            .drops(moat::telemetry::DropReason::FlowLimit)
            >= 3
    );
    // Give back a DNS-over-TCP connection: a TCP flow fits again.
    net.tcp(dns1).close();
    let _ = dns2;
    let h = wait_for("a TCP flow fits once a connection closed", DEADLINE, || {
        let h = net.tcp_connect(Ipv4Addr::LOCALHOST, origin.port());
        let up = net
            .run_until(Duration::from_secs(2), |n| {
                n.tcp(h).state() == State::Established
            })
            .unwrap();
        if !up {
            net.remove(h);
        }
        up.then_some(h)
    });
    send_all(&mut net, h, b"Efits");
    assert_eq!(recv_exact(&mut net, h, 4), b"fits");
}
