//! Bandwidth limits (`limits.egress_bps`, `limits.ingress_bps`): token buckets that pace the
//! queues rather than drop. A frame may overdraw the bucket; the queue then waits until the
//! balance is positive again, so the long-run rate is the limit and no frame is lost.

use std::time::{Duration, Instant};

/// Burst: this much traffic at the full rate may pass at once (and at least 64 KiB). Large
/// enough that a consumer stalled by the host scheduler for a few tens of milliseconds does
/// not lose its share (over 10 s, a 50 ms burst lets the rate overshoot by 0.5% at most).
const BURST_TIME: Duration = Duration::from_millis(50);
const MIN_BURST: f64 = 64.0 * 1024.0;

/// A token bucket in bytes.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// `None` for 0 bits per second (unlimited). `burst_bytes` 0 = the default depth.
    pub fn new(bits_per_second: u64, burst_bytes: u64) -> Option<Pacer> {
        if bits_per_second == 0 {
            return None;
        }
        let rate = bits_per_second as f64 / 8.0;
        let burst = if burst_bytes > 0 {
            burst_bytes as f64
        } else {
            (rate * BURST_TIME.as_secs_f64()).max(MIN_BURST)
        };
        Some(Pacer {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        })
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether a frame may go now.
    pub fn ready(&mut self) -> bool {
        self.refill();
        self.tokens > 0.0
    }

    /// Account for a frame that went.
    pub fn spend(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }

    /// How long until a frame may go again (zero if it may now).
    pub fn wait(&mut self) -> Duration {
        self.refill();
        if self.tokens > 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((-self.tokens + 1.0) / self.rate)
        }
    }
}

/// One VM's bucket, shared by its queue pairs (a limit is per VM, whatever queue a frame
/// takes). Locked only when the policy sets a limit.
#[derive(Clone, Debug)]
pub struct SharedPacer(std::sync::Arc<std::sync::Mutex<Pacer>>);

impl SharedPacer {
    /// `None` for 0 bits per second (unlimited).
    pub fn new(bits_per_second: u64, burst_bytes: u64) -> Option<SharedPacer> {
        Pacer::new(bits_per_second, burst_bytes)
            .map(|p| SharedPacer(std::sync::Arc::new(std::sync::Mutex::new(p))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pacer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ready(&self) -> bool {
        self.lock().ready()
    }

    pub fn spend(&self, bytes: usize) {
        self.lock().spend(bytes);
    }

    pub fn wait(&self) -> Duration {
        self.lock().wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdraft_waits_until_repaid() {
        assert!(Pacer::new(0, 0).is_none(), "0 = unlimited");
        let mut p = Pacer::new(8_000_000, 0).unwrap(); // 1 MB/s, burst 64 KiB
        assert!(p.ready());
        p.spend(64 * 1024 + 100_000);
        assert!(!p.ready());
        let w = p.wait();
        assert!(
            w > Duration::from_millis(90) && w < Duration::from_millis(110),
            "{w:?}"
        );
    }

    #[test]
    fn burst_bytes_sets_the_depth() {
        let mut p = Pacer::new(8_000_000, 1_000_000).unwrap();
        p.spend(999_000);
        assert!(p.ready(), "a full 1 MB bucket still has tokens");
        p.spend(2_000);
        assert!(!p.ready());
        let mut q = Pacer::new(8_000_000, 0).unwrap();
        q.spend(999_000);
        assert!(!q.ready(), "the default depth is 64 KiB at 1 MB/s");
    }
}
