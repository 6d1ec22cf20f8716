//! The simulated guest's TX side: frames posted as one descriptor or a chain (scatter-
//! gather too), arbitrary malformed chains for the security tests, and used chains
//! reclaimed onto the free list of the active queue pair.

use std::time::{Duration, Instant};

use super::{
    wait_any, GuestError, RawDesc, SimGuest, TX, TX_PATIENCE, TX_SLOT, VIRTIO_NET_HDR_LEN,
    VIRTQ_DESC_F_NEXT,
};

impl SimGuest {
    /// Send a frame behind an all-zero virtio-net header.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), GuestError> {
        self.send_frame_with_hdr(&[0u8; VIRTIO_NET_HDR_LEN], frame)
    }

    /// Send a frame behind the given virtio-net header: one descriptor holding both, or a
    /// chain of 16 KiB descriptors when the frame is longer.
    pub fn send_frame_with_hdr(
        &mut self,
        hdr: &[u8; VIRTIO_NET_HDR_LEN],
        frame: &[u8],
    ) -> Result<(), GuestError> {
        let mut data = Vec::with_capacity(VIRTIO_NET_HDR_LEN + frame.len());
        data.extend_from_slice(hdr);
        data.extend_from_slice(frame);
        let pieces: Vec<&[u8]> = data.chunks(TX_SLOT).collect();
        self.post_tx(&pieces, frame.len())
    }

    /// Send a frame as a scatter-gather chain, as a guest kernel often does: the header in
    /// its own descriptor, then one descriptor per non-empty segment (segments longer than
    /// 16 KiB take several).
    pub fn send_frame_sg(
        &mut self,
        hdr: &[u8; VIRTIO_NET_HDR_LEN],
        segments: &[&[u8]],
    ) -> Result<(), GuestError> {
        let mut pieces: Vec<&[u8]> = vec![hdr];
        for s in segments {
            pieces.extend(s.chunks(TX_SLOT));
        }
        let len = segments.iter().map(|s| s.len()).sum();
        self.post_tx(&pieces, len)
    }

    /// Post `pieces` (each at most one TX slot) as one device-readable chain on the
    /// active TX pair.
    fn post_tx(&mut self, pieces: &[&[u8]], frame_len: usize) -> Result<(), GuestError> {
        if pieces.len() > usize::from(self.pairs[self.active_tx].rings[TX].size) {
            return Err(GuestError::FrameTooLong(frame_len));
        }
        let ids = self.take_tx_descs(pieces.len())?;
        let pair = &mut self.pairs[self.active_tx];
        for (i, (&id, piece)) in ids.iter().zip(pieces).enumerate() {
            let addr = pair.tx_base + u64::from(id) * TX_SLOT as u64;
            self.mem.write(addr, piece);
            let last = i + 1 == ids.len();
            let desc = RawDesc {
                addr,
                len: piece.len() as u32,
                flags: if last { 0 } else { VIRTQ_DESC_F_NEXT },
                next: if last { 0 } else { ids[i + 1] },
            };
            pair.rings[TX].write_desc(&self.mem, id, desc);
        }
        let head = ids[0];
        pair.tx_inflight.insert(head, ids);
        pair.tx_posted += 1;
        if pair.rings[TX].publish(&self.mem, head) {
            pair.kick(TX);
        }
        Ok(())
    }

    /// Post an arbitrary, possibly malformed, chain on the active TX queue and kick. Descriptors go into
    /// free descriptor slots in order, the first one is the head. A `next` below
    /// `chain.len()` names an element of this chain (its slot is filled in); any other
    /// `next` is written verbatim (out of range, or into someone else's slot, on purpose).
    /// Addresses, lengths and flags are written as given. A chain longer than the queue
    /// cannot be posted (use a loop or an indirect table for that).
    pub fn send_raw_chain(&mut self, chain: &[RawDesc]) -> Result<(), GuestError> {
        let queue_size = self.pairs[self.active_tx].rings[TX].size;
        if chain.is_empty() || chain.len() > usize::from(queue_size) {
            return Err(GuestError::ChainLength {
                len: chain.len(),
                queue_size,
            });
        }
        let ids = self.take_tx_descs(chain.len())?;
        let pair = &mut self.pairs[self.active_tx];
        for (d, &id) in chain.iter().zip(&ids) {
            let next = ids.get(usize::from(d.next)).copied().unwrap_or(d.next);
            pair.rings[TX].write_desc(&self.mem, id, RawDesc { next, ..*d });
        }
        let head = ids[0];
        pair.tx_inflight.insert(head, ids);
        pair.tx_posted += 1;
        pair.rings[TX].publish(&self.mem, head);
        pair.kick(TX);
        Ok(())
    }

    /// Take `n` free descriptors of the active TX queue, reclaiming used ones (and waiting
    /// a little) if needed.
    fn take_tx_descs(&mut self, n: usize) -> Result<Vec<u16>, GuestError> {
        let deadline = Instant::now() + TX_PATIENCE;
        loop {
            self.reclaim_tx();
            let pair = &mut self.pairs[self.active_tx];
            if pair.tx_free.len() >= n {
                let at = pair.tx_free.len() - n;
                let mut ids = pair.tx_free.split_off(at);
                ids.reverse();
                return Ok(ids);
            }
            if Instant::now() > deadline {
                return Err(GuestError::TxStalled);
            }
            pair.kick(TX);
            wait_any(&[&pair.calls[TX]], Duration::from_millis(10));
        }
    }

    /// Return the descriptors of every chain the device has used on the active TX queue to
    /// its free list.
    fn reclaim_tx(&mut self) {
        let pair = &mut self.pairs[self.active_tx];
        let _ = pair.calls[TX].read();
        while let Some((head, _)) = pair.rings[TX].pop_used(&self.mem) {
            if let Some(ids) = pair.tx_inflight.remove(&head) {
                pair.tx_free.extend(ids);
            }
            pair.tx_completed += 1;
        }
    }

    /// TX chains (used elements) the device has returned so far, over all pairs.
    pub fn tx_completed(&self) -> u64 {
        self.pairs.iter().map(|p| p.tx_completed(&self.mem)).sum()
    }

    /// TX chains posted and not returned yet, over all pairs.
    pub fn tx_in_flight(&self) -> u64 {
        self.pairs
            .iter()
            .map(|p| p.tx_posted.saturating_sub(p.tx_completed(&self.mem)))
            .sum()
    }
}
