use super::*;
use crate::frame::{MacAddr, PACKET_HEADROOM};
use moat_sim::craft;

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);

fn stack() -> Stack {
    Stack::new(&Vm {
        name: "t".into(),
        mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        address: GUEST,
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 0, 0, 1),
        mtu: 1500,
    })
}

/// The IP packet of a guest SYN from `guest_port` to DST:80.
fn syn(guest_port: u16) -> Vec<u8> {
    let frame = craft::tcp_syn(
        MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        crate::frame::GATEWAY_MAC,
        (GUEST, guest_port),
        (DST, 80),
    );
    frame[14..].to_vec()
}

/// A packet for one connection costs a poll of that connection's socket alone, however
/// many others are open; idle sockets are not polled at all.
#[test]
fn a_poll_visits_only_the_sockets_with_news() {
    let mut s = stack();
    let handles: Vec<SocketHandle> = (0..1000u16)
        .map(|i| s.listen(DST, 80, 40000 + i, false).expect("listen"))
        .collect();
    s.poll();
    s.take_touched();
    s.take_egress();
    assert!(s.dirty.is_empty(), "nothing left to poll");
    assert!(s.ingress(&syn(40007)));
    assert_eq!(s.dirty, vec![7], "only the socket the packet is for");
    s.poll();
    assert_eq!(s.take_touched(), vec![handles[7]]);
    let out = s.take_egress();
    assert_eq!(out.len(), 1, "one SYN-ACK");
    assert_eq!(s.socket(handles[7]).state(), tcp::State::SynReceived);
    assert_eq!(s.socket(handles[8]).state(), tcp::State::Listen);
    // Nothing due: no timer wakes a socket that has nothing to do.
    s.poll();
    s.take_touched();
    assert!(s.poll_delay().is_some(), "the SYN-ACK's retransmit timer");
    let waiting = s.timers.iter().filter(|t| t.0 .1 != 7).count();
    assert_eq!(waiting, 0, "no timer for the idle sockets");
}

/// A packet no socket takes is answered (a RST from the empty set), not lost or queued.
#[test]
fn a_packet_for_no_socket_is_reset() {
    let mut s = stack();
    assert!(s.ingress(&syn(40001)));
    s.poll();
    let out = s.take_egress();
    assert_eq!(out.len(), 1);
    let ip = Ipv4Packet::new_checked(&out[0][PACKET_HEADROOM..]).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(tcp.rst());
    assert_eq!(s.queued, 0);
}

/// Handles are reused after removal, and a removed socket's queued packets are freed.
#[test]
fn removal_frees_the_slot_and_its_queue() {
    let mut s = stack();
    let a = s.listen(DST, 80, 40001, false).unwrap();
    assert!(s.ingress(&syn(40001)));
    assert_eq!(s.queued, 1);
    s.remove(a);
    assert_eq!((s.queued, s.len()), (0, 0));
    let b = s.listen(DST, 80, 40002, false).unwrap();
    assert_eq!(a, b, "slot reused");
    assert!(
        s.listen(DST, 80, 40002, false).is_none(),
        "one socket per endpoint"
    );
}

/// A removed socket's buffers serve the next flow (no new mappings per connection), as a
/// closed socket that the new flow's `listen` resets; the spares are bounded.
#[test]
fn removed_sockets_are_reused_reset_and_bounded() {
    let mut s = stack();
    let a = s.listen(DST, 80, 40001, false).unwrap();
    assert!(s.ingress(&syn(40001)));
    s.poll();
    let _ = s.take_egress();
    assert_eq!(s.socket(a).state(), tcp::State::SynReceived);
    s.remove(a);
    assert_eq!(s.spare.len(), 1);
    let b = s.listen(DST, 80, 40002, false).unwrap();
    assert_eq!(s.spare.len(), 0, "the spare socket was taken");
    let reused = s.socket(b);
    assert_eq!(reused.state(), tcp::State::Listen);
    assert_eq!((reused.recv_queue(), reused.send_queue()), (0, 0));
    // It serves the new flow as a new socket would: a SYN for it gets a SYN-ACK.
    assert!(s.ingress(&syn(40002)));
    s.poll();
    assert_eq!(s.take_egress().len(), 1);
    assert_eq!(s.socket(b).state(), tcp::State::SynReceived);
    s.remove(b);
    // Many flows closed at once keep at most MAX_SPARE_SOCKETS.
    let many: Vec<SocketHandle> = (0..100u16)
        .map(|i| s.listen(DST, 80, 41000 + i, false).unwrap())
        .collect();
    for h in many {
        s.remove(h);
    }
    assert_eq!(s.spare.len(), super::MAX_SPARE_SOCKETS);
}

/// A guest flooding 64 KiB segments the stack has no socket for: what waits for the
/// stack stays within its byte bound (by count alone it was 4096 x 64 KiB = 256 MiB).
#[test]
fn inbound_queue_is_bounded_in_bytes() {
    let policy = crate::policy::Policy::parse(
        "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n",
        std::path::Path::new("t.toml"),
    )
    .expect("valid policy");
    let mut stack = Stack::new(&policy.vm);
    stack.set_large_segments(true, true);
    // An IPv4 header claiming TCP, then 64 KiB of zeros: parsed (and dropped) by the
    // stack only when it polls.
    let mut packet = vec![0u8; 65_000];
    packet[0] = 0x45;
    packet[9] = 6;
    let mut taken = 0;
    for _ in 0..4096 {
        taken += usize::from(stack.ingress(&packet));
        assert!(stack.queued_bytes <= MAX_QUEUED_BYTES);
        assert!(stack.queued * packet.len() <= MAX_QUEUED_BYTES);
        let _ = stack.take_egress();
    }
    assert_eq!(
        taken, 4096,
        "a full queue is handed to the stack, not dropped"
    );
}
