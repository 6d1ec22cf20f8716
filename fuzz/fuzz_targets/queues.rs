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
/// The used ring of the RX queue. Not the mock's `used_addr()`: virtio-queue 0.18's mock
/// ends the avail ring `len` bytes (not elements) after its start, so with more than a few
/// chains its used ring overlaps the avail ring (found here: used entries overwrote avail
/// entries 16 and up).
const USED: GuestAddress = GuestAddress(0x800);
/// Where RX buffers outside guest memory point (the hole between the regions).
const OUTSIDE: u64 = 0x18000;
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
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        tx(rest);
    } else {
        rx(mode & 2 != 0, rest);
    }
});

fn tx(data: &[u8]) {
    let Some((&max_byte, records)) = data.split_first() else {
        return;
    };
    let max = 64 + usize::from(max_byte) * 300; // up to ~76 KiB: below and past 64 KiB frames
    let mut chains: Vec<Vec<Desc>> = vec![Vec::new()];
    let mut fills = Vec::new();
    for r in records.chunks_exact(8).take(usize::from(QUEUE)) {
        let addr = BUFFERS
            + (u64::from(u32::from_le_bytes([r[0], r[1], r[2], 0])) % 0x40000)
            + u64::from(r[7] & 7);
        let len = u32::from(u16::from_le_bytes([r[3], r[4]]));
        let d = Desc {
            addr,
            len,
            write: r[5] & 1 != 0,
        };
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
                raw.push(RawDescriptor::from(SplitDescriptor::new(
                    d.addr, d.len, flags, next,
                )));
            }
        }
        mock.add_desc_chains(&raw, 0)
            .expect("descriptors fit the table");
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
                assert!(
                    buf[..n] == expected_bytes[..],
                    "chain {chain:x?}: bytes differ from guest memory"
                );
            }
        }
        assert!(
            queue.pop_descriptor_chain(mem).is_none(),
            "more chains than laid out"
        );
    });
}

/// RX: frames placed into the guest's posted chains by `RxQueue::flush` (through a real
/// `VringRwLock` on the synthesized ring), with and without MRG_RXBUF.
///
/// Input: byte 0: frame count and sizes; then 4-byte records, one descriptor each: length
/// (2 bytes), flags (bit 0: device-readable, i.e. wrong for RX; bit 1: last of its chain;
/// bit 2: placed outside guest memory), spare. Buffers do not overlap (so what is read back
/// is what moat wrote).
///
/// Oracle, from the used ring alone (for chains of at least a header each, as the spec
/// requires of a driver): read back, the bytes of the used chains are the
/// pushed frames, whole, in order (some may be dropped, none reordered, altered or cut),
/// each behind a plain header whose num_buffers is the number of chains it used (1 without
/// MRG_RXBUF); a chain is never filled past its capacity; every pushed frame is delivered,
/// dropped (counted) or still pending.
fn rx(mrg: bool, data: &[u8]) {
    use moat::device::queues::RxQueue;
    use moat::frame::virtio_hdr::{OutHdr, VIRTIO_NET_HDR_LEN};
    use moat::telemetry::{Counters, Traffic};
    use vhost_user_backend::{VringRwLock, VringT};
    use vm_memory::GuestMemoryAtomic;

    let Some((&shape, records)) = data.split_first() else {
        return;
    };
    let sizes = [60usize, 1514, 3000, 9000, 65_550];
    let frames: Vec<Vec<u8>> = (0..1 + usize::from(shape & 3))
        .map(|i| {
            let len = sizes[usize::from(shape >> (2 + i)) % sizes.len()];
            (0..len).map(|k| (k * 7 + i * 31) as u8).collect()
        })
        .collect();
    let mut chains: Vec<Vec<Desc>> = vec![Vec::new()];
    let mut cursor = BUFFERS;
    for r in records.chunks_exact(4).take(usize::from(QUEUE)) {
        let len = u32::from(u16::from_le_bytes([r[0], r[1]]));
        let outside = r[2] & 4 != 0;
        let addr = if outside { OUTSIDE } else { cursor };
        if !outside {
            if cursor < 0x20000 && cursor + u64::from(len) > 0x10000 {
                cursor = 0x20000; // the second region
            }
            if cursor + u64::from(len) > 0x30000 {
                break;
            }
        }
        let addr = if outside { addr } else { cursor };
        if !outside {
            cursor += u64::from(len);
        }
        chains.last_mut().expect("one open chain").push(Desc {
            addr,
            len,
            write: r[2] & 1 == 0,
        });
        if r[2] & 2 != 0 {
            chains.push(Vec::new());
        }
    }
    if chains.last().is_some_and(Vec::is_empty) {
        chains.pop();
    }
    MEM.with(|mem| {
        let _ = mem.write_slice(&[0u8; 0x1000], GuestAddress(0));
        let mock = MockSplitQueue::create(mem, GuestAddress(0), QUEUE);
        let mut raw = Vec::new();
        let mut heads = Vec::new();
        for chain in &chains {
            heads.push(raw.len() as u16);
            for (i, d) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let flags = if d.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { raw.len() as u16 + 1 };
                raw.push(RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next)));
            }
        }
        if !raw.is_empty() {
            mock.add_desc_chains(&raw, 0).expect("descriptors fit the table");
        }
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let vring = VringRwLock::new(atomic.clone(), QUEUE).expect("a vring");
        vring
            .set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, USED.0)
            .expect("ring addresses");
        vring.set_queue_size(QUEUE);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let counters = Counters::default();
        let mut rxq = RxQueue::default();
        for f in &frames {
            rxq.push_copy(f, OutHdr::Plain, &counters);
        }
        rxq.flush(&vring, &atomic, mrg, &counters).expect("no call eventfd: nothing to fail");
        let delivered = counters.traffic(Traffic::RxFrames) as usize;
        let dropped = counters.total_drops() as usize;
        assert_eq!(delivered + dropped + rxq.pending(), frames.len(), "frames lost");

        // Read the used ring back.
        let used = USED;
        let idx: u16 = mem.read_obj(GuestAddress(used.0 + 2)).expect("used idx");
        let mut entries = Vec::new();
        for i in 0..idx {
            let at = used.0 + 4 + 8 * u64::from(i % QUEUE);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
            let c = heads.iter().position(|h| u32::from(*h) == id).unwrap_or_else(|| {
                let avail: Vec<u16> = (0..chains.len() as u64)
                    .map(|k| mem.read_obj(GuestAddress(mock.avail_addr().0 + 4 + 2 * k)).unwrap_or(0xffff))
                    .collect();
                panic!("used id {id} is no chain head ({heads:?}, entry {i} of {idx}; avail {avail:?}; chains {:?})", chains.iter().map(Vec::len).collect::<Vec<_>>())
            });
            let cap: u64 = chains[c].iter().map(|d| u64::from(d.len)).sum();
            assert!(u64::from(len) <= cap, "chain {c} filled with {len} bytes, holds {cap}");
            let mut bytes = Vec::new();
            let mut left = len as usize;
            for d in &chains[c] {
                let n = left.min(d.len as usize);
                let mut b = vec![0u8; n];
                mem.read_slice(&mut b, GuestAddress(d.addr)).expect("written, so readable");
                bytes.extend_from_slice(&b);
                left -= n;
            }
            entries.push(bytes);
        }
        assert!(entries.len() <= chains.len());
        // A driver MUST post buffers of at least a header with MRG_RXBUF (virtio 1.2,
        // 5.1.6.3.1): with smaller ones moat may split the header or use an empty chain inside
        // a frame, so the read-back below holds only for buffers a driver may post (smaller
        // ones are still fuzzed for panics, hangs and the accounting above).
        // Nor with a buffer outside guest memory: a frame whose write fails in a later chain
        // is dropped, but the chains before it are already in the used ring with their
        // lengths (the guest sees num_buffers over a chain of length 0).
        let compliant = chains.iter().all(|c| {
            c.iter().map(|d| d.len as usize).sum::<usize>() >= VIRTIO_NET_HDR_LEN
                && c.iter().all(|d| d.addr != OUTSIDE)
        });
        if !compliant {
            return;
        }
        let mut next_frame = 0;
        let mut i = 0;
        let mut seen = 0;
        while i < entries.len() {
            if entries[i].is_empty() {
                i += 1; // a chain returned unused (its frame dropped)
                continue;
            }
            assert!(entries[i].len() >= VIRTIO_NET_HDR_LEN, "a chain with less than a header");
            let hdr = &entries[i][..VIRTIO_NET_HDR_LEN];
            assert_eq!(&hdr[..10], &[0u8; 10], "not a plain header");
            let n = usize::from(u16::from_le_bytes([hdr[10], hdr[11]]));
            assert!(n >= 1 && (mrg || n == 1), "num_buffers {n} (mrg_rxbuf {mrg})");
            assert!(i + n <= entries.len(), "num_buffers {n} past the used ring");
            let whole: Vec<u8> = entries[i..i + n].concat();
            assert!(entries[i..i + n].iter().all(|e| !e.is_empty()), "an empty chain inside a frame");
            let frame = &whole[VIRTIO_NET_HDR_LEN..];
            let at = frames[next_frame..]
                .iter()
                .position(|f| f[..] == *frame)
                .unwrap_or_else(|| panic!("delivered {} bytes that are no pushed frame (in order)", frame.len()));
            next_frame += at + 1;
            seen += 1;
            i += n;
        }
        assert_eq!(seen, delivered, "frames counted delivered vs found in the used ring");
        if std::env::var_os("MOAT_FUZZ_TRACE").is_some() {
            eprintln!("rx: {} frames, {delivered} delivered, {dropped} dropped, {} pending, {} used entries (mrg {mrg})", frames.len(), rxq.pending(), entries.len());
        }
    });
}
