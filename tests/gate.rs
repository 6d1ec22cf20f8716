//! The gate through the real socket, as a hostile guest would try it: names smuggled in the
//! Host header and the TLS server name, requests on the explicit-proxy port, and an upstream
//! resolver that answers allowed names with loopback and metadata addresses. Every forbidden
//! attempt must end at moat (reset, 403, or left out of the answer) and never reach the
//! proxy or the guest; the allowed ones must still work.

mod support;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{rdata::A, Name, RData, Record, RecordType};
use moat::telemetry::{DropReason, FlowEvent};
use moat_sim::guest::GuestNet;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::wire::{IpAddress, IpEndpoint};
use support::peers::{available, tinyproxy};
use support::proxy::{origin, ProxyMode, TestProxy};
use support::*;

const T: Duration = Duration::from_secs(10);

/// Spellings of destinations the gate must refuse under a rule that allows any name.
const SMUGGLED: [&str; 14] = [
    "127.0.0.1",
    "127.1",
    "0x7f000001",
    "2130706433",
    "0177.0.0.1",
    "localhost",
    "db.localhost",
    "LOCALHOST.",
    "169.254.169.254",
    "0xa9fea9fe",
    "10.0.0.1", // the gateway itself
    "192.168.1.1",
    "[::1]",
    "::ffff:7f00:1",
];

fn any_name_policy(proxy: SocketAddr) -> String {
    format!(
        r#"
[vm]
name = "gate"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[proxy]
http = "{proxy}"
explicit_port = 3128
[[outbound]]
protocol = "tcp"
ports = [80, 443]
[dns]
allow = ["example.com", "*.example.com"]
"#
    )
}

fn named_policy(proxy: SocketAddr) -> String {
    any_name_policy(proxy).replace(
        "ports = [80, 443]\n",
        "ports = [80, 443]\nto = [\"example.com\", \"*.example.com\"]\n",
    )
}

fn established(net: &mut GuestNet, dst: Ipv4Addr, port: u16) -> SocketHandle {
    net.tcp_established(dst, port, T)
        .unwrap()
        .unwrap_or_else(|| panic!("{dst}:{port} not established"))
}

/// Send `first` on a new connection to `dst:port`; the connection must be reset by moat
/// without a byte coming back.
fn reset_after(net: &mut GuestNet, dst: Ipv4Addr, port: u16, first: &[u8], what: &str) {
    let h = established(net, dst, port);
    assert!(net.tcp_send_all(h, first, T).unwrap(), "{what}: sent");
    let mut got = Vec::new();
    let closed = net
        .run_until(T, |n| {
            let s = n.tcp(h);
            while let Ok(d) = s.recv(|d| (d.len(), d.to_vec())) {
                if d.is_empty() {
                    break;
                }
                got.extend_from_slice(&d);
            }
            s.state() == State::Closed
        })
        .unwrap();
    assert!(closed, "{what}: reset ({:?})", net.tcp(h).state());
    assert!(got.is_empty(), "{what}: no bytes back, got {got:?}");
    net.remove(h);
}

/// One request on the explicit-proxy port: everything the guest gets back until moat closes
/// or, with `then`, until the echo of those bytes (sent once the reply head is in) arrived.
fn explicit_request(net: &mut GuestNet, request: &[u8], then: Option<&[u8]>) -> String {
    let h = established(net, GW, 3128);
    assert!(net.tcp_send_all(h, request, T).unwrap());
    let mut got = Vec::new();
    let mut sent_then = false;
    net.run_until(T, |n| {
        let s = n.tcp(h);
        while let Ok(d) = s.recv(|d| (d.len(), d.to_vec())) {
            if d.is_empty() {
                break;
            }
            got.extend_from_slice(&d);
        }
        if let Some(more) = then {
            if !sent_then && got.windows(4).any(|w| w == b"\r\n\r\n") && s.can_send() {
                sent_then = s.send_slice(more).is_ok();
            }
            // The origin echoes what follows the mode byte.
            if sent_then && got.ends_with(&more[1..]) {
                return true;
            }
        }
        !s.may_recv() || matches!(s.state(), State::Closed | State::TimeWait)
    })
    .unwrap();
    net.tcp(h).abort();
    net.poll(Duration::from_millis(10)).unwrap();
    net.remove(h);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn names_smuggled_in_host_and_sni_never_reach_the_proxy() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&any_name_policy(proxy.addr), true);
    let mut net = guest_net(&served);
    // A public literal no CIDR covers: only a name can allow it, so moat reads the first bytes.
    let public = Ipv4Addr::new(198, 51, 100, 20);
    for (i, host) in SMUGGLED.iter().enumerate() {
        let http = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        reset_after(
            &mut net,
            public,
            80,
            http.as_bytes(),
            &format!("Host: {host}"),
        );
        let port = if i % 2 == 0 { 443 } else { 80 };
        let hello = moat_sim::craft::tls_client_hello(host);
        reset_after(&mut net, public, port, &hello, &format!("SNI {host}"));
    }
    assert!(
        proxy.requests().is_empty(),
        "nothing reached the proxy: {:?}",
        proxy.requests()
    );
    let c = &served.counters;
    let reserved = c.drops(DropReason::ReservedDestination);
    let bad = c.drops(DropReason::BadDestination);
    assert_eq!(reserved, 2 * 12, "each reserved spelling, Host and SNI");
    assert_eq!(bad, 2 * 2, "each IPv6 spelling, Host and SNI");
    assert_eq!(c.flows(FlowEvent::Opened), 0);
    // The control: an allowed name in Host still goes, by that name.
    let h = established(&mut net, public, 80);
    assert!(net
        .tcp_send_all(h, b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n", T)
        .unwrap());
    assert!(net.run_until(T, |_| proxy.requests().len() == 1).unwrap());
    assert_eq!(proxy.requests(), vec!["www.example.com:80".to_string()]);
}

#[test]
fn explicit_proxy_requests_are_admitted_like_any_flow() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&named_policy(proxy.addr), true);
    let mut net = guest_net(&served);
    let refused: &[(&str, &str)] = &[
        (
            "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n",
            "reserved_destination",
        ),
        (
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
            "reserved_destination",
        ),
        (
            "CONNECT localhost:22 HTTP/1.1\r\n\r\n",
            "reserved_destination",
        ),
        (
            "CONNECT 0x7f000001:443 HTTP/1.1\r\n\r\n",
            "reserved_destination",
        ),
        (
            "CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n",
            "reserved_destination",
        ),
        ("CONNECT evil.test:443 HTTP/1.1\r\n\r\n", "not_allowed"),
        ("CONNECT www.example.com:22 HTTP/1.1\r\n\r\n", "not_allowed"),
        ("CONNECT 203.0.113.5:443 HTTP/1.1\r\n\r\n", "not_allowed"),
        ("CONNECT [::1]:443 HTTP/1.1\r\n\r\n", "bad_destination"),
        (
            "GET http://127.0.0.1:2375/version HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
            "reserved_destination",
        ),
        (
            "GET http://2130706433:80/ HTTP/1.1\r\n\r\n",
            "reserved_destination",
        ),
        (
            "GET http://metadata.localhost/ HTTP/1.1\r\n\r\n",
            "reserved_destination",
        ),
        ("GET http://evil.test/ HTTP/1.1\r\n\r\n", "not_allowed"),
    ];
    for (request, reason) in refused {
        let got = explicit_request(&mut net, request.as_bytes(), None);
        assert!(
            got.starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{request:?}: {got:?}"
        );
        assert!(
            got.ends_with(&format!("moat: {reason}\n")),
            "{request:?}: {got:?}"
        );
    }
    for request in [
        "GET /relative HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
        "GET https://www.example.com/ HTTP/1.1\r\n\r\n",
        "CONNECT www.example.com HTTP/1.1\r\n\r\n",
    ] {
        let got = explicit_request(&mut net, request.as_bytes(), None);
        assert!(
            got.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{request:?}: {got:?}"
        );
    }
    assert!(
        proxy.requests().is_empty(),
        "nothing reached the proxy: {:?}",
        proxy.requests()
    );
    let c = &served.counters;
    assert_eq!(c.drops(DropReason::ExplicitProxyMalformed), 3);
    assert_eq!(c.drops(DropReason::BadDestination), 1);
    assert_eq!(c.drops(DropReason::NotAllowed), 4);
    assert_eq!(c.drops(DropReason::ReservedDestination), 8);

    // Allowed: a CONNECT tunnel (echoed by the origin), and an absolute-form GET that the
    // origin receives in origin-form.
    let got = explicit_request(
        &mut net,
        b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n\r\n",
        Some(b"Etunnel"),
    );
    assert_eq!(got, "HTTP/1.1 200 Connection established\r\n\r\ntunnel");
    let got = explicit_request(
        &mut net,
        b"GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nProxy-Connection: keep-alive\r\n\r\n",
        None,
    );
    assert!(
        got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("ok"),
        "{got:?}"
    );
    assert_eq!(
        proxy.requests(),
        vec![
            "www.example.com:443".to_string(),
            "api.example.com:80".to_string()
        ]
    );
}

#[test]
fn a_refusing_proxy_behind_the_explicit_port_is_a_502_not_a_reset() {
    let proxy = TestProxy::start(ProxyMode::Refuse(403), origin());
    let served = Served::start(&named_policy(proxy.addr), true);
    let mut net = guest_net(&served);
    let got = explicit_request(
        &mut net,
        b"CONNECT www.example.com:443 HTTP/1.1\r\n\r\n",
        None,
    );
    assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got:?}");
    assert_eq!(proxy.requests(), vec!["www.example.com:443".to_string()]);
}

/// The real proxy's own log is the witness: forbidden explicit-port requests and smuggled
/// names never reach tinyproxy; the allowed request does.
#[test]
fn tinyproxy_never_sees_what_the_gate_refuses() {
    if !available("tinyproxy", "tinyproxy") {
        return;
    }
    let origin = origin();
    let proxy = tinyproxy();
    let text = any_name_policy(proxy.addr)
        .replace(
            "ports = [80, 443]",
            &format!("ports = [80, 443, {}]", origin.port()),
        )
        .replace(
            "[dns]",
            &format!(
                "[[outbound]]\nprotocol = \"tcp\"\nports = [{}]\nto = [\"127.0.0.1/32\"]\n[dns]",
                origin.port()
            ),
        );
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    for request in [
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
        "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n",
        "GET http://0x7f000001:2375/version HTTP/1.1\r\n\r\n",
    ] {
        let got = explicit_request(&mut net, request.as_bytes(), None);
        assert!(got.starts_with("HTTP/1.1 403"), "{request:?}: {got:?}");
    }
    reset_after(
        &mut net,
        Ipv4Addr::new(198, 51, 100, 9),
        80,
        b"GET / HTTP/1.1\r\nHost: 127.1\r\n\r\n",
        "Host: 127.1",
    );
    // The control: loopback named by a CIDR goes through tinyproxy (by address).
    let port = origin.port();
    let got = explicit_request(
        &mut net,
        format!("CONNECT localhost:{port} HTTP/1.1\r\n\r\n").as_bytes(),
        Some(b"Ewitness"),
    );
    assert!(got.ends_with("witness"), "{got:?}");
    let log = proxy.log();
    assert!(
        log.contains(&format!("127.0.0.1:{port}")),
        "the allowed request is in tinyproxy's log:\n{log}"
    );
    for never in [":22", "169.254.169.254", ":2375", "0x7f000001", "127.1 "] {
        assert!(!log.contains(never), "{never} reached tinyproxy:\n{log}");
    }
}

/// A resolver stand-in on loopback that records moat's queries and answers as told.
struct Resolver {
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<Message>>>,
}

#[derive(Clone, Copy)]
enum Answer {
    /// These addresses for every question.
    With(&'static [Ipv4Addr]),
    /// A correct answer under the wrong id.
    WrongId,
    /// A correct answer, sent from another socket.
    OtherSource,
}

impl Resolver {
    fn start(answer: Answer) -> Resolver {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&queries);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                seen.lock().unwrap().push(q.clone());
                let addrs: &[Ipv4Addr] = match answer {
                    Answer::With(a) => a,
                    _ => &[Ipv4Addr::new(203, 0, 113, 77)],
                };
                let id = match answer {
                    Answer::WrongId => q.metadata.id.wrapping_add(1),
                    _ => q.metadata.id,
                };
                let mut r = Message::response(id, q.metadata.op_code);
                r.metadata.message_type = MessageType::Response;
                for query in &q.queries {
                    r.add_query(query.clone());
                    for a in addrs {
                        r.add_answer(Record::from_rdata(
                            query.name().clone(),
                            30,
                            RData::A(A(*a)),
                        ));
                    }
                }
                let out = if matches!(answer, Answer::OtherSource) {
                    &other
                } else {
                    &sock
                };
                let _ = out.send_to(&r.to_vec().unwrap(), from);
            }
        });
        Resolver { addr, queries }
    }

    fn queries(&self) -> Vec<Message> {
        self.queries.lock().unwrap().clone()
    }
}

/// The proxy of the upstream-mode tests: nothing listens there (they open no flow).
const NO_PROXY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9);

const LOOPBACK: &[Ipv4Addr] = &[Ipv4Addr::new(127, 0, 0, 1)];
const PUBLIC: &[Ipv4Addr] = &[Ipv4Addr::new(203, 0, 113, 77)];

/// A raw query from the guest: its own id, flags and an EDNS record moat must not forward.
/// Returns the reply, if any came within `wait`.
fn raw_query(net: &mut GuestNet, id: u16, name: &str, wait: Duration) -> Option<Message> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.metadata.checking_disabled = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    q.set_edns(hickory_proto::op::Edns::new());
    let port = 40000 + id % 1000;
    let h = net.udp_bind(port);
    let server = IpEndpoint::new(IpAddress::Ipv4(GW), 53);
    net.udp(h).send_slice(&q.to_vec().unwrap(), server).unwrap();
    let mut reply = None;
    net.run_until(wait, |n| {
        if let Ok((data, _)) = n.udp(h).recv() {
            reply = Message::from_vec(data).ok();
        }
        reply.is_some()
    })
    .unwrap();
    net.remove(h);
    reply
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn upstream_answers_into_reserved_ranges_never_reach_the_guest() {
    const MIXED: &[Ipv4Addr] = &[
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(203, 0, 113, 77),
    ];
    let resolver = Resolver::start(Answer::With(MIXED));
    let served = Served::start(&upstream_policy(resolver.addr, NO_PROXY), true);
    let mut net = guest_net(&served);
    let reply = raw_query(&mut net, 0x4242, "www.example.com", T).expect("an answer");
    assert_eq!(reply.metadata.id, 0x4242, "under the guest's id");
    assert_eq!(a_records(&reply), vec![Ipv4Addr::new(203, 0, 113, 77)]);
    assert_eq!(reply.queries.len(), 1);
    assert_eq!(
        served.counters.drops(DropReason::DnsAnswerReserved),
        3,
        "loopback, metadata and private answers left out"
    );
    // Only reserved answers: an empty answer, and the addresses name nothing.
    let only_bad = Resolver::start(Answer::With(LOOPBACK));
    let served = Served::start(&upstream_policy(only_bad.addr, NO_PROXY), true);
    let mut net = guest_net(&served);
    let reply = raw_query(&mut net, 7, "rebind.example.com", T).expect("an answer");
    assert!(a_records(&reply).is_empty(), "{reply:?}");
    // A flow to the address the resolver gave is a plain reserved literal: refused.
    let h = net.tcp_connect(Ipv4Addr::new(127, 0, 0, 1), 443);
    net.run_until(Duration::from_millis(800), |_| false)
        .unwrap();
    assert_eq!(net.tcp(h).state(), State::SynSent, "no answer to the SYN");
    assert!(served.counters.drops(DropReason::ReservedDestination) >= 1);
}

#[test]
fn moat_asks_its_own_question_and_relays_only_the_matching_reply() {
    let resolver = Resolver::start(Answer::With(PUBLIC));
    let served = Served::start(&upstream_policy(resolver.addr, NO_PROXY), true);
    let mut net = guest_net(&served);
    for (i, id) in [0x1111u16, 0x1112, 0x1113].into_iter().enumerate() {
        let name = format!("h{i}.example.com");
        let reply = raw_query(&mut net, id, &name, T).expect("an answer");
        assert_eq!(reply.metadata.id, id);
        assert_eq!(a_records(&reply), vec![Ipv4Addr::new(203, 0, 113, 77)]);
    }
    let asked = resolver.queries();
    assert_eq!(asked.len(), 3, "{asked:?}");
    for (i, q) in asked.iter().enumerate() {
        assert_eq!(q.queries.len(), 1);
        assert_eq!(q.queries[0].query_type(), RecordType::A);
        assert_eq!(q.queries[0].name().to_ascii(), format!("h{i}.example.com."));
        assert!(q.edns.is_none(), "the guest's EDNS record is not forwarded");
        assert!(!q.metadata.checking_disabled, "nor its flags");
    }
    let ids: Vec<u16> = asked.iter().map(|q| q.metadata.id).collect();
    let sequential = ids.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
    assert!(!sequential, "ids are random, not a counter: {ids:?}");
    // A not-allowed name never leaves.
    let reply = raw_query(&mut net, 9, "evil.test", T).expect("NXDOMAIN");
    assert_eq!(
        reply.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    assert_eq!(resolver.queries().len(), 3);

    for (mode, what) in [
        (Answer::WrongId, "a reply under another id"),
        (Answer::OtherSource, "a reply from another address"),
    ] {
        let resolver = Resolver::start(mode);
        let served = Served::start(&upstream_policy(resolver.addr, NO_PROXY), true);
        let mut net = guest_net(&served);
        let reply = raw_query(&mut net, 5, "www.example.com", Duration::from_millis(1500));
        assert!(reply.is_none(), "{what} is not relayed: {reply:?}");
        assert_eq!(resolver.queries().len(), 1, "{what}: asked once");
        eventually(what, || {
            served.counters.drops(DropReason::DnsUpstreamMismatch) >= 1
        });
    }
}

/// A reload judges each flow again by how it was admitted: a flow of a run-time forward
/// survives (it used to be reset by every reload), an explicit-port tunnel is reset when the
/// port is gone, and one whose destination is still allowed survives.
#[test]
fn reload_readmits_flows_by_how_they_were_admitted() {
    use std::io::{Read, Write};
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let text = named_policy(proxy.addr);
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    // A run-time forward, and a flow through it.
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    served
        .vm
        .add_forward(&listen.to_string(), "3000")
        .expect("forward added");
    let guest_side = net.tcp_listen(3000);
    net.poll(Duration::from_millis(50)).unwrap();
    let mut host = std::net::TcpStream::connect(listen).expect("moat listens");
    host.set_read_timeout(Some(T)).unwrap();
    assert!(net
        .run_until(T, |n| n.tcp(guest_side).state() == State::Established)
        .unwrap());
    // An explicit-port tunnel, and a transparent flow by name.
    let tunnel = established(&mut net, GW, 3128);
    assert!(net
        .tcp_send_all(tunnel, b"CONNECT www.example.com:443 HTTP/1.1\r\n\r\n", T)
        .unwrap());
    let mut head = Vec::new();
    net.run_until(T, |n| {
        let _ = n.tcp(tunnel).recv(|d| {
            head.extend_from_slice(d);
            (d.len(), ())
        });
        head.ends_with(b"\r\n\r\n")
    })
    .unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    let name = net.resolve_a("api.example.com", T).expect("allowed");
    let by_name = established(&mut net, name, 443);
    eventually("three flows open", || {
        served.counters.flows(FlowEvent::Opened) == 3
    });

    // The explicit port goes away; the rule stays.
    std::fs::write(
        served.dir.path().join("vm.toml"),
        text.replace("explicit_port = 3128\n", ""),
    )
    .unwrap();
    let reloaded = served.vm.reload().expect("reload");
    assert_eq!(reloaded.flows_reset, 1, "only the explicit-port tunnel");
    assert!(net
        .run_until(T, |n| n.tcp(tunnel).state() == State::Closed)
        .unwrap());
    assert_eq!(net.tcp(by_name).state(), State::Established);
    // The forward still carries bytes both ways.
    host.write_all(b"still here").unwrap();
    let mut got = Vec::new();
    net.run_until(T, |n| {
        let _ = n.tcp(guest_side).recv(|d| {
            got.extend_from_slice(d);
            (d.len(), ())
        });
        got.len() >= 10
    })
    .unwrap();
    assert_eq!(got, b"still here");
    net.tcp(guest_side).send_slice(b"yes").unwrap();
    // The guest's stack sends while it runs; the host reads it after.
    net.run_until(Duration::from_millis(300), |_| false)
        .unwrap();
    let mut reply = [0u8; 3];
    host.read_exact(&mut reply)
        .expect("the guest's reply over the forward");
    assert_eq!(&reply, b"yes");
}

/// A client that sends its request and half-closes at once (`printf ... | nc`) is answered
/// at once: the explicit-proxy front judges the request it has, a sniffed flow is named by
/// the bytes it has; nothing waits for the sniffing timeout.
#[test]
fn half_closing_clients_are_judged_on_what_they_sent() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&any_name_policy(proxy.addr), true);
    let mut net = guest_net(&served);
    let ask = |net: &mut GuestNet, dst: Ipv4Addr, port: u16, request: &[u8]| {
        let h = established(net, dst, port);
        assert!(net.tcp_send_all(h, request, T).unwrap());
        net.tcp(h).close();
        let started = std::time::Instant::now();
        let mut got = Vec::new();
        net.run_until(T, |n| {
            let s = n.tcp(h);
            while let Ok(d) = s.recv(|d| (d.len(), d.to_vec())) {
                if d.is_empty() {
                    break;
                }
                got.extend_from_slice(&d);
            }
            matches!(s.state(), State::Closed | State::TimeWait)
        })
        .unwrap();
        net.remove(h);
        (
            String::from_utf8_lossy(&got).into_owned(),
            started.elapsed(),
        )
    };
    let (got, took) = ask(&mut net, GW, 3128, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 403 Forbidden"), "{got:?}");
    assert!(
        took < Duration::from_secs(4),
        "answered, not timed out: {took:?}"
    );
    let (got, _) = ask(&mut net, GW, 3128, b"CONNECT www.exam");
    assert!(got.starts_with("HTTP/1.1 400 Bad Request"), "{got:?}");
    // An allowed name, half-closed: it goes to the proxy, and the origin's answer comes back.
    let (got, _) = ask(
        &mut net,
        Ipv4Addr::new(198, 51, 100, 20),
        80,
        b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
    );
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("ok"),
        "{got:?}"
    );
    assert_eq!(proxy.requests(), vec!["www.example.com:80".to_string()]);
}
