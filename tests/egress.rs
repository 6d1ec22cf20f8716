//! Egress through the proxy, through the real socket: allowed flows are terminated in moat
//! and re-originated as HTTP CONNECT; refused ones never reach the proxy; proxy failures
//! reset the guest's connection; streams arrive byte for byte.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use moat::telemetry::{DropReason, FlowEvent};
use moat_sim::guest::GuestNet;
use smoltcp::socket::tcp::State;
use support::proxy::{origin, pattern, Fnv, ProxyMode, TestProxy, DOWNLOAD_LEN};
use support::*;

const T: Duration = Duration::from_secs(10);

/// The connection never opens: it is reset (proxy failure) or left unanswered (dropped).
fn never_established(net: &mut GuestNet, dst: Ipv4Addr, port: u16, within: Duration) -> State {
    let h = net.tcp_connect(dst, port);
    let mut seen_established = false;
    net.run_until(within, |n| {
        seen_established |= n.tcp(h).state() == State::Established;
        n.tcp(h).state() == State::Closed
    })
    .unwrap();
    assert!(!seen_established, "{dst}:{port} must not be established");
    let state = net.tcp(h).state();
    net.remove(h);
    state
}

fn send_all(net: &mut GuestNet, h: smoltcp::iface::SocketHandle, data: &[u8]) {
    assert!(
        net.tcp_send_all(h, data, T).unwrap(),
        "could not send {} bytes",
        data.len()
    );
}

fn recv_until_closed(
    net: &mut GuestNet,
    h: smoltcp::iface::SocketHandle,
    mut sink: impl FnMut(&[u8]),
) {
    let ok = net
        .tcp_recv(h, Duration::from_secs(60), |d| {
            sink(d);
            false
        })
        .unwrap();
    assert!(ok, "stream did not finish: {:?}", net.tcp(h).state());
}

#[test]
fn allowed_name_goes_to_the_proxy_by_name_and_echoes() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    let addr = net
        .resolve_a("www.example.com", T)
        .expect("allowed name resolves");
    let h = established(&mut net, addr, 80);
    send_all(&mut net, h, b"Ehello through moat");
    let mut got = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(h);
        if s.can_recv() {
            let _ = s.recv(|d| {
                got.extend_from_slice(d);
                (d.len(), ())
            });
        }
        got.len() >= 18
    })
    .unwrap();
    assert_eq!(got, b"hello through moat");
    assert_eq!(proxy.requests(), vec!["www.example.com:80".to_string()]);
    net.tcp(h).close();
    net.run_until(T, |_| served.counters.flows(FlowEvent::Closed) == 1)
        .unwrap();
    assert_eq!(served.counters.flows(FlowEvent::Opened), 1);
}

#[test]
fn sixteen_mib_up_with_half_close_arrives_byte_exact() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("upload.example.com", T).unwrap();
    let h = established(&mut net, addr, 443);
    send_all(&mut net, h, b"U");
    let total: u64 = 16 << 20;
    let mut hash = Fnv::default();
    let mut sent = 0u64;
    while sent < total {
        let chunk = pattern(sent, (total - sent).min(256 * 1024) as usize);
        hash.update(&chunk);
        send_all(&mut net, h, &chunk);
        sent += chunk.len() as u64;
    }
    // Half-close: the origin answers only after it sees our FIN.
    net.tcp(h).close();
    let mut reply = Vec::new();
    recv_until_closed(&mut net, h, |d| reply.extend_from_slice(d));
    assert_eq!(reply.len(), 16, "length and hash from the origin");
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), total);
    assert_eq!(
        u64::from_be_bytes(reply[8..].try_into().unwrap()),
        hash.0,
        "byte-exact upstream"
    );
}

#[test]
fn sixteen_mib_down_arrives_byte_exact() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("download.example.com", T).unwrap();
    let h = established(&mut net, addr, 80);
    send_all(&mut net, h, b"D");
    let (mut len, mut hash) = (0u64, Fnv::default());
    recv_until_closed(&mut net, h, |d| {
        len += d.len() as u64;
        hash.update(d);
    });
    let mut want = Fnv::default();
    want.update(&pattern(0, DOWNLOAD_LEN as usize));
    assert_eq!(len, DOWNLOAD_LEN);
    assert_eq!(hash.0, want.0, "byte-exact downstream");
}

#[test]
fn a_refusing_proxy_resets_the_guest_connection() {
    let proxy = TestProxy::start(ProxyMode::Refuse(403), origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("www.example.com", T).unwrap();
    let state = never_established(&mut net, addr, 443, T);
    assert_eq!(state, State::Closed, "reset promptly");
    assert_eq!(proxy.requests(), vec!["www.example.com:443".to_string()]);
    eventually("proxy failure counted", || {
        served.counters.flows(FlowEvent::ProxyFailed) == 1
    });
}

#[test]
fn a_dead_proxy_resets_the_guest_connection() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let served = Served::start(&proxied_policy(dead, 64), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("www.example.com", T).unwrap();
    assert_eq!(never_established(&mut net, addr, 80, T), State::Closed);
    eventually("proxy failure counted", || {
        served.counters.flows(FlowEvent::ProxyFailed) == 1
    });
}

#[test]
fn destinations_the_policy_does_not_allow_never_reach_the_proxy() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    let evil = net
        .resolve_a("evil.test", T)
        .expect("resolvable, but no outbound rule");
    let allowed = net.resolve_a("www.example.com", T).unwrap();
    let unlisted = net.resolve("not-listed.test", T).unwrap();
    assert!(unlisted.is_nxdomain(), "NXDOMAIN, not {unlisted:?}");
    let quick = Duration::from_millis(1500);
    for (dst, port) in [
        (evil, 443),                             // name not in any rule's `to`
        (allowed, 22),                           // port not in the rule
        (Ipv4Addr::new(169, 254, 169, 254), 80), // cloud metadata
        (Ipv4Addr::new(10, 0, 0, 3), 80),        // another VM
        (Ipv4Addr::new(192, 168, 1, 1), 443),    // private range
        (Ipv4Addr::new(198, 18, 99, 99), 443),   // synthetic address never handed out
    ] {
        let state = never_established(&mut net, dst, port, quick);
        assert_eq!(
            state,
            State::SynSent,
            "{dst}:{port}: SYN dropped, no answer at all"
        );
    }
    assert!(
        proxy.requests().is_empty(),
        "nothing reached the proxy: {:?}",
        proxy.requests()
    );
    let c = &served.counters;
    assert!(
        c.drops(DropReason::NotAllowed) >= 2,
        "not_allowed {}",
        c.drops(DropReason::NotAllowed)
    );
    assert!(c.drops(DropReason::ReservedDestination) >= 3);
    assert!(c.drops(DropReason::UnknownSyntheticAddress) >= 1);
    assert_eq!(c.flows(FlowEvent::Opened), 0);
}

#[test]
fn ip_literals_get_no_answer_when_no_rule_could_name_them() {
    // Only CIDR rules for port 80: nothing could name the flow, so the SYN is dropped.
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let text = proxied_policy(proxy.addr, 64).replace(
        "to = [\"example.com\", \"*.example.com\", \"203.0.113.0/24\", \"127.0.0.1/32\"]",
        "to = [\"203.0.113.0/24\"]",
    );
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    let state = never_established(
        &mut net,
        Ipv4Addr::new(198, 51, 100, 7),
        80,
        Duration::from_millis(1500),
    );
    assert_eq!(state, State::SynSent);
    assert!(
        served.counters.drops(DropReason::NotAllowed) >= 1,
        "each SYN (and retry) dropped"
    );
    assert!(proxy.requests().is_empty());
}

#[test]
fn ip_literals_go_through_when_a_cidr_names_them() {
    let origin = origin();
    let proxy = TestProxy::start(ProxyMode::Accept, origin);
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    let h = established(&mut net, Ipv4Addr::new(203, 0, 113, 10), 443);
    net.tcp(h).abort();
    net.poll(Duration::from_millis(10)).unwrap();
    eventually("proxy asked", || !proxy.requests().is_empty());
    assert_eq!(proxy.requests(), vec!["203.0.113.10:443".to_string()]);
}

#[test]
fn max_flows_refuses_new_connections_and_counts_them() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 2), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("www.example.com", T).unwrap();
    let a = established(&mut net, addr, 80);
    let b = established(&mut net, addr, 80);
    let state = never_established(&mut net, addr, 80, Duration::from_millis(1500));
    // Refused at once with a RST (issue 11), not left to retry its SYN.
    assert_eq!(state, State::Closed);
    assert!(served.counters.drops(DropReason::FlowLimit) >= 1);
    // The flows inside the limit still carry bytes both ways.
    send_all(&mut net, a, b"Eok");
    let mut echo = Vec::new();
    assert!(
        net.tcp_recv(a, T, |d| {
            echo.extend_from_slice(d);
            echo.len() >= 2
        })
        .unwrap(),
        "no echo on a surviving flow"
    );
    assert_eq!(echo, b"ok");
    net.tcp(b).abort();
}

#[test]
fn ip_literal_flows_are_named_by_http_host_or_tls_sni() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    // HTTP to an address no CIDR covers: the Host header names it, and the rule allows it.
    let h = established(&mut net, Ipv4Addr::new(198, 51, 100, 20), 80);
    send_all(
        &mut net,
        h,
        b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
    );
    let mut body = Vec::new();
    recv_until_closed(&mut net, h, |d| body.extend_from_slice(d));
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("HTTP/1.1 200") && body.ends_with("ok"),
        "{body}"
    );
    // TLS: the ClientHello's server name.
    let t = established(&mut net, Ipv4Addr::new(198, 51, 100, 21), 443);
    send_all(
        &mut net,
        t,
        &moat_sim::craft::tls_client_hello("api.example.com"),
    );
    assert!(net.run_until(T, |_| proxy.requests().len() == 2).unwrap());
    assert_eq!(
        proxy.requests(),
        vec![
            "www.example.com:80".to_string(),
            "api.example.com:443".to_string()
        ]
    );
}

#[test]
fn ip_literal_flows_with_a_disallowed_or_missing_name_are_reset() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    for first in [
        b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_vec(),
        moat_sim::craft::tls_client_hello("evil.test"),
        b"\x00\x01 not a protocol with a name".to_vec(),
    ] {
        let h = established(&mut net, Ipv4Addr::new(198, 51, 100, 30), 443);
        send_all(&mut net, h, &first);
        assert!(
            net.run_until(T, |n| n.tcp(h).state() == State::Closed)
                .unwrap(),
            "reset"
        );
        net.remove(h);
    }
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
    assert!(served.counters.drops(DropReason::NotAllowed) >= 3);
}

/// Regression: a stack timer that fired while the loop was busy left the worker blocked in a
/// read of the re-armed timerfd, stalling the queue until the next expiry (1 s per connection
/// with a 512-entry queue). 50 sequential connect+echo round trips must not stall: without
/// the bug they take about 50 ms here (debug build, unloaded); with it, about 10 s. The bound
/// sits between the two with room for a loaded machine: 5 s is 100 times the healthy run and
/// half the stalled one. Speed itself is the benches' matter.
#[test]
fn sequential_connections_never_stall_the_queue() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let opts = moat_sim::guest::GuestOptions {
        queue_size: 512,
        mem_size: 32 << 20,
        ..Default::default()
    };
    let sim = moat_sim::guest::SimGuest::connect(&served.socket, opts).unwrap();
    let mut net = vm_net(sim);
    let addr = net.resolve_a("www.example.com", T).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..50 {
        let h = established(&mut net, addr, 80);
        send_all(&mut net, h, b"Ex");
        let mut echoed = false;
        net.tcp_recv(h, T, |_| {
            echoed = true;
            true
        })
        .unwrap();
        assert!(echoed);
        net.tcp(h).abort();
        net.poll(Duration::ZERO).unwrap();
        net.remove(h);
    }
    let took = start.elapsed();
    eprintln!("50 sequential round trips took {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "50 round trips took {took:?}: the queue stalled"
    );
}

/// A resolver on loopback that answers every A query with 203.0.113.77 and counts queries.
fn fake_resolver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::{rdata::A, RData, Record};
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&count);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.id, q.op_code);
            r.metadata.message_type = MessageType::Response;
            for query in &q.queries {
                r.add_query(query.clone());
                r.add_answer(Record::from_rdata(
                    query.name().clone(),
                    30,
                    RData::A(A(Ipv4Addr::new(203, 0, 113, 77))),
                ));
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from);
        }
    });
    (addr, count)
}

#[test]
fn upstream_mode_resolves_allowed_names_and_names_their_flows() {
    let (resolver, asked) = fake_resolver();
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let text = proxied_policy(proxy.addr, 64).replace(
        "[dns]\nallow = [\"example.com\", \"*.example.com\", \"evil.test\"]",
        &format!("[dns]\nallow = [\"example.com\", \"*.example.com\"]\nmode = \"upstream\"\nupstream = \"{resolver}\""),
    );
    assert!(text.contains("mode = \"upstream\""));
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    let addr = net
        .resolve_a("www.example.com", T)
        .expect("answered by the upstream resolver");
    assert_eq!(addr, Ipv4Addr::new(203, 0, 113, 77));
    let evil = net.resolve("evil.test", T).unwrap();
    assert!(
        evil.is_nxdomain(),
        "not allowed: NXDOMAIN here, not {evil:?}"
    );
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the allowed name went upstream"
    );
    // 203.0.113.77 is covered by the rule's CIDR too, but moat names the flow from DNS.
    let h = established(&mut net, addr, 443);
    net.tcp(h).abort();
    net.poll(Duration::from_millis(10)).unwrap();
    assert!(net.run_until(T, |_| !proxy.requests().is_empty()).unwrap());
    assert_eq!(proxy.requests(), vec!["www.example.com:443".to_string()]);
    assert_eq!(
        served.counters.dns(moat::telemetry::DnsOutcome::Forwarded),
        1
    );
}

#[test]
fn resets_propagate_both_ways() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&proxied_policy(proxy.addr, 64), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("www.example.com", T).unwrap();
    // The far side resets: the guest's connection is reset, not closed cleanly.
    let h = established(&mut net, addr, 80);
    send_all(&mut net, h, b"Rxxxx");
    let mut saw_fin = false;
    assert!(net
        .run_until(T, |n| {
            saw_fin |= matches!(n.tcp(h).state(), State::CloseWait | State::LastAck);
            n.tcp(h).state() == State::Closed
        })
        .unwrap());
    assert!(!saw_fin, "a reset upstream arrives as a reset, not a FIN");
    // The guest resets: the far side sees a reset, not an end of stream.
    let g = established(&mut net, addr, 80);
    send_all(&mut net, g, b"W");
    // Reset only once the origin is waiting on the far end of the flow.
    assert!(net
        .run_until(T, |_| support::proxy::PEER_WAITING
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
        .unwrap());
    net.tcp(g).abort();
    net.poll(Duration::from_millis(10)).unwrap();
    assert!(net
        .run_until(T, |_| !support::proxy::PEER_END.lock().unwrap().is_empty())
        .unwrap());
    assert_eq!(support::proxy::PEER_END.lock().unwrap()[0], "reset");
}

/// A proxy whose tunnel ends in the same write as its last bytes: the 200, then (after the
/// guest's first byte) `body` and FIN together, or the 200, the body and FIN all at once.
/// moat stops reading a proxy socket after a short read (it is drained; new data raises a
/// new edge), so an end already queued behind the data must still be seen: the guest gets
/// every byte, then FIN, not a flow left open until its idle timeout.
fn ending_proxy(body: Vec<u8>, all_at_once: bool) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut b).is_ok_and(|n| n == 1) {
                    head.push(b[0]);
                }
                let mut out = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
                if !all_at_once {
                    conn.write_all(&out).unwrap();
                    out.clear();
                    let _ = conn.read(&mut b); // the guest's first byte
                }
                out.extend_from_slice(&body);
                conn.write_all(&out).unwrap();
                let _ = conn.shutdown(std::net::Shutdown::Write);
                // Hold the socket until the guest has closed its side.
                let _ = conn.read(&mut b);
            });
        }
    });
    addr
}

#[test]
fn a_tunnel_that_ends_with_its_last_bytes_reaches_the_guest_whole_then_closed() {
    for (len, all_at_once) in [(3, true), (3, false), (100_000, true), (300_000, false)] {
        let body = pattern(0, len);
        let proxy = ending_proxy(body.clone(), all_at_once);
        let served = Served::start(&proxied_policy(proxy, 64), true);
        let mut net = guest_net(&served);
        let addr = net.resolve_a("www.example.com", T).unwrap();
        let h = established(&mut net, addr, 80);
        send_all(&mut net, h, b"E");
        let mut got = Vec::new();
        recv_until_closed(&mut net, h, |d| got.extend_from_slice(d));
        assert_eq!(
            got.len(),
            len,
            "{len} bytes (all at once: {all_at_once}) arrive"
        );
        assert!(got == body, "byte-exact");
        let state = net.tcp(h).state();
        assert!(
            matches!(state, State::CloseWait | State::Closed),
            "the proxy's FIN reached the guest: {state:?}"
        );
    }
}
