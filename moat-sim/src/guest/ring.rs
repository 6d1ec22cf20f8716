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
