//! moat: a vhost-user-net backend with an inline firewall.
//!
//! The data path reads one way:
//! queue ([`device`]) -> frame ([`frame`]) -> verdict ([`firewall`]) ->
//! answer ([`services`]) | flow (later: `stack`, `egress`) | drop (counted in [`telemetry`]),
//! and back: answer -> frame -> queue.

pub mod canary;
pub mod control;
pub mod datapath;
pub mod device;
pub mod dns;
pub mod egress;
pub mod firewall;
pub mod frame;
pub mod guest;
pub mod policy;
pub mod sandbox;
pub mod services;
pub mod stack;
pub mod telemetry;
