//! DNS at the gateway, in one place: the answer to a query ([`mod@answer`]), the synthetic
//! addresses of allowed names ([`pool`]), queries over UDP ([`udp`]) and over TCP ([`tcp`]),
//! and `mode = "upstream"`'s resolver ([`upstream`]).
//!
//! A guest's DNS frame goes datapath -> [`udp::UdpDns`] (answered, or handed to the flow
//! table's [`upstream::Upstream`]); a DNS-over-TCP connection is a flow of `egress` whose
//! bytes [`tcp::DnsConn`] answers.

pub mod answer;
pub mod pool;
pub mod tcp;
pub mod udp;
pub mod upstream;

/// The gateway's DNS port (UDP and TCP): part of the policy contract (the explicit-proxy
/// port may not take it), defined there.
pub use crate::policy::DNS_PORT;
pub use answer::{a_records, answer, decode, MAX_NAME_LEN, STATIC_TTL, SYNTHETIC_TTL};
pub use pool::NamePool;
pub use upstream::{
    read_upstream_reply, relay_answer, upstream_name, upstream_query, UpstreamAnswer,
};

#[cfg(test)]
mod tests;
