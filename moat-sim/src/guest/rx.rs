//! The simulated guest's RX side: RX buffers posted (also too short, as a hostile driver
//! would), used buffers taken back and assembled into frames (MRG_RXBUF), round-robin over
//! the queue pairs, and the kit's one receive loop ([`SimGuest::recv_until`]).

use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vmm_sys_util::eventfd::EventFd;

use super::{
    wait_any, GuestError, PartialRx, RawDesc, RxFrame, SimGuest, MAX_RX_FRAME, RX,
    VIRTIO_NET_HDR_LEN, VIRTQ_DESC_F_WRITE,
};

impl SimGuest {
    /// Post RX buffer `i` (descriptor `i`) of queue pair `p`; returns whether the device
    /// wants a kick.
    pub(super) fn post_rx(&mut self, p: usize, i: u16) -> bool {
        let pair = &mut self.pairs[p];
        let desc = RawDesc {
            addr: pair.rx_base + u64::from(i) * u64::from(self.rx_buffer_size),
            len: pair.rx_post_len,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        };
        pair.rings[RX].write_desc(&self.mem, i, desc);
        pair.rings[RX].publish(&self.mem, i)
    }

    /// As a hostile driver: from now on post every RX buffer of queue pair `pair` `len`
    /// bytes long (zero included; at most the buffers' real size), and rewrite the
    /// descriptors of its RX buffers already posted to that length (the device reads a
    /// descriptor only when it takes the chain).
    ///
    /// # Panics
    /// If `pair` is not below [`SimGuest::queue_pairs`] (a bug in the caller).
    pub fn set_rx_buffer_len(&mut self, pair: usize, len: u32) {
        let size = self.rx_buffer_size;
        let pair = &mut self.pairs[pair];
        pair.rx_post_len = len.min(size);
        for i in 0..pair.rings[RX].size {
            let desc = RawDesc {
                addr: pair.rx_base + u64::from(i) * u64::from(size),
                len: pair.rx_post_len,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            };
            pair.rings[RX].write_desc(&self.mem, i, desc);
        }
    }

    /// Receive one frame (virtio-net header stripped), waiting up to `timeout`.
    pub fn recv_frame(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, GuestError> {
        Ok(self.recv_frame_with_hdr(timeout)?.map(|(_, f)| f))
    }

    /// Receive frames until one satisfies `pred` (frames that do not are passed over), for
    /// up to `within`: that frame, or `Ok(None)` when the time ran out first. The one
    /// receive loop of the kit: tests, benchmarks and the canary wait for answers with it.
    pub fn recv_until(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>, GuestError> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv_frame(left)? {
                Some(frame) if pred(&frame) => return Ok(Some(frame)),
                _ => {}
            }
        }
    }

    /// Receive one frame and its virtio-net header, assembling MRG_RXBUF buffers
    /// (`num_buffers` in the header). `Ok(None)` when nothing complete arrived in `timeout`;
    /// a frame whose buffers are still coming is kept and finished by the next call.
    /// With several queue pairs, frames are taken from every pair's RX queue, round-robin
    /// (each pair assembles its own frames).
    pub fn recv_frame_with_hdr(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<RxFrame>, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.pairs.len();
            for k in 0..n {
                let p = (self.rx_next + k) % n;
                while let Some(used) = self.pairs[p].rings[RX].pop_used(&self.mem) {
                    let buf = self.take_rx(p, used);
                    if let Some(frame) = self.assemble(p, buf) {
                        self.rx_next = (p + 1) % n;
                        self.largest_rx = self.largest_rx.max(frame.1.len());
                        return Ok(Some(frame));
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Re-check the rings at least every 50 ms even if a notification goes missing.
            let calls: Vec<&EventFd> = self.pairs.iter().map(|p| &p.calls[RX]).collect();
            wait_any(&calls, left.min(Duration::from_millis(50)));
            for call in calls {
                let _ = call.read();
            }
        }
    }

    /// Add one used RX buffer of pair `p` to the frame being assembled there; the frame
    /// once complete.
    fn assemble(&mut self, p: usize, buf: Vec<u8>) -> Option<RxFrame> {
        let mrg_rxbuf = self.has_feature(VIRTIO_NET_F_MRG_RXBUF);
        let pair = &mut self.pairs[p];
        let mut partial = match pair.rx_partial.take() {
            Some(mut p) => {
                p.data.extend_from_slice(&buf);
                p.buffers_left -= 1;
                p
            }
            None => {
                let buffers = if mrg_rxbuf && buf.len() >= 12 {
                    u16::from_le_bytes([buf[10], buf[11]]).max(1)
                } else {
                    1
                };
                PartialRx {
                    data: buf,
                    buffers_left: buffers - 1,
                }
            }
        };
        if partial.buffers_left > 0 && partial.data.len() < MAX_RX_FRAME {
            pair.rx_partial = Some(partial);
            return None;
        }
        pair.rx_frames += 1;
        let mut hdr = [0u8; VIRTIO_NET_HDR_LEN];
        let n = partial.data.len().min(VIRTIO_NET_HDR_LEN);
        hdr[..n].copy_from_slice(&partial.data[..n]);
        partial.data.drain(..n);
        Some((hdr, partial.data))
    }

    /// Copy one used RX buffer of pair `p` out and give it back to the device.
    fn take_rx(&mut self, p: usize, (id, len): (u16, u32)) -> Vec<u8> {
        let len = len.min(self.rx_buffer_size) as usize;
        let mut buf = vec![0u8; len];
        let addr = self.pairs[p].rx_base + u64::from(id) * u64::from(self.rx_buffer_size);
        self.mem.read(addr, &mut buf);
        if self.post_rx(p, id) {
            self.pairs[p].kick(RX);
        }
        buf
    }
}
