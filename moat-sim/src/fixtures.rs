//! What tests share about the test VM and about waiting: its addresses, the policies the
//! suites use, waiting for a condition, and receiving until a frame matches.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::guest::{GuestNet, SimGuest};
use crate::Mac;

/// The test VM's MAC (`mac` in [`POLICY`] and the other policies here).
pub const GUEST_MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// How long to wait for something that must NOT arrive.
pub const QUIET: Duration = Duration::from_millis(300);

/// How long a test waits for something that must happen: generous, because a loaded 2-CPU
/// machine may be slow; waiting stops as soon as the condition holds.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub const POLICY: &str = r#"
[vm]
name = "it"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
"#;

/// Wait until `probe` gives a value (checked every 10 ms), or panic naming `what` after
/// `within`. Tests wait for the condition they then check, never for a fixed time.
pub fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until `cond` holds (counters are updated by moat's worker thread), up to DEADLINE.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, DEADLINE, || cond().then_some(()))
}

/// Receive frames until one satisfies `pred`, or fail after DEADLINE
/// ([`SimGuest::recv_until`], for a test that must see the frame).
pub fn recv_matching(guest: &mut SimGuest, what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    match guest.recv_until(DEADLINE, pred).expect("recv") {
        Some(frame) => frame,
        None => panic!("no frame: {what}"),
    }
}

/// Assert nothing at all arrives for a while.
pub fn assert_silent(guest: &mut SimGuest, what: &str) {
    if let Some(frame) = guest.recv_frame(QUIET).expect("recv") {
        panic!(
            "expected no answer to {what}, got {} bytes: {:02x?}",
            frame.len(),
            &frame[..frame.len().min(42)]
        );
    }
}

/// A VM whose TCP to example.com (and 203.0.113.0/24, 127.0.0.1) ports 80 and 443 goes
/// through the HTTP CONNECT proxy at `proxy`.
pub fn proxied_policy(proxy: std::net::SocketAddr, max_flows: usize) -> String {
    format!(
        r#"
[vm]
name = "egress"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[proxy]
http = "{proxy}"
[[outbound]]
protocol = "tcp"
ports = [80, 443]
to = ["example.com", "*.example.com", "203.0.113.0/24", "127.0.0.1/32"]
[dns]
allow = ["example.com", "*.example.com", "evil.test"]
[limits]
max_flows = {max_flows}
"#
    )
}

/// A VM in `dns.mode = "upstream"` asking `resolver`, whose TCP to `*.example.com:443` goes
/// through the HTTP proxy at `proxy`.
pub fn upstream_policy(resolver: std::net::SocketAddr, proxy: std::net::SocketAddr) -> String {
    format!(
        r#"
[vm]
name = "dns-upstream"
mac = "52:54:00:12:34:56"
address = "10.0.0.2/24"
gateway = "10.0.0.1"
[proxy]
http = "{proxy}"
[[outbound]]
protocol = "tcp"
ports = [443]
to = ["*.example.com"]
[dns]
allow = ["*.example.com"]
mode = "upstream"
upstream = "{resolver}"
"#
    )
}

/// The test VM's network stack on `guest`: [`GUEST_MAC`], [`GUEST`]/24 via [`GW`], MTU 1500
/// (what every policy here says).
pub fn vm_net(guest: SimGuest) -> GuestNet {
    GuestNet::new(guest, GUEST_MAC, GUEST, 24, GW, 1500)
}

/// Connect and wait for the handshake; returns the socket once established.
pub fn established(net: &mut GuestNet, dst: Ipv4Addr, port: u16) -> smoltcp::iface::SocketHandle {
    net.tcp_established(dst, port, Duration::from_secs(10))
        .unwrap()
        .unwrap_or_else(|| panic!("connection to {dst}:{port} not established"))
}
