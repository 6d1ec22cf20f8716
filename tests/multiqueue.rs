//! Multiqueue (`moat serve --queues N`): the device offers VIRTIO_NET_F_MQ and N queue pairs,
//! each served by its own thread with its own flows. A flow belongs to the pair its first
//! packet arrived on; frames the guest later sends for it on another pair's TX queue are
//! handed to the owner, so a connection survives the guest moving it between queues.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use moat::device::Tuning;
use moat::telemetry::{DropReason, FlowEvent, Traffic};
use moat_sim::guest::{GuestNet, GuestOptions, SimGuest};
use smoltcp::iface::SocketHandle;
use support::proxy::{origin, ProxyMode, TestProxy};
use support::*;
use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MQ;

const T: Duration = Duration::from_secs(10);

fn two_pairs() -> Tuning {
    Tuning {
        queue_pairs: 2,
        ..Tuning::default()
    }
}

fn mq_guest(served: &Served) -> SimGuest {
    SimGuest::connect(
        &served.socket,
        GuestOptions {
            queue_pairs: 2,
            ..GuestOptions::default()
        },
    )
    .expect("a two-pair guest connects")
}

/// The allowed site's (synthetic) address: the test proxy takes names to the test origin.
fn site(net: &mut GuestNet) -> Ipv4Addr {
    net.resolve_a("example.com", T)
        .expect("the allowed name resolves")
}

/// A two-pair moat whose guest reaches example.com through a test proxy: the proxy, moat,
/// the guest's stack and example.com's (synthetic) address.
fn proxied_scene(max_flows: usize) -> (TestProxy, Served, GuestNet, Ipv4Addr) {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start_tuned(&proxied_policy(proxy.addr, max_flows), true, two_pairs());
    let mut net = vm_net(mq_guest(&served));
    let site = site(&mut net);
    (proxy, served, net, site)
}

/// An echo connection to the site, opened on queue pair `pair` (its SYN goes out there).
fn echo_connection(net: &mut GuestNet, site: Ipv4Addr, pair: usize) -> SocketHandle {
    net.sim().set_tx_pair(pair);
    let h = established(net, site, 443);
    assert!(net.tcp_send_all(h, b"E", T).unwrap(), "the echo mode byte");
    h
}

/// Send `msg` on an echo connection (opened with the test origin's mode byte 'E') and read
/// the echo.
fn echo(net: &mut GuestNet, h: SocketHandle, msg: &[u8]) -> Vec<u8> {
    assert!(net.tcp_send_all(h, msg, T).unwrap(), "send");
    let mut got = Vec::new();
    net.tcp_recv(h, T, |d| {
        got.extend_from_slice(d);
        got.len() >= msg.len()
    })
    .unwrap();
    got
}

#[test]
fn queues_n_offers_mq_and_n_pairs_and_one_pair_offers_neither() {
    let served = Served::start_tuned(POLICY, true, two_pairs());
    let guest = mq_guest(&served);
    assert_ne!(
        guest.negotiated_features() & (1 << VIRTIO_NET_F_MQ),
        0,
        "MQ offered and acked"
    );
    assert_eq!(guest.config().unwrap().max_virtqueue_pairs, 2);
    assert_eq!(guest.queue_pairs(), 2);
    drop(guest);

    let single = Served::start(POLICY, true);
    let guest = single.guest();
    assert_eq!(guest.negotiated_features() & (1 << VIRTIO_NET_F_MQ), 0);
    assert_eq!(guest.config().unwrap().max_virtqueue_pairs, 1);
    // A two-pair guest cannot be had from a one-pair device.
    drop(guest);
    let served = Served::start(POLICY, true);
    assert!(SimGuest::connect(
        &served.socket,
        GuestOptions {
            queue_pairs: 2,
            ..GuestOptions::default()
        }
    )
    .is_err());
}

#[test]
fn every_pair_answers_on_its_own_rx_queue() {
    let served = Served::start_tuned(POLICY, true, two_pairs());
    let mut guest = mq_guest(&served);
    for pair in [0, 1] {
        guest.set_tx_pair(pair);
        let before = guest.rx_frames_per_pair();
        guest
            .send_frame(&moat_sim::craft::arp_request(GUEST_MAC, GUEST, GW))
            .unwrap();
        recv_matching(&mut guest, "the gateway's ARP reply", |f| {
            f.len() >= 14 && f[12..14] == [0x08, 0x06]
        });
        let after = guest.rx_frames_per_pair();
        assert_eq!(
            after[pair],
            before[pair] + 1,
            "pair {pair}'s answer came on pair {pair}'s RX queue: {before:?} -> {after:?}"
        );
    }
}

#[test]
fn a_flow_moved_to_another_queue_mid_stream_keeps_working() {
    let (proxy, served, mut net, site) = proxied_scene(64);
    let h = echo_connection(&mut net, site, 0);
    assert_eq!(echo(&mut net, h, b"on pair zero"), b"on pair zero");
    // The guest moves the socket to pair 1 (as Linux does when the sending thread changes
    // CPU): pair 1 does not own the flow and hands every frame to pair 0.
    net.sim().set_tx_pair(1);
    let long: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(echo(&mut net, h, &long), long, "the stream is intact");
    assert!(
        served.counters.traffic(Traffic::HandedOff) > 0,
        "pair 1 handed the flow's frames to pair 0"
    );
    assert_eq!(served.counters.drops(DropReason::TcpNoFlow), 0);
    assert_eq!(served.counters.drops(DropReason::HandoffFailed), 0);
    assert_eq!(
        served.counters.flows(FlowEvent::Opened),
        1,
        "one flow, not two"
    );
    assert_eq!(proxy.requests().len(), 1);
}

#[test]
fn flows_on_both_pairs_at_once_and_max_flows_counts_them_together() {
    let (_proxy, served, mut net, site) = proxied_scene(2);
    let a = echo_connection(&mut net, site, 0);
    let b = echo_connection(&mut net, site, 1);
    let rx_before = net.sim().rx_frames_per_pair();
    assert_eq!(echo(&mut net, b, b"pair one"), b"pair one");
    let rx_after = net.sim().rx_frames_per_pair();
    assert!(
        rx_after[1] > rx_before[1],
        "pair 1's flow answers on pair 1: {rx_before:?} -> {rx_after:?}"
    );
    net.sim().set_tx_pair(0);
    assert_eq!(echo(&mut net, a, b"pair zero"), b"pair zero");
    // (The simulated guest sends everything on its active pair, so flow a's ACKs sent while
    // pair 1 was active were handed to pair 0: no count of handoffs is asserted here.)
    assert_eq!(served.counters.drops(DropReason::TcpNoFlow), 0);

    // max_flows = 2 is the VM's, not each pair's: a third flow on either pair is refused.
    for pair in [0, 1] {
        net.sim().set_tx_pair(pair);
        let c = net.tcp_connect(site, 443);
        net.run_until(Duration::from_millis(500), |_| false)
            .unwrap();
        assert_ne!(
            net.tcp(c).state(),
            smoltcp::socket::tcp::State::Established,
            "a third flow (on pair {pair}) is over the VM's limit"
        );
        net.remove(c);
    }
    assert!(served.counters.drops(DropReason::FlowLimit) >= 2);
    assert_eq!(served.counters.flows(FlowEvent::Opened), 2);
}

#[test]
fn a_single_queue_guest_works_with_a_multiqueue_moat() {
    // QEMU with `queues=1` (or a driver without MQ) against `moat serve --queues 2`: only
    // pair 0 is set up and used.
    let served = Served::start_tuned(POLICY, true, two_pairs());
    let mut guest = served.guest();
    assert_eq!(guest.negotiated_features() & (1 << VIRTIO_NET_F_MQ), 0);
    guest
        .send_frame(&moat_sim::craft::arp_request(GUEST_MAC, GUEST, GW))
        .unwrap();
    recv_matching(&mut guest, "the gateway's ARP reply", |f| {
        f.len() >= 14 && f[12..14] == [0x08, 0x06]
    });
    assert_eq!(guest.rx_frames_per_pair(), vec![1]);
}

#[test]
fn queue_and_poll_counts_out_of_range_are_refused_with_the_range() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vm.toml"), POLICY).unwrap();
    for (flag, value) in [
        ("--queues", "0"),
        ("--queues", "17"),
        ("--queues", "two"),
        ("--busy-poll-us", "10001"),
    ] {
        let out = std::process::Command::new(moat_bin())
            .args(["serve", flag, value, "--socket"])
            .arg(dir.path().join("s"))
            .arg("--policy")
            .arg(dir.path().join("vm.toml"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(value),
            "{flag} {value}: the error names the flag and the value: {stderr}"
        );
        assert!(
            !dir.path().join("s").exists(),
            "nothing started for {flag} {value}"
        );
    }
}
