//! moat against the real proxies from Debian: tinyproxy (HTTP CONNECT, and the explicit
//! proxy port) and dante (SOCKS5). Names resolve to loopback at the proxy: the tests use
//! "localhost", which the proxies resolve from /etc/hosts.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use moat::guest::GuestNet;
use moat::telemetry::FlowEvent;
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
            while s.can_recv() {
                let _ = s.recv(|d| {
                    got.update(d);
                    received += d.len();
                    (d.len(), ())
                });
            }
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
    let mut net = GuestNet::new(served.guest(), GUEST_MAC.0, GUEST, 24, GW, 1500);
    let addr = net.resolve("localhost", T).unwrap().expect("allowed name");
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
    let mut net = GuestNet::new(served.guest(), GUEST_MAC.0, GUEST, 24, GW, 1500);
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
    let mut net = GuestNet::new(served.guest(), GUEST_MAC.0, GUEST, 24, GW, 1500);
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
    let mut net = GuestNet::new(served.guest(), GUEST_MAC.0, GUEST, 24, GW, 1500);
    let addr = net.resolve("localhost", T).unwrap().expect("allowed name");
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
    let mut net = GuestNet::new(served.guest(), GUEST_MAC.0, GUEST, 24, GW, 1500);
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
    let mut net = GuestNet::new(served.guest(), GUEST_MAC.0, GUEST, 24, GW, 1500);
    let dst = net.resolve("localhost", T).unwrap().expect("allowed name");
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
