//! Checksum and segmentation offloads (VIRTIO_NET_F_CSUM / GUEST_CSUM, HOST_TSO4 /
//! GUEST_TSO4): a guest that acks them moves bulk TCP in large segments both ways (up to 64 KiB in, 32 KiB out),
//! byte-exact; moat completes partial checksums itself from the frame (never trusting the
//! guest's offsets or lengths) and refuses headers that ask for more than was negotiated.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use moat::telemetry::{DropReason, Traffic};
use moat_sim::craft;
use moat_sim::guest::{GuestNet, GuestOptions, SimGuest};
use support::proxy::{origin, pattern, Fnv, ProxyMode, TestProxy, DOWNLOAD_LEN};
use support::*;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
};

const T: Duration = Duration::from_secs(20);

fn policy(proxy: SocketAddr) -> String {
    format!(
        "[vm]\nname = \"tso\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [proxy]\nhttp = \"{proxy}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"bulk.example\"]\n\
         [dns]\nallow = [\"bulk.example\"]\n"
    )
}

fn options(offloads: bool) -> GuestOptions {
    GuestOptions {
        offloads,
        queue_size: 256,
        mem_size: 32 << 20,
        ..GuestOptions::default()
    }
}

fn guest_net(served: &Served, offloads: bool) -> GuestNet {
    let guest = SimGuest::connect(&served.socket, options(offloads)).unwrap();
    vm_net(guest)
}

fn bulk(net: &mut GuestNet) -> smoltcp::iface::SocketHandle {
    let addr = net.resolve_a("bulk.example", T).unwrap();
    net.tcp_established(addr, 80, T)
        .unwrap()
        .expect("established")
}

/// Average frame size on one side of moat's counters.
fn average(served: &Served, bytes: Traffic, frames: Traffic) -> u64 {
    served.counters.traffic(bytes) / served.counters.traffic(frames).max(1)
}

#[test]
fn offloads_are_offered_and_acked() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let guest = SimGuest::connect(&served.socket, options(true)).unwrap();
    let f = guest.negotiated_features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit} negotiated");
    }
}

#[test]
fn large_segments_up_arrive_byte_exact() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut net = guest_net(&served, true);
    let h = bulk(&mut net);
    assert!(net.tcp_send_all(h, b"U", T).unwrap());
    let total: u64 = 16 << 20;
    let (mut hash, mut sent) = (Fnv::default(), 0u64);
    while sent < total {
        let chunk = pattern(sent, (total - sent).min(256 * 1024) as usize);
        hash.update(&chunk);
        assert!(net.tcp_send_all(h, &chunk, T).unwrap());
        sent += chunk.len() as u64;
    }
    net.tcp(h).close();
    let mut reply = Vec::new();
    assert!(net
        .tcp_recv(h, T, |d| {
            reply.extend_from_slice(d);
            false
        })
        .unwrap());
    assert_eq!(reply.len(), 16);
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), total);
    assert_eq!(u64::from_be_bytes(reply[8..].try_into().unwrap()), hash.0);
    let avg = average(&served, Traffic::TxBytes, Traffic::TxFrames);
    eprintln!("guest -> moat: {avg} bytes per frame on average");
    assert!(avg > 8000, "TSO frames carry many MSS each (avg {avg} B)");
    assert_eq!(served.counters.total_drops(), 0);
}

#[test]
fn large_segments_down_arrive_byte_exact() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut net = guest_net(&served, true);
    let h = bulk(&mut net);
    assert!(net.tcp_send_all(h, b"D", T).unwrap());
    let (mut len, mut hash) = (0u64, Fnv::default());
    assert!(net
        .tcp_recv(h, Duration::from_secs(60), |d| {
            len += d.len() as u64;
            hash.update(d);
            false
        })
        .unwrap());
    let mut want = Fnv::default();
    want.update(&pattern(0, DOWNLOAD_LEN as usize));
    assert_eq!(
        (len, hash.0),
        (DOWNLOAD_LEN, want.0),
        "byte-exact downstream"
    );
    let avg = average(&served, Traffic::RxBytes, Traffic::RxFrames);
    eprintln!("moat -> guest: {avg} bytes per frame on average");
    assert!(avg > 8000, "GSO frames carry many MSS each (avg {avg} B)");
    assert_eq!(served.counters.total_drops(), 0);
}

#[test]
fn without_offloads_frames_stay_within_the_mtu() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut net = guest_net(&served, false);
    let h = bulk(&mut net);
    assert!(net.tcp_send_all(h, b"D", T).unwrap());
    let mut len = 0u64;
    assert!(net
        .tcp_recv(h, Duration::from_secs(60), |d| {
            len += d.len() as u64;
            false
        })
        .unwrap());
    assert_eq!(len, DOWNLOAD_LEN);
    // Every frame, not the average: one GSO frame among thousands of small ones would hide.
    let biggest_possible = 14 + 1500;
    let largest = net.sim().largest_rx_frame();
    assert!(
        largest <= biggest_possible,
        "a {largest}-byte frame to a guest without offloads (MTU 1500)"
    );
    assert!(
        largest > 1000,
        "the stream used full-size frames ({largest} B)"
    );
}

/// A DNS query for `name` from the guest to the gateway.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::query();
    m.metadata.id = id;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    craft::udp(
        GUEST_MAC,
        GW_MAC,
        (GUEST, 5353),
        (GW, 53),
        &m.to_vec().unwrap(),
    )
}

fn syn() -> Vec<u8> {
    craft::tcp_syn(
        GUEST_MAC,
        GW_MAC,
        (GUEST, 40000),
        (Ipv4Addr::new(198, 18, 0, 1), 80),
    )
}

/// A TX buffer: header fields as given, then the frame.
fn hdr(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h[1] = gso;
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

#[test]
fn partial_checksums_are_completed_from_the_frame_and_bad_headers_dropped() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut guest = SimGuest::connect(&served.socket, options(true)).unwrap();
    let query = dns_query(0x77, "bulk.example");
    // The UDP checksum field garbled, as a guest leaving it to the device would: moat
    // computes it from the frame and answers.
    let mut partial = query.clone();
    partial[14 + 20 + 6] ^= 0xff;
    partial[14 + 20 + 7] ^= 0x55;
    guest
        .send_frame_with_hdr(&hdr(1, 0, 0, 34, 6), &partial)
        .unwrap();
    recv_matching(&mut guest, "DNS answer to a NEEDS_CSUM query", |f| {
        f.len() > 42 && f[23] == 17 && f[34..36] == [0, 53]
    });
    // The same garbled checksum without NEEDS_CSUM: a bad checksum, dropped.
    guest.send_frame(&partial).unwrap();
    // Offsets that do not point at the frame's own checksum field.
    for (start, offset) in [(30, 6), (34, 16), (34, 7), (60000, 6)] {
        guest
            .send_frame_with_hdr(&hdr(1, 0, 0, start, offset), &query)
            .unwrap();
    }
    // TSO of a UDP datagram, and TSO asked for with a zero segment size.
    guest
        .send_frame_with_hdr(&hdr(1, 1, 1460, 34, 6), &query)
        .unwrap();
    let syn = syn();
    guest
        .send_frame_with_hdr(&hdr(1, 1, 0, 34, 16), &syn)
        .unwrap();
    assert_silent(&mut guest, "after malformed offload headers");
    eventually("the drops", || {
        served.counters.drops(DropReason::BadVirtioHeader) == 6
            && served.counters.drops(DropReason::L4BadChecksum) == 1
    });
}

#[test]
fn offload_headers_are_refused_when_not_negotiated() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut guest = SimGuest::connect(&served.socket, options(false)).unwrap();
    let query = dns_query(0x78, "bulk.example");
    guest
        .send_frame_with_hdr(&hdr(1, 0, 0, 34, 6), &query)
        .unwrap();
    assert_silent(&mut guest, "NEEDS_CSUM without VIRTIO_NET_F_CSUM");
    eventually("the drop", || {
        served.counters.drops(DropReason::BadVirtioHeader) == 1
    });
}

#[test]
fn an_oversized_tso_frame_is_dropped_without_reading_it_all() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut guest = SimGuest::connect(&served.socket, options(true)).unwrap();
    // A 4 MiB chain: the header and a TSO SYN, then 63 descriptors of 64 KiB (the same
    // scratch memory over and over), then one pointing outside guest memory. moat must stop
    // at the descriptor that makes the frame too long: it reads at most one frame's worth,
    // and never reaches the bad last descriptor (that would be a bad_descriptor drop).
    let scratch = guest.scratch_gpa();
    let mut head = hdr(1, 1, 1460, 34, 16).to_vec();
    head.extend_from_slice(&syn());
    guest.write_guest_mem(scratch, &head);
    let end = guest
        .guest_mem_layout()
        .iter()
        .map(|&(gpa, len)| gpa + len as u64)
        .max()
        .unwrap();
    let next = moat_sim::guest::VIRTQ_DESC_F_NEXT;
    let mut chain = vec![moat_sim::guest::RawDesc {
        addr: scratch,
        len: head.len() as u32,
        flags: next,
        next: 1,
    }];
    for i in 1..64u16 {
        chain.push(moat_sim::guest::RawDesc {
            addr: scratch,
            len: 64 * 1024,
            flags: next,
            next: i + 1,
        });
    }
    chain.push(moat_sim::guest::RawDesc {
        addr: end + (1 << 30),
        len: 64 * 1024,
        flags: 0,
        next: 0,
    });
    let total: u64 = chain.iter().map(|d| u64::from(d.len)).sum();
    guest.send_raw_chain(&chain).unwrap();
    eventually("the drop", || {
        served.counters.drops(DropReason::Oversized) == 1
    });
    let read = served.counters.traffic(Traffic::TxBytes);
    assert!(
        read <= 12 + 14 + 65535,
        "moat read {read} bytes of a {total}-byte chain: more than the largest frame"
    );
    assert_eq!(
        served.counters.drops(DropReason::BadDescriptor),
        0,
        "the descriptors past the limit were never read"
    );
    assert_silent(&mut guest, "an oversized TSO frame");
}

#[test]
fn a_tcp_segment_with_a_bad_checksum_is_counted_and_opens_nothing() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let served = Served::start(&policy(proxy.addr), true);
    let mut net = guest_net(&served, false);
    let addr = net.resolve_a("bulk.example", T).unwrap();
    let guest = net.sim();
    let mut syn = craft::tcp_syn(GUEST_MAC, GW_MAC, (GUEST, 40001), (addr, 80));
    syn[14 + 20 + 16] ^= 0x40; // the TCP checksum
    guest.send_frame(&syn).unwrap();
    assert_silent(guest, "a SYN with a bad checksum");
    eventually("the drop", || {
        served.counters.drops(DropReason::L4BadChecksum) == 1
    });
    assert!(proxy.requests().is_empty(), "nothing reached the proxy");
}
