//! Faults and floods: the frontend vanishing mid-transfer, the proxy dying and returning,
//! and a flood next to a legitimate stream. moat stays up, bounded, and nothing is silently
//! truncated.

mod support;

use std::io::Read;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat::telemetry::FlowEvent;
use moat_sim::craft;
use moat_sim::guest::{tcp_drain, GuestNet, GuestOptions, SimGuest};
use smoltcp::socket::tcp::State;
use support::proxy::{origin, pattern, Fnv, ProxyMode, TestProxy};
use support::*;

const T: Duration = Duration::from_secs(20);

fn policy(proxy: std::net::SocketAddr) -> String {
    format!(
        "[vm]\nname = \"faults\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nhttp = \"{proxy}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"data.example\"]\n\
         [dns]\nallow = [\"data.example\"]\n"
    )
}

fn download(net: &mut GuestNet, len: u64, stop_after: Option<u64>) -> (u64, u64) {
    let addr = net.resolve_a("data.example", T).unwrap();
    let h = net.tcp_connect(addr, 80);
    assert!(net
        .run_until(T, |n| n.tcp(h).state() == State::Established)
        .unwrap());
    let mut req = b"B".to_vec();
    req.extend_from_slice(&len.to_be_bytes());
    net.tcp(h).send_slice(&req).unwrap();
    let (mut got, mut hash) = (0u64, Fnv::default());
    net.run_until(Duration::from_secs(120), |n| {
        let s = n.tcp(h);
        tcp_drain(s, |d| {
            got += d.len() as u64;
            hash.update(d);
        });
        got >= stop_after.unwrap_or(len)
    })
    .unwrap();
    (got, hash.0)
}

fn expected_hash(len: u64) -> u64 {
    let block = pattern(0, 64 * 1024);
    let mut h = Fnv::default();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(block.len() as u64) as usize;
        h.update(&block[..n]);
        done += n as u64;
    }
    h.0
}

#[test]
fn the_vmm_vanishing_mid_transfer_resets_and_the_next_connection_works() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), false);
    {
        let mut net = guest_net(&served);
        let (got, _) = download(&mut net, 64 << 20, Some(1 << 20));
        assert!(got >= 1 << 20);
        // The VMM goes away with the transfer in flight.
    }
    eventually("the old flow is gone", || {
        served
            .counters
            .flows_open
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    });
    let mut net = guest_net(&served);
    let (got, hash) = download(&mut net, 4 << 20, None);
    assert_eq!(
        (got, hash),
        (4 << 20, expected_hash(4 << 20)),
        "the new connection carries a full stream"
    );
}

#[test]
fn the_proxy_dying_resets_flows_and_new_flows_work_when_it_returns() {
    if !support::peers::available("tinyproxy", "tinyproxy") {
        return;
    }
    let origin = origin();
    let peer = support::peers::tinyproxy();
    let addr = peer.addr;
    let text = policy(addr)
        .replace(
            "to = [\"data.example\"]",
            "to = [\"localhost\", \"127.0.0.1/32\"]",
        )
        .replace("allow = [\"data.example\"]", "allow = [\"localhost\"]")
        .replace("ports = [80]", &format!("ports = [{}]", origin.port()));
    let served = Served::start(&text, true);
    let mut net = guest_net(&served);
    let dst = net.resolve_a("localhost", T).unwrap();
    // An open flow when the proxy dies: reset, never left hanging.
    let h = net.tcp_connect(dst, origin.port());
    assert!(net
        .run_until(T, |n| n.tcp(h).state() == State::Established)
        .unwrap());
    net.tcp(h).send_slice(b"E").unwrap();
    net.poll(Duration::from_millis(50)).unwrap();
    drop(peer);
    // The dead proxy's sockets close: moat sees a reset, or a FIN when tinyproxy had read
    // everything (a clean end of stream that moat cannot tell from the origin closing).
    // Either way the flow ends: reset at once, or FIN and then a reset of the guest's next
    // write (nothing may carry the guest's bytes any more). Never left open.
    let ended = |n: &mut GuestNet| matches!(n.tcp(h).state(), State::Closed | State::CloseWait);
    assert!(
        net.run_until(T, ended).unwrap(),
        "flow ended when the proxy died, still {:?}",
        net.tcp(h).state()
    );
    let fin = net.tcp(h).state() == State::CloseWait;
    eprintln!(
        "the proxy's death reached the guest as a {}",
        if fin { "FIN" } else { "reset" }
    );
    if fin {
        net.tcp(h).send_slice(b"Eanyone there?").unwrap();
        assert!(
            net.run_until(T, |n| n.tcp(h).state() == State::Closed)
                .unwrap(),
            "after the dead proxy's FIN, the guest's write is reset, not left hanging: {:?}",
            net.tcp(h).state()
        );
    }
    // During the outage: refused promptly.
    let d = net.tcp_connect(dst, origin.port());
    assert!(
        net.run_until(T, |n| n.tcp(d).state() == State::Closed)
            .unwrap(),
        "reset during the outage"
    );
    // The proxy returns on the same address: new flows work.
    let again = support::peers::tinyproxy_on(addr.port());
    let e = net.tcp_connect(dst, origin.port());
    assert!(
        net.run_until(T, |n| n.tcp(e).state() == State::Established)
            .unwrap(),
        "works after recovery"
    );
    net.tcp(e).send_slice(b"Eback").unwrap();
    let mut got = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(e);
        tcp_drain(s, |x| {
            got.extend_from_slice(x);
        });
        got.len() >= 4
    })
    .unwrap();
    assert_eq!(got, b"back");
    assert!(served.counters.flows(FlowEvent::ProxyFailed) >= 1);
    drop(again);
}

/// RSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A 60 s flood (MOAT_FLOOD_SECS) of invalid frames, SYNs, UDP and spoofed packets next to
/// legitimate streams, against the real binary: it stays up, its RSS stays under 64 MiB, and
/// every stream is byte-exact.
#[test]
fn a_flood_next_to_a_legitimate_stream() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let file = dir.path().join("vm.toml");
    std::fs::write(&file, policy(proxy.addr)).unwrap();
    let mut child = Reaped::spawn(
        Command::new(moat_bin())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&file)
            .env("MOAT_LOG", "warn")
            .stderr(Stdio::piped()),
    );
    let opts = GuestOptions {
        queue_size: 512,
        mem_size: 32 << 20,
        ..GuestOptions::default()
    };
    let mut net = GuestNet::new(
        SimGuest::connect(&socket, opts).unwrap(),
        GUEST_MAC.0,
        GUEST,
        24,
        GW,
        1500,
    );
    let addr = net.resolve_a("data.example", T).unwrap();
    // Streams of 8 MiB, one after the other, for the whole flood; each must be byte-exact.
    let len: u64 = 8 << 20;
    let flood_for = Duration::from_secs(
        std::env::var("MOAT_FLOOD_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let floods: Vec<Vec<u8>> = vec![
        vec![0xff; 40],
        craft::udp(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 9),
            (Ipv4Addr::new(203, 0, 113, 9), 9),
            &[0u8; 512],
        ),
        craft::tcp_syn(
            GUEST_MAC,
            GW_MAC,
            (GUEST, 1),
            (Ipv4Addr::new(198, 51, 100, 1), 22),
        ),
        craft::icmp_echo(
            GUEST_MAC,
            GW_MAC,
            Ipv4Addr::new(10, 0, 0, 99),
            GW,
            1,
            1,
            b"spoof",
        ),
    ];
    let want = expected_hash(len);
    let mut h = net.tcp_connect(addr, 80);
    let (mut requested, mut got, mut hash) = (false, 0u64, Fnv::default());
    let (mut sent, mut peak, mut streams) = (0u64, 0u64, 0u32);
    let start = Instant::now();
    let done = net
        .run_until(flood_for + Duration::from_secs(90), |n| {
            // As fast as the simulated guest can post them, between reads of the stream.
            for _ in 0..16 {
                for f in &floods {
                    let _ = n.sim().send_frame(f);
                    sent += 1;
                }
            }
            let s = n.tcp(h);
            if !requested && s.state() == State::Established {
                let mut req = b"B".to_vec();
                req.extend_from_slice(&len.to_be_bytes());
                requested = s.send_slice(&req).is_ok();
            }
            tcp_drain(s, |d| {
                got += d.len() as u64;
                hash.update(d);
            });
            peak = peak.max(rss_kib(child.id()));
            if got < len {
                return false;
            }
            assert_eq!(
                (got, hash.0),
                (len, want),
                "stream {streams} byte-exact under flood"
            );
            streams += 1;
            n.tcp(h).abort();
            if start.elapsed() >= flood_for {
                return true;
            }
            h = n.tcp_connect(addr, 80);
            (requested, got, hash) = (false, 0, Fnv::default());
            false
        })
        .unwrap();
    let took = start.elapsed();
    assert!(
        done,
        "streams stalled under flood ({streams} done, {got} bytes of the next, {took:?})"
    );
    assert!(child.try_wait().unwrap().is_none(), "moat still up");
    eprintln!("flood: {sent} hostile frames during {took:?} next to {streams} byte-exact streams of 8 MiB, peak RSS {peak} KiB");
    assert!(peak < 64 * 1024, "RSS {peak} KiB");
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut table = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut table)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        table.contains("not_allowed") && table.contains("spoofed_src_ip"),
        "{table}"
    );
}

/// A proxy that opens the tunnel, ends its side at once (FIN), and resets the connection
/// (SO_LINGER 0) as soon as anything more arrives: what a proxy that went away looks like.
fn fin_then_reset_proxy() -> std::net::SocketAddr {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut conn = conn;
                let _ = conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let _ = conn.shutdown(std::net::Shutdown::Write);
                let mut b = [0u8; 1];
                let _ = reader.read(&mut b);
                let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
            });
        }
    });
    addr
}

/// After the proxy's FIN the guest may still send (a half-close); when the proxy answers
/// that with a reset, the guest's connection is reset too, not left half-open.
#[test]
fn a_reset_after_the_proxys_fin_reaches_the_guest() {
    let served = Served::start(&policy(fin_then_reset_proxy()), true);
    let mut net = guest_net(&served);
    let addr = net.resolve_a("data.example", T).unwrap();
    let h = net.tcp_connect(addr, 80);
    assert!(
        net.run_until(T, |n| n.tcp(h).state() == State::CloseWait)
            .unwrap(),
        "the proxy's FIN reaches the guest: {:?}",
        net.tcp(h).state()
    );
    net.tcp(h).send_slice(b"still there?").unwrap();
    assert!(
        net.run_until(T, |n| n.tcp(h).state() == State::Closed)
            .unwrap(),
        "the proxy's reset reaches the guest: still {:?}",
        net.tcp(h).state()
    );
    eventually("counted as a proxy reset", || {
        served.counters.flows(FlowEvent::Reset) + served.counters.flows(FlowEvent::ProxyFailed) >= 1
    });
}
