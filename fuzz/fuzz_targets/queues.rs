#![no_main]
//! TX descriptor chains against `device::queues::read_tx_chain` and its `GuestReader`, on
//! split rings synthesized with virtio-queue's `mock::MockSplitQueue` (the rust-vmm way to
//! lay out a driver's side of a queue in memory you own).
//!
//! Guest memory: two 64 KiB regions with a hole between them (0x0-0xffff, 0x20000-0x2ffff);
//! the rings sit at 0. Input: byte 0: the largest frame to accept (scaled); then records of
//! 8 bytes, one descriptor each: address (3 bytes, so in, between and past the regions),
//! length (2 bytes), flags (bit 0: device-writable, bit 1: last of its chain), a fill byte
//! (the descriptor's bytes are written with it when they lie in memory), and a
//! spare byte mixed into the address (unaligned, straddling).
//!
//! Oracle: a model of the chain built from the descriptors as laid out (not from the
//! queue's reading of them): the read fails on the first device-writable descriptor, the
//! first one past `max`, or the first outside guest memory (vm-memory's own `read_slice`
//! decides what is inside; an empty descriptor must start inside a region) — with the count read before it — and otherwise returns the
//! chain's total length, with exactly the bytes vm-memory reads at each descriptor.
use libfuzzer_sys::fuzz_target;
use moat::device::queues::{read_tx_chain, ChainError, GuestReader};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QUEUE: u16 = 32;
/// Where descriptor buffers may start: past the rings (which the mock lays out at 0).
const BUFFERS: u64 = 0x1000;

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

thread_local! {
    static MEM: GuestMemoryMmap = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x20000), 0x10000),
    ])
    .expect("guest memory");
}

fuzz_target!(|data: &[u8]| {
    let Some((&max_byte, records)) = data.split_first() else { return };
    let max = 64 + usize::from(max_byte) * 300; // up to ~76 KiB: below and past 64 KiB frames
    let mut chains: Vec<Vec<Desc>> = vec![Vec::new()];
    let mut fills = Vec::new();
    for r in records.chunks_exact(8).take(usize::from(QUEUE)) {
        let addr = BUFFERS + (u64::from(u32::from_le_bytes([r[0], r[1], r[2], 0])) % 0x40000) + u64::from(r[7] & 7);
        let len = u32::from(u16::from_le_bytes([r[3], r[4]]));
        let d = Desc { addr, len, write: r[5] & 1 != 0 };
        fills.push((d, r[6]));
        chains.last_mut().expect("one open chain").push(d);
        if r[5] & 2 != 0 {
            chains.push(Vec::new());
        }
    }
    if chains.last().is_some_and(Vec::is_empty) {
        chains.pop();
    }
    if chains.is_empty() {
        return;
    }
    MEM.with(|mem| {
        // Fresh rings and contents for every input.
        let _ = mem.write_slice(&[0u8; 0x1000], GuestAddress(0));
        for (d, fill) in &fills {
            // Only what lies in memory is written; the rest is what the reader must refuse.
            let _ = mem.write_slice(&vec![*fill; d.len as usize], GuestAddress(d.addr));
        }
        let mock = MockSplitQueue::create(mem, GuestAddress(0), QUEUE);
        let mut raw = Vec::new();
        for chain in &chains {
            for (i, d) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let flags = if d.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { raw.len() as u16 + 1 };
                raw.push(RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next)));
            }
        }
        mock.add_desc_chains(&raw, 0).expect("descriptors fit the table");
        let mut queue: Queue = mock.create_queue().expect("a valid queue");
        let mut reader = GuestReader::new(mem);
        let mut buf = vec![0u8; 80 * 1024];
        for chain in &chains {
            let desc_chain = queue
                .pop_descriptor_chain(mem)
                .expect("every chain laid out is available");
            let got = read_tx_chain(desc_chain, &mut reader, &mut buf, max);
            // The model.
            let mut expected_bytes = Vec::new();
            let mut expected = Ok(0usize);
            for d in chain {
                let read = expected_bytes.len();
                if d.write {
                    expected = Err((ChainError::Bad, read));
                    break;
                }
                if d.len as usize > max - read {
                    expected = Err((ChainError::TooLong, read));
                    break;
                }
                let mut bytes = vec![0u8; d.len as usize];
                // An empty descriptor must still point into guest memory (vm-memory reads
                // nothing anywhere; moat refuses an address outside memory either way).
                let outside = d.len == 0 && !mem.address_in_range(GuestAddress(d.addr));
                if outside || mem.read_slice(&mut bytes, GuestAddress(d.addr)).is_err() {
                    expected = Err((ChainError::Bad, read));
                    break;
                }
                expected_bytes.extend_from_slice(&bytes);
                expected = Ok(expected_bytes.len());
            }
            assert_eq!(got, expected, "chain {chain:x?} (max {max})");
            if let Ok(n) = got {
                assert!(n <= max);
                assert!(buf[..n] == expected_bytes[..], "chain {chain:x?}: bytes differ from guest memory");
            }
        }
        assert!(queue.pop_descriptor_chain(mem).is_none(), "more chains than laid out");
    });
});
