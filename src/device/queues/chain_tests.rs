//! queues.rs on synthesized descriptor chains, without a frontend: rings laid out in guest
//! memory the test owns with virtio-queue's `mock::MockSplitQueue` (the rust-vmm way), then
//! popped as the device pops them. Each test says what the guest posted and asserts what
//! queues.rs returns, counts and puts in the used ring.

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QUEUE: u16 = 16;
/// The RX used ring. Not the mock's `used_addr()`: virtio-queue 0.18's mock ends the avail
/// ring `len` bytes (not elements) after its start, so its used ring overlaps the avail
/// ring once a few chains are posted (see fuzz/fuzz_targets/queues.rs).
const USED: GuestAddress = GuestAddress(0x800);
/// Where buffers start, past the rings the mock lays out at 0.
const BUF: u64 = 0x1000;
/// The second region starts here; between the regions is a hole.
const REGION2: u64 = 0x20000;
/// In the hole: outside guest memory.
const HOLE: u64 = 0x18000;

/// Two 64 KiB regions with a hole between them.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(REGION2), 0x10000),
    ])
    .expect("guest memory")
}

/// One descriptor as the guest writes it: address, length, and whether the device may
/// write it (NEXT is added for all but the last of a chain).
type Desc = (u64, u32, bool);

/// Post `chains` on a split queue at guest address 0, as a driver does: descriptors in
/// table order, one avail entry per chain.
fn post<'m>(mem: &'m GuestMemoryMmap, chains: &[&[Desc]]) -> MockSplitQueue<'m, GuestMemoryMmap> {
    let mock = MockSplitQueue::create(mem, GuestAddress(0), QUEUE);
    let mut raw = Vec::new();
    for chain in chains {
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { raw.len() as u16 + 1 };
            raw.push(RawDescriptor::from(SplitDescriptor::new(
                addr, len, flags, next,
            )));
        }
    }
    mock.add_desc_chains(&raw, 0).expect("descriptors fit");
    mock
}

/// Read the first chain posted on `mock` with `read_tx_chain` (at most `max` bytes).
fn read_first(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    max: usize,
) -> (Result<usize, (ChainError, usize)>, Vec<u8>) {
    let mut queue: Queue = mock.create_queue().expect("a valid queue");
    let chain = queue
        .pop_descriptor_chain(mem)
        .expect("a chain is available");
    let mut buf = vec![0u8; 80 * 1024];
    let got = read_tx_chain(chain, &mut GuestReader::new(mem), &mut buf, max);
    (got, buf)
}

#[test]
fn tx_chain_of_several_descriptors_is_read_whole_and_in_order() {
    let mem = memory();
    // Header alone, then the frame in two pieces, the last in the other region.
    mem.write_slice(&[1u8; 12], GuestAddress(BUF)).unwrap();
    mem.write_slice(&[2u8; 100], GuestAddress(BUF + 0x100))
        .unwrap();
    mem.write_slice(&[3u8; 50], GuestAddress(REGION2)).unwrap();
    let mock = post(
        &mem,
        &[&[
            (BUF, 12, false),
            (BUF + 0x100, 100, false),
            (REGION2, 50, false),
        ]],
    );
    let (got, buf) = read_first(&mem, &mock, 65_550);
    assert_eq!(got, Ok(162));
    let want: Vec<u8> = [vec![1u8; 12], vec![2u8; 100], vec![3u8; 50]].concat();
    assert_eq!(buf[..162], want[..]);
}

#[test]
fn tx_chain_across_a_region_boundary_is_read() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10000), 0x10000),
    ])
    .unwrap();
    let pattern: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
    mem.write_slice(&pattern, GuestAddress(0x10000 - 100))
        .unwrap();
    let mock = post(&mem, &[&[(0x10000 - 100, 200, false)]]);
    let (got, buf) = read_first(&mem, &mock, 65_550);
    assert_eq!(got, Ok(200));
    assert_eq!(buf[..200], pattern[..]);
}

#[test]
fn write_only_descriptor_in_a_tx_chain_is_refused_after_what_was_read() {
    let mem = memory();
    let mock = post(&mem, &[&[(BUF, 12, false), (BUF + 0x100, 64, true)]]);
    let (got, _) = read_first(&mem, &mock, 65_550);
    assert_eq!(got, Err((ChainError::Bad, 12)));
    // Write-only from the first descriptor: nothing read.
    let mem = memory();
    let mock = post(&mem, &[&[(BUF, 64, true)]]);
    assert_eq!(read_first(&mem, &mock, 65_550).0, Err((ChainError::Bad, 0)));
}

#[test]
fn tx_chain_pointing_outside_guest_memory_is_refused() {
    let mem = memory();
    // Into the hole between the regions, after a good header.
    let mock = post(&mem, &[&[(BUF, 12, false), (HOLE, 64, false)]]);
    assert_eq!(
        read_first(&mem, &mock, 65_550).0,
        Err((ChainError::Bad, 12))
    );
    // Straddling the end of the first region into the hole.
    let mem = memory();
    let mock = post(&mem, &[&[(0x10000 - 8, 64, false)]]);
    assert_eq!(read_first(&mem, &mock, 65_550).0, Err((ChainError::Bad, 0)));
    // Past the end of guest memory.
    let mem = memory();
    let mock = post(&mem, &[&[(REGION2 + 0x10000, 16, false)]]);
    assert_eq!(read_first(&mem, &mock, 65_550).0, Err((ChainError::Bad, 0)));
}

#[test]
fn tx_chain_longer_than_the_limit_is_refused_at_the_descriptor_that_crosses_it() {
    let mem = memory();
    let mock = post(&mem, &[&[(BUF, 1000, false), (BUF + 0x1000, 1000, false)]]);
    assert_eq!(
        read_first(&mem, &mock, 1500).0,
        Err((ChainError::TooLong, 1000))
    );
    // Exactly the limit is fine.
    let mem = memory();
    let mock = post(&mem, &[&[(BUF, 1000, false), (BUF + 0x1000, 500, false)]]);
    assert_eq!(read_first(&mem, &mock, 1500).0, Ok(1500));
}

#[test]
fn rx_capacity_sums_writable_descriptors_and_refuses_a_readable_one() {
    let mem = memory();
    let mock = post(
        &mem,
        &[
            &[
                (BUF, 12, true),
                (BUF + 0x100, 100, true),
                (REGION2, 50, true),
            ],
            &[(BUF + 0x1000, 64, true), (BUF + 0x2000, 64, false)],
        ],
    );
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let mut queue: Queue = mock.create_queue().unwrap();
    let first = queue.pop_descriptor_chain(atomic.memory()).unwrap();
    assert_eq!(rx_capacity(&first), Some(162));
    let second = queue.pop_descriptor_chain(atomic.memory()).unwrap();
    assert_eq!(rx_capacity(&second), None);
}

/// An RX vring over the chains on `mock`, with the used ring at [`USED`].
fn rx_vring(
    mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
) -> VringRwLock {
    let vring = VringRwLock::new(atomic.clone(), QUEUE).expect("a vring");
    vring
        .set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, USED.0)
        .expect("ring addresses");
    vring.set_queue_size(QUEUE);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

/// The used ring's entries: (descriptor id, bytes written).
fn used(mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
    let idx: u16 = mem.read_obj(GuestAddress(USED.0 + 2)).unwrap();
    (0..u64::from(idx))
        .map(|i| {
            let at = USED.0 + 4 + 8 * i;
            (
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        })
        .collect()
}

/// Push `frame` and flush it into what the guest posted.
fn deliver(
    chains: &[&[Desc]],
    frame: &[u8],
    mrg_rxbuf: bool,
) -> (GuestMemoryMmap, Counters, RxQueue) {
    let mem = memory();
    let mock = post(&mem, chains);
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let vring = rx_vring(&mock, &atomic);
    let counters = Counters::default();
    let mut rx = RxQueue::default();
    rx.push_copy(frame, OutHdr::Plain, &counters);
    rx.flush(&vring, &atomic, mrg_rxbuf, &counters)
        .expect("no call eventfd: nothing to fail");
    (mem, counters, rx)
}

#[test]
fn rx_frame_fills_a_chain_of_several_descriptors() {
    let frame: Vec<u8> = (0..150u32).map(|i| i as u8).collect();
    let (mem, counters, rx) = deliver(
        &[&[
            (BUF, 12, true),
            (BUF + 0x100, 100, true),
            (REGION2, 100, true),
        ]],
        &frame,
        false,
    );
    assert_eq!(counters.traffic(Traffic::RxFrames), 1);
    assert_eq!(counters.traffic(Traffic::RxBytes), 150);
    assert_eq!(counters.total_drops(), 0);
    assert_eq!(rx.pending(), 0);
    assert_eq!(used(&mem), [(0, 162)]);
    let mut hdr = [0u8; VIRTIO_NET_HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(BUF)).unwrap();
    assert_eq!(hdr, OutHdr::Plain.bytes(1), "num_buffers 1");
    let mut got = vec![0u8; 150];
    mem.read_slice(&mut got[..100], GuestAddress(BUF + 0x100))
        .unwrap();
    mem.read_slice(&mut got[100..], GuestAddress(REGION2))
        .unwrap();
    assert_eq!(got, frame);
}

#[test]
fn rx_chain_too_short_for_the_frame_is_returned_unused_and_the_frame_dropped() {
    // Without MRG_RXBUF one chain must hold header and frame.
    let (mem, counters, rx) = deliver(
        &[&[(BUF, 12, true), (BUF + 0x100, 50, true)]],
        &[7u8; 100],
        false,
    );
    assert_eq!(counters.drops(DropReason::RxBufferTooSmall), 1);
    assert_eq!(counters.traffic(Traffic::RxFrames), 0);
    assert_eq!(rx.pending(), 0);
    assert_eq!(
        used(&mem),
        [(0, 0)],
        "the chain comes back with nothing written"
    );
}

#[test]
fn rx_frame_spreads_over_several_chains_with_mrg_rxbuf() {
    let frame = vec![9u8; 100];
    let (mem, counters, _) = deliver(
        &[
            &[(BUF, 64, true)],
            &[(BUF + 0x100, 64, true)],
            &[(BUF + 0x200, 64, true)],
        ],
        &frame,
        true,
    );
    assert_eq!(counters.traffic(Traffic::RxFrames), 1);
    // 112 bytes of header and frame: two chains, the third left posted.
    assert_eq!(used(&mem), [(0, 64), (1, 48)]);
    let mut hdr = [0u8; VIRTIO_NET_HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(BUF)).unwrap();
    assert_eq!(hdr, OutHdr::Plain.bytes(2), "num_buffers 2");
}

#[test]
fn rx_chain_with_a_readable_descriptor_is_refused() {
    let (mem, counters, rx) = deliver(
        &[&[(BUF, 64, true), (BUF + 0x100, 64, false)]],
        &[1u8; 60],
        false,
    );
    assert_eq!(counters.drops(DropReason::BadDescriptor), 1);
    assert_eq!(rx.pending(), 0);
    assert_eq!(used(&mem), [(0, 0)]);
}

#[test]
fn rx_chain_pointing_outside_guest_memory_drops_the_frame() {
    let (mem, counters, _) = deliver(&[&[(BUF, 12, true), (HOLE, 100, true)]], &[1u8; 60], false);
    assert_eq!(counters.drops(DropReason::BadDescriptor), 1);
    assert_eq!(counters.traffic(Traffic::RxFrames), 0);
    // Returned used; what was written before the bad descriptor is not counted.
    assert_eq!(used(&mem), [(0, 0)]);
}

#[test]
fn rx_frame_waits_when_nothing_is_posted() {
    let (mem, counters, rx) = deliver(&[], &[1u8; 60], true);
    assert_eq!(rx.pending(), 1, "the frame waits for buffers");
    assert_eq!(counters.total_drops(), 0);
    assert!(used(&mem).is_empty());
}

#[test]
fn rx_frame_larger_than_a_whole_ring_of_buffers_is_dropped_and_the_buffers_returned() {
    let descs: Vec<[Desc; 1]> = (0..u64::from(QUEUE))
        .map(|i| [(BUF + 0x100 * i, 16, true)])
        .collect();
    let chains: Vec<&[Desc]> = descs.iter().map(|d| &d[..]).collect();
    let (mem, counters, rx) = deliver(&chains, &[1u8; 1000], true);
    assert_eq!(counters.drops(DropReason::RxRingTooSmall), 1);
    assert_eq!(rx.pending(), 0);
    let used = used(&mem);
    assert_eq!(used.len(), usize::from(QUEUE));
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
}
