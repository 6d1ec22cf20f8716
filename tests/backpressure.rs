//! Backpressure and idle flows: a slow proxy side closes the guest's window (moat does not
//! buffer without bound), a slow guest stops moat reading from the proxy, and nothing is lost
//! once traffic resumes; an idle flow is reset on both sides.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use moat_sim::guest::{tcp_drain, GuestNet, GuestOptions, SimGuest};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use support::proxy::{origin, pattern, Fnv, ProxyMode, TestProxy, BULK_WRITTEN, SLOW_RELEASE};
use support::*;

const T: Duration = Duration::from_secs(60);
const TOTAL: u64 = 64 << 20;

fn policy(proxy: std::net::SocketAddr) -> String {
    format!(
        "[vm]\nname = \"bp\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nhttp = \"{proxy}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"slow.example\"]\n\
         [dns]\nallow = [\"slow.example\"]\n"
    )
}

fn connect(net: &mut GuestNet) -> SocketHandle {
    let addr = net.resolve_a("slow.example", T).unwrap();
    let h = net.tcp_connect(addr, 80);
    assert!(net
        .run_until(T, |n| n.tcp(h).state() == State::Established)
        .unwrap());
    h
}

/// Both directions in one test: the origin's statics are shared by the test binary.
#[test]
fn slow_peers_push_back_and_nothing_is_lost() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut net = guest_net(&served);

    // Upload to a proxy side that reads nothing for a while.
    let h = connect(&mut net);
    net.tcp(h).send_slice(b"S").unwrap();
    let block = pattern(0, 256 * 1024);
    let mut hash = Fnv::default();
    let mut sent = 0u64;
    let push = |net: &mut GuestNet, sent: &mut u64, hash: &mut Fnv| {
        while *sent < TOTAL {
            let n = (TOTAL - *sent).min(block.len() as u64) as usize;
            match net.tcp(h).send_slice(&block[..n]) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    hash.update(&block[..k]);
                    *sent += k as u64;
                }
            }
        }
    };
    let stalled = net
        .run_until(Duration::from_secs(2), |n| {
            push(n, &mut sent, &mut hash);
            sent >= TOTAL
        })
        .unwrap();
    assert!(
        !stalled,
        "all {TOTAL} bytes left the guest although nobody read them: no backpressure"
    );
    assert!(
        sent < TOTAL / 2,
        "the guest could send {sent} bytes into a proxy that reads nothing"
    );
    SLOW_RELEASE.store(true, Ordering::SeqCst);
    assert!(net
        .run_until(T, |n| {
            push(n, &mut sent, &mut hash);
            sent >= TOTAL
        })
        .unwrap());
    net.tcp(h).close();
    let mut reply = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(h);
        tcp_drain(s, |d| {
            reply.extend_from_slice(d);
        });
        reply.len() >= 16
    })
    .unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), TOTAL);
    assert_eq!(
        u64::from_be_bytes(reply[8..16].try_into().unwrap()),
        hash.0,
        "byte-exact after the stall"
    );

    // Download to a guest that reads nothing for a while: moat stops reading the proxy.
    let d = connect(&mut net);
    let mut req = b"B".to_vec();
    req.extend_from_slice(&TOTAL.to_be_bytes());
    net.tcp(d).send_slice(&req).unwrap();
    net.run_until(Duration::from_secs(2), |_| false).unwrap();
    let written = BULK_WRITTEN.load(Ordering::SeqCst);
    assert!(
        written < TOTAL / 2,
        "the origin could write {written} bytes towards a guest that reads nothing"
    );
    let (mut got, mut hash) = (0u64, Fnv::default());
    let full = pattern(0, 64 * 1024);
    assert!(net
        .run_until(T, |n| {
            let s = n.tcp(d);
            tcp_drain(s, |data| {
                hash.update(data);
                got += data.len() as u64;
            });
            got >= TOTAL
        })
        .unwrap());
    let mut want = Fnv::default();
    for _ in 0..TOTAL / full.len() as u64 {
        want.update(&full);
    }
    assert_eq!((got, hash.0), (TOTAL, want.0), "byte-exact after the stall");
}

#[test]
fn an_idle_flow_is_reset() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let file = dir.path().join("idle.toml");
    std::fs::write(&file, policy(proxy.addr)).unwrap();
    let _moat = Reaped::spawn(
        Command::new(moat_bin())
            .args(["serve", "--once", "--socket"])
            .arg(&socket)
            .arg("--policy")
            .arg(&file)
            .env("MOAT_FLOW_IDLE", "1")
            .stderr(Stdio::null()),
    );
    let sim = SimGuest::connect(&socket, GuestOptions::default()).unwrap();
    let mut net = vm_net(sim);
    let h = connect(&mut net);
    // 'W': the origin waits and records how its connection ends (through the test proxy,
    // which passes a reset on as a reset).
    net.tcp(h).send_slice(b"W").unwrap();
    let mut saw_fin = false;
    let reset = net
        .run_until(Duration::from_secs(30), |n| {
            saw_fin |= matches!(n.tcp(h).state(), State::CloseWait | State::LastAck);
            n.tcp(h).state() == State::Closed
        })
        .unwrap();
    assert!(reset, "idle flow still {:?}", net.tcp(h).state());
    assert!(!saw_fin, "the guest's side is reset, not closed with a FIN");
    // The proxy side too: the origin sees a reset, not an end of stream (nor nothing).
    assert!(
        net.run_until(T, |_| !support::proxy::PEER_END.lock().unwrap().is_empty())
            .unwrap(),
        "the proxy side of the idle flow was left open"
    );
    assert_eq!(
        support::proxy::PEER_END.lock().unwrap().as_slice(),
        ["reset"],
        "the proxy side of the idle flow is reset"
    );
}
