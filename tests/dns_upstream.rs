//! `dns.mode = "upstream"` against a real resolver: dnsmasq on loopback (answers only from
//! its own `--address` records, logs every query it gets), and small UDP stand-ins for
//! what dnsmasq will not do (stay silent, reply under another id, from another address, to
//! another question). Allowed names resolve through the resolver; other names are NXDOMAIN
//! and never reach it; a resolver that is down or silent gets the guest no answer (or
//! SERVFAIL), never a made-up one, and moat keeps serving; a reply that is not the answer
//! to moat's question is not relayed.

mod support;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{rdata::A, Name, RData, Record};
use moat_sim::guest::{GuestError, GuestNet, ResponseCode};
use support::peers::{available, dnsmasq, dnsmasq_on, dnsmasq_queries};
use support::proxy::{origin, ProxyMode, TestProxy};
use support::*;

const T: Duration = Duration::from_secs(10);
const WWW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const API: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const RECORDS: &[(&str, Option<Ipv4Addr>)] = &[
    ("www.example.com", Some(WWW)),
    ("api.example.com", Some(API)),
    ("missing.example.com", None),
];

/// What a resolver that is down or silent may give the guest: nothing, or SERVFAIL, never
/// an address.
fn no_answer(net: &mut GuestNet, name: &str, within: Duration) -> String {
    match net.resolve(name, within) {
        Err(GuestError::DnsTimeout { .. }) => "no answer".to_string(),
        Ok(r) if r.rcode == ResponseCode::ServFail && r.addrs.is_empty() => "SERVFAIL".to_string(),
        other => panic!("{name}: expected no answer or SERVFAIL, got {other:?}"),
    }
}

#[test]
fn allowed_names_resolve_through_dnsmasq_and_other_names_never_reach_it() {
    if !available("dnsmasq", "dnsmasq") {
        return;
    }
    let resolver = dnsmasq(RECORDS);
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&upstream_policy(resolver.addr, proxy.addr), true);
    let mut net = guest_net(&served);

    let www = net.resolve("www.example.com", T).unwrap();
    assert_eq!((www.rcode, www.addrs), (ResponseCode::NoError, vec![WWW]));
    let api = net.resolve("api.example.com", T).unwrap();
    assert_eq!((api.rcode, api.addrs), (ResponseCode::NoError, vec![API]));
    let missing = net.resolve("missing.example.com", T).unwrap();
    assert!(
        missing.is_nxdomain(),
        "dnsmasq's NXDOMAIN relayed: {missing:?}"
    );
    // Not allowed: moat answers NXDOMAIN itself, and the resolver never hears of them.
    for name in ["evil.test", "www.example.com.evil.test", "wwwexample.com"] {
        let reply = net.resolve(name, T).unwrap();
        assert!(reply.is_nxdomain(), "{name}: {reply:?}");
    }
    let asked = wait_for("dnsmasq logged three queries", DEADLINE, || {
        let q = dnsmasq_queries(&resolver);
        (q.len() >= 3).then_some(q)
    });
    assert_eq!(
        asked,
        ["www.example.com", "api.example.com", "missing.example.com"],
        "only the allowed names reached dnsmasq:\n{}",
        resolver.log()
    );

    // A flow to the resolved address goes to the proxy by the name it was resolved for.
    let h = established(&mut net, WWW, 443);
    net.tcp(h).abort();
    net.poll(Duration::from_millis(10)).unwrap();
    eventually("the proxy was asked", || !proxy.requests().is_empty());
    assert_eq!(proxy.requests(), ["www.example.com:443"]);
}

#[test]
fn a_resolver_that_is_down_gets_the_guest_no_answer_and_moat_keeps_serving() {
    if !available("dnsmasq", "dnsmasq") {
        return;
    }
    let resolver = dnsmasq(RECORDS);
    let port = resolver.addr.port();
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&upstream_policy(resolver.addr, proxy.addr), true);
    let mut net = guest_net(&served);
    assert_eq!(net.resolve_a("www.example.com", T).unwrap(), WWW);

    drop(resolver);
    let outcome = no_answer(&mut net, "api.example.com", Duration::from_secs(3));
    eprintln!("resolver down: {outcome}");
    // moat keeps serving: its own answers, and flows to names it resolved before.
    assert!(net.resolve("evil.test", T).unwrap().is_nxdomain());
    let h = established(&mut net, WWW, 443);
    net.tcp(h).abort();
    net.poll(Duration::from_millis(10)).unwrap();
    eventually("the proxy was asked", || {
        proxy.requests() == ["www.example.com:443"]
    });

    // The resolver returns on the same port: names resolve again.
    let back = dnsmasq_on(port, RECORDS);
    let api = wait_for("api.example.com resolves again", DEADLINE, || {
        net.resolve("api.example.com", Duration::from_secs(2))
            .ok()
            .and_then(|r| r.addr())
    });
    assert_eq!(api, API);
    assert!(dnsmasq_queries(&back).contains(&"api.example.com".to_string()));
}

/// A UDP stand-in for the resolver: counts the queries it gets and hands each to `reply`
/// with the socket it came on and a second socket (another source address).
fn stand_in(
    reply: impl Fn(&Message, SocketAddr, &UdpSocket, &UdpSocket) + Send + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            seen.fetch_add(1, Ordering::SeqCst);
            if let Ok(q) = Message::from_vec(&buf[..n]) {
                reply(&q, from, &sock, &other);
            }
        }
    });
    (addr, count)
}

/// A response to `q` under `id`, answering `name` (the question asked, unless given) with
/// `addr`.
fn response(q: &Message, id: u16, name: Option<&str>, addr: Ipv4Addr) -> Vec<u8> {
    let mut r = Message::response(id, q.metadata.op_code);
    r.metadata.message_type = MessageType::Response;
    for query in &q.queries {
        let mut query = query.clone();
        if let Some(name) = name {
            query.set_name(Name::from_ascii(name).unwrap());
        }
        r.add_answer(Record::from_rdata(
            query.name().clone(),
            30,
            RData::A(A(addr)),
        ));
        r.add_query(query);
    }
    r.to_vec().unwrap()
}

#[test]
fn a_silent_resolver_times_out_and_moat_keeps_serving() {
    let (addr, asked) = stand_in(|_, _, _, _| {});
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&upstream_policy(addr, proxy.addr), true);
    let mut net = guest_net(&served);
    let outcome = no_answer(&mut net, "www.example.com", Duration::from_secs(3));
    eprintln!("silent resolver: {outcome}");
    // A burst of queries for allowed names into the silence: each asked at most once (no
    // amplification), and moat still answers what it answers itself.
    let burst = 2000u16;
    for i in 0..burst {
        let q = {
            let mut m = Message::query();
            m.metadata.id = i;
            m.add_query(hickory_proto::op::Query::query(
                Name::from_ascii(format!("h{i}.example.com")).unwrap(),
                hickory_proto::rr::RecordType::A,
            ));
            m.to_vec().unwrap()
        };
        let frame = moat_sim::craft::udp(GUEST_MAC, GW_MAC, (GUEST, 20000), (GW, 53), &q);
        net.sim().send_frame(&frame).unwrap();
    }
    assert!(net.resolve("evil.test", T).unwrap().is_nxdomain());
    let n = asked.load(Ordering::SeqCst);
    assert!(
        (1..=usize::from(burst) + 1).contains(&n),
        "the resolver was asked {n} times for {} queries",
        burst + 1
    );
}

#[test]
fn replies_that_are_not_the_answer_to_moats_question_are_not_relayed() {
    const REAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const FROM_ELSEWHERE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
    const WRONG_ID: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 67);
    const WRONG_QUESTION: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 68);
    // Before the real answer, three that are not it: the right id from another address,
    // another id from the resolver's, the right id for another name. Sent in that order to
    // the same socket, they are read before the real one.
    let (addr, _) = stand_in(|q, from, sock, other| {
        let id = q.metadata.id;
        let _ = other.send_to(&response(q, id, None, FROM_ELSEWHERE), from);
        let _ = sock.send_to(&response(q, id.wrapping_add(1), None, WRONG_ID), from);
        let _ = sock.send_to(
            &response(q, id, Some("evil.example.com."), WRONG_QUESTION),
            from,
        );
        let _ = sock.send_to(&response(q, id, None, REAL), from);
    });
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&upstream_policy(addr, proxy.addr), true);
    let mut net = guest_net(&served);
    let reply = net.resolve("www.example.com", T).unwrap();
    assert_eq!(
        (reply.rcode, reply.addrs),
        (ResponseCode::NoError, vec![REAL]),
        "only the real answer is relayed"
    );
    // Nor were the other replies' addresses remembered for the name: a flow to one of them
    // is a plain IP literal (held until its first bytes could name it), while a flow to the
    // real answer goes to the proxy as www.example.com at once.
    for spoofed in [FROM_ELSEWHERE, WRONG_ID, WRONG_QUESTION] {
        let h = net.tcp_connect(spoofed, 443);
        net.poll(Duration::from_millis(10)).unwrap();
        let _ = h;
    }
    let real = established(&mut net, REAL, 443);
    eventually("the proxy was asked for the real answer's name", || {
        !proxy.requests().is_empty()
    });
    net.tcp(real).abort();
    // Give a wrongly named flow the time a request takes to show (nothing must arrive).
    net.run_until(QUIET, |_| false).unwrap();
    assert_eq!(
        proxy.requests(),
        ["www.example.com:443"],
        "only the real answer names a flow"
    );
}
