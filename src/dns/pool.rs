//! Synthetic addresses for allowlisted names (DESIGN "Flow naming"): with `mode = "proxy"`
//! the gateway answers A queries with an address from 198.18.0.0/15 that it remembers, and a
//! flow to that address later goes to the proxy by name. Stable for a name while the VM
//! lives; bounded (least recently used names give their address back).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;

use lru::LruCache;

pub use crate::policy::SYNTHETIC_NET;

/// Names remembered at most (each holds one address of the /15).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// name <-> synthetic address, least recently used first out.
#[derive(Debug)]
pub struct NamePool {
    by_name: LruCache<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
    /// Next never-used host index in the /15.
    next: u32,
    /// `mode = "upstream"`: real addresses the upstream resolver gave for allowed names.
    upstream: LruCache<Ipv4Addr, String>,
}

impl NamePool {
    pub fn new(capacity: usize) -> NamePool {
        // A /15 has 131070 host addresses; more names than that cannot be told apart.
        let capacity = capacity.clamp(1, 131_070);
        NamePool {
            by_name: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            by_addr: HashMap::new(),
            next: 1,
            upstream: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// The address for `name` (lowercase, no trailing dot), assigning one if needed.
    pub fn assign(&mut self, name: &str) -> Ipv4Addr {
        if let Some(addr) = self.by_name.get(name) {
            return *addr;
        }
        let addr = if self.by_name.len() < self.by_name.cap().get() {
            let addr = Ipv4Addr::from(u32::from(SYNTHETIC_NET.network()) + self.next);
            self.next += 1;
            addr
        } else {
            match self.by_name.pop_lru() {
                Some((old, addr)) => {
                    self.by_addr.remove(&addr);
                    tracing::debug!(evicted = %old, %addr, "synthetic name pool full");
                    addr
                }
                None => SYNTHETIC_NET.network(),
            }
        };
        self.by_name.put(name.to_string(), addr);
        self.by_addr.insert(addr, name.to_string());
        addr
    }

    /// The name an address stands for: a synthetic address of ours, or an address the
    /// upstream resolver gave for an allowed name.
    pub fn lookup(&self, addr: Ipv4Addr) -> Option<&str> {
        self.by_addr
            .get(&addr)
            .or_else(|| self.upstream.peek(&addr))
            .map(String::as_str)
    }

    /// Remember that the upstream resolver answered `name` with `addr`.
    pub fn remember(&mut self, addr: Ipv4Addr, name: &str) {
        self.upstream.put(addr, name.to_string());
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl Default for NamePool {
    fn default() -> Self {
        NamePool::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_unique_and_bounded() {
        let mut pool = NamePool::new(3);
        let a = pool.assign("a.example");
        let b = pool.assign("b.example");
        assert_ne!(a, b);
        assert!(SYNTHETIC_NET.contains(&a) && SYNTHETIC_NET.contains(&b));
        assert_eq!(pool.assign("a.example"), a, "stable");
        assert_eq!(pool.lookup(b), Some("b.example"));
        pool.assign("c.example");
        // a was used last before c; b is the least recently used and gives its address up.
        let d = pool.assign("d.example");
        assert_eq!(d, b);
        assert_eq!(pool.lookup(b), Some("d.example"));
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.assign("a.example"), a);
    }
}
