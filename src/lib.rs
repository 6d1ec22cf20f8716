//! moat: a vhost-user-net backend with an inline firewall.
//!
//! The data path reads one way, for a frame the guest sends:
//! queue ([`device`]) -> frame ([`frame`], parsed once) -> verdict ([`firewall`]) ->
//! answer ([`services`]: ARP, DHCP, ICMP, DNS) | flow ([`stack`] terminates the guest's TCP
//! and UDP, [`egress`] carries it through the proxy) | drop (counted in [`telemetry`]);
//! [`datapath`] routes between them, and the way back is answer or flow -> frame -> queue.
//! Around it: [`policy`] (the contract moat enforces), [`control`] (one VM's running state
//! and its control socket), [`sandbox`], and the [`canary`] that checks a running moat.
//!
//! The library exists for moat's own binary, benchmarks, fuzz targets and tests; it is not
//! a stable API. The simulated guest those drive moat with is the `moat-sim` crate.

pub mod canary;
pub mod control;
pub mod datapath;
pub mod device;
pub mod dns;
pub mod egress;
pub mod firewall;
pub mod frame;
pub mod policy;
pub mod sandbox;
pub mod services;
pub mod stack;
pub mod telemetry;
