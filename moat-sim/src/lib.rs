//! moat-sim: moat's test kit.
//!
//! - [`guest`]: a simulated guest, a vhost-user frontend with a minimal virtio-net driver
//!   ([`guest::SimGuest`]) and a smoltcp stack on top of it ([`guest::GuestNet`]). The
//!   canary drives moat with it too, which is why the product depends on this crate.
//! - [`craft`]: guest-side frames (ARP, ICMP echo, UDP, TCP SYN, DHCP, a TLS ClientHello).
//! - With the `kit` feature, what tests and benchmarks share: `fixtures` (the test VM's
//!   addresses and policies, waiting for a condition, receiving until a frame matches),
//!   `process` (spawning the moat binary under test, `Reaped`), loopback `peers` and a
//!   CONNECT `proxy` with an origin server, `bench` helpers, and `backend` (reading
//!   descriptor chains in a stand-in vhost-user backend). The product builds without it.
//!
//! Nothing here depends on moat (moat depends on this crate): what moat's contract fixes
//! on the wire (the gateway's MAC, the virtio-net header layout) is restated here from the
//! contract and the virtio spec, as any guest would know it.

pub mod craft;
pub mod guest;
mod wire;

#[cfg(feature = "kit")]
pub mod backend;
#[cfg(feature = "kit")]
pub mod bench;
#[cfg(feature = "kit")]
pub mod fixtures;
#[cfg(feature = "kit")]
pub mod peers;
#[cfg(feature = "kit")]
pub mod process;
#[cfg(feature = "kit")]
pub mod proxy;

/// An Ethernet address, as the guest writes it into frames.
pub type Mac = [u8; 6];

/// The gateway's MAC address (moat's contract: the link's only other station).
pub const GATEWAY_MAC: Mac = [0x02, 0x6d, 0x6f, 0x61, 0x74, 0x01];
