//! The driver side of a split virtqueue (virtio 1.2, 2.7), as a guest kernel runs it.

use super::memory::GuestMemory;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// A descriptor as written into the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One split virtqueue laid out in guest memory.
pub struct SplitRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
}

impl SplitRing {
    /// Bytes needed for a ring of `size` (descriptor table, avail ring, used ring, aligned).
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let desc = 16 * n;
        let avail = (6 + 2 * n).next_multiple_of(4);
        let used = 6 + 8 * n;
        (desc + avail + used).next_multiple_of(4096)
    }

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

    pub fn write_desc(&self, mem: &GuestMemory, index: u16, d: RawDesc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        mem.write(self.desc + 16 * u64::from(index % self.size), &b);
    }

    /// Make the chain starting at `head` available. Returns whether the device wants a kick.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) -> bool {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_u16(slot, head);
        let old = self.avail_idx;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_u16(self.avail + 2, self.avail_idx);
        self.needs_kick(mem, old)
    }

    fn needs_kick(&self, mem: &GuestMemory, old: u16) -> bool {
        if self.event_idx {
            // avail_event lives after the used ring's entries.
            let event = mem.read_u16(self.used + 4 + 8 * u64::from(self.size));
            self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
        } else {
            mem.read_u16(self.used) & 1 == 0 // VIRTQ_USED_F_NO_NOTIFY
        }
    }

    /// Pop the next used element: (descriptor id, bytes written).
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let used_idx = mem.read_u16(self.used + 2);
        if used_idx == self.last_used {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id = mem.read_u32(elem);
        let len = mem.read_u32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // used_event: interrupt us when the next element is used.
            mem.write_u16(self.avail + 4 + 2 * u64::from(self.size), self.last_used);
        }
        Some(((id % u32::from(self.size)) as u16, len))
    }
}
