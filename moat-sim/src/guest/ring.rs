//! The driver side of a split virtqueue (virtio 1.2, 2.7), as a guest kernel runs it.
//!
//! Layout in guest memory, for a queue of `n` entries (all little-endian):
//!
//! ```text
//! desc   16 * n       { addr: u64, len: u32, flags: u16, next: u16 } per descriptor
//! avail  6 + 2 * n    flags: u16, idx: u16, ring: [u16; n], used_event: u16
//! used   6 + 8 * n    flags: u16, idx: u16, ring: [{ id: u32, len: u32 }; n], avail_event: u16
//! ```
//!
//! `used_event` (written by the driver) and `avail_event` (written by the device) are only
//! meaningful with VIRTIO_F_EVENT_IDX; without it the flags words suppress notifications.

use super::memory::GuestMemory;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// In the used ring's flags: the device does not want kicks (without EVENT_IDX).
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// A descriptor as written into the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    /// The 16 bytes of the descriptor as the device reads them.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One split virtqueue laid out in guest memory (guest-physical addresses).
pub struct SplitRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The driver's shadow of `avail.idx`.
    avail_idx: u16,
    /// The next used element the driver has not consumed yet.
    last_used: u16,
    event_idx: bool,
}

impl SplitRing {
    /// Bytes needed for a ring of `size` (descriptor table, avail ring, used ring), rounded
    /// up to a page.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let (desc, avail, used) = (16 * n, 6 + 2 * n, 6 + 8 * n);
        (desc + avail.next_multiple_of(4) + used).next_multiple_of(4096)
    }

    /// A ring at `base` (page aligned); the caller reserves `footprint(size)` bytes.
    pub fn new(base: u64, size: u16, event_idx: bool) -> SplitRing {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        SplitRing {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            event_idx,
        }
    }

    /// Address of `avail.used_event`.
    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    /// Address of `used.avail_event`.
    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }

    /// Write descriptor `index` (taken modulo the queue size).
    pub fn write_desc(&self, mem: &GuestMemory, index: u16, d: RawDesc) {
        mem.write(self.desc + 16 * u64::from(index % self.size), &d.to_bytes());
    }

    /// Make the chain starting at `head` available. Returns whether the device wants a kick.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) -> bool {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_u16(slot, head);
        let old = self.avail_idx;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // write_u16 fences: the entry (and the descriptors before it) are visible first.
        mem.write_u16(self.avail + 2, self.avail_idx);
        self.needs_kick(mem, old)
    }

    /// virtio 1.2, 2.7.10: kick when `avail_event` lies in (old, new], or without EVENT_IDX
    /// unless the device set NO_NOTIFY.
    fn needs_kick(&self, mem: &GuestMemory, old: u16) -> bool {
        if self.event_idx {
            let event = mem.read_u16(self.avail_event());
            let new = self.avail_idx;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            mem.read_u16(self.used) & VIRTQ_USED_F_NO_NOTIFY == 0
        }
    }

    /// Used elements the device has published that the driver has not popped yet.
    pub fn pending_used(&self, mem: &GuestMemory) -> u16 {
        mem.read_u16(self.used + 2).wrapping_sub(self.last_used)
    }

    /// Pop the next used element: (descriptor id modulo the queue size, bytes written).
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        if self.pending_used(mem) == 0 {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id = mem.read_u32(elem);
        let len = mem.read_u32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // used_event: interrupt us as soon as the next element is used.
            mem.write_u16(self.used_event(), self.last_used);
        }
        Some(((id % u32::from(self.size)) as u16, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GPA_BASE;

    #[test]
    fn layout_is_aligned_and_fits_the_footprint() {
        for size in [1u16, 2, 256, 1024, 32768] {
            let ring = SplitRing::new(GPA_BASE, size, true);
            assert_eq!(ring.desc % 16, 0);
            assert_eq!(ring.avail % 2, 0);
            assert_eq!(ring.used % 4, 0);
            let end = ring.used + 6 + 8 * u64::from(size);
            assert!(end <= GPA_BASE + SplitRing::footprint(size), "size {size}");
            assert_eq!(SplitRing::footprint(size) % 4096, 0);
        }
    }

    #[test]
    fn publish_kicks_as_event_idx_says_and_pop_used_follows_the_device() {
        let mem = GuestMemory::new(SplitRing::footprint(8) as usize, 1).unwrap();
        let mut ring = SplitRing::new(GPA_BASE, 8, true);
        // The device asks to be kicked when avail.idx passes 0 (avail_event = 0).
        assert!(ring.publish(&mem, 3), "first chain: kick");
        assert!(!ring.publish(&mem, 4), "avail_event still 0: no kick");
        // The device moves avail_event to 2: the next publish (idx 2 -> 3) crosses it.
        mem.write_u16(ring.avail_event(), 2);
        assert!(ring.publish(&mem, 5));
        assert_eq!(mem.read_u16(ring.avail + 2), 3);
        assert_eq!(
            mem.read_u16(ring.avail + 4 + 2 * 2),
            5,
            "third entry: head 5"
        );

        // The device uses chain 3 (12 bytes) and then chain 4.
        assert_eq!(ring.pop_used(&mem), None);
        for (i, (id, len)) in [(3u32, 12u32), (4, 0)].into_iter().enumerate() {
            let elem = ring.used + 4 + 8 * i as u64;
            mem.write(elem, &id.to_le_bytes());
            mem.write(elem + 4, &len.to_le_bytes());
        }
        mem.write_u16(ring.used + 2, 2);
        assert_eq!(ring.pending_used(&mem), 2);
        assert_eq!(ring.pop_used(&mem), Some((3, 12)));
        assert_eq!(
            mem.read_u16(ring.used_event()),
            1,
            "interrupt at the next one"
        );
        assert_eq!(ring.pop_used(&mem), Some((4, 0)));
        assert_eq!(ring.pop_used(&mem), None);
    }

    #[test]
    fn without_event_idx_no_notify_suppresses_kicks() {
        let mem = GuestMemory::new(SplitRing::footprint(4) as usize, 1).unwrap();
        let mut ring = SplitRing::new(GPA_BASE, 4, false);
        assert!(ring.publish(&mem, 0));
        mem.write_u16(ring.used, VIRTQ_USED_F_NO_NOTIFY);
        assert!(!ring.publish(&mem, 1));
    }

    #[test]
    fn descriptors_are_written_little_endian_at_their_index() {
        let mem = GuestMemory::new(SplitRing::footprint(4) as usize, 1).unwrap();
        let ring = SplitRing::new(GPA_BASE, 4, false);
        let d = RawDesc {
            addr: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
            flags: VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            next: 3,
        };
        // Index 6 is slot 2 (modulo the size).
        ring.write_desc(&mem, 6, d);
        let mut b = [0u8; 16];
        mem.read(ring.desc + 32, &mut b);
        assert_eq!(b, d.to_bytes());
        assert_eq!(b[..8], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[12..14], 3u16.to_le_bytes());
    }
}
