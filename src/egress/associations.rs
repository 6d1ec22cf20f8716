//! The UDP associations of one flow table: one per guest (port, destination), each carried
//! by the SOCKS5 proxy ([`super::udp`] is how one association moves).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use super::key::FlowKey;
use super::shared::{connect_nonblocking, Shared};
use super::snapshot::FlowSnapshot;
use super::steering::{SteerKey, Steering};
use super::tokens::Owner;
use super::udp::Assoc;
use crate::firewall::gate::{self, Requested};
use crate::policy::{Protocol, Via};
use crate::telemetry::{DropReason, FlowEvent};

/// The UDP associations of one flow table, by key.
#[derive(Debug, Default)]
pub(super) struct Associations {
    assocs: HashMap<FlowKey, Assoc>,
    /// Where associations read a datagram from their relay.
    scratch: Option<Box<[u8]>>,
}

impl Associations {
    pub fn len(&self) -> usize {
        self.assocs.len()
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.assocs.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = FlowKey> + '_ {
        self.assocs.keys().copied()
    }

    /// Open an association for `key`, if the gate admits it (room was checked by the
    /// caller).
    pub fn open(&mut self, sh: &mut Shared, key: FlowKey) -> Result<(), DropReason> {
        let requested = Requested::Address {
            ip: key.dst,
            dns_name: sh.dns_name(key.dst),
        };
        let route = gate::admit(&sh.policy, Protocol::Udp, requested, key.dst_port)?;
        if route.via() != Via::Socks5 || !sh.tokens.is_attached() {
            return Err(DropReason::EgressUnsupported);
        }
        let control =
            connect_nonblocking(route.proxy()).map_err(|_| DropReason::ProxyUnreachable)?;
        let bind: SocketAddr = if route.proxy().ip().is_loopback() {
            "127.0.0.1:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| DropReason::ProxyUnreachable)?;
        let relay = std::net::UdpSocket::bind(bind).map_err(|_| DropReason::ProxyUnreachable)?;
        relay
            .set_nonblocking(true)
            .map_err(|_| DropReason::ProxyUnreachable)?;
        // If the second fails, the first is dropped: out of the loop, its token free.
        let registrations = [
            sh.tokens.register(control.as_raw_fd(), Owner::Udp(key))?,
            sh.tokens.register(relay.as_raw_fd(), Owner::Udp(key))?,
        ];
        sh.pending.udp.insert(key);
        sh.counters.flow(FlowEvent::Opened);
        tracing::debug!(flow = %key.udp(), target = %route.target(), proxy = %route.proxy(), "udp association requested");
        self.assocs
            .insert(key, Assoc::new(key, route, control, relay, registrations));
        sh.steering.claim(SteerKey::Udp(key));
        Ok(())
    }

    /// A datagram from the guest for `key`'s association.
    pub fn send(&mut self, sh: &mut Shared, key: FlowKey, payload: &[u8]) {
        if let Some(assoc) = self.assocs.get_mut(&key) {
            assoc.send(payload);
            sh.pending.udp.insert(key);
        }
    }

    /// Run the associations with news; retire finished ones. Packets for the guest go to
    /// `out`.
    pub fn run(&mut self, sh: &mut Shared, out: &mut Vec<Vec<u8>>) {
        if self.assocs.is_empty() {
            return;
        }
        let guest = sh.policy.vm.address;
        let mtu = usize::from(sh.policy.vm.mtu);
        // One datagram's room, reused by every association (allocated on first use).
        let scratch = self
            .scratch
            .get_or_insert_with(|| vec![0; 65_536].into_boxed_slice());
        let mut done = Vec::new();
        for key in sh.pending.udp.drain() {
            let Some(assoc) = self.assocs.get_mut(&key) else {
                continue;
            };
            assoc.step(guest, mtu, scratch, out);
            if assoc.is_done() {
                done.push(key);
            }
        }
        for key in done {
            let Some(assoc) = self.assocs.remove(&key) else {
                continue;
            };
            sh.steering.release(SteerKey::Udp(key));
            sh.counters.flow(if assoc.failed {
                FlowEvent::ProxyFailed
            } else {
                FlowEvent::Closed
            });
            tracing::info!(flow = %key.udp(), up = assoc.datagrams_up, down = assoc.datagrams_down, "udp association closed");
            // Dropping it takes its sockets out of the loop and frees their tokens.
        }
    }

    /// Close the associations the policy in force no longer allows. Returns how many.
    pub fn reload(&mut self, sh: &mut Shared) -> usize {
        let mut reset = 0;
        for assoc in self.assocs.values_mut() {
            if gate::readmit(&sh.policy, &assoc.route).is_err() {
                assoc.close();
                reset += 1;
            }
        }
        reset
    }

    /// The associations as `moat stats` shows them.
    pub fn rows(&self) -> impl Iterator<Item = FlowSnapshot> + '_ {
        self.assocs.values().map(|a| FlowSnapshot {
            flow: a.key.udp().to_string(),
            target: format!("{}:{}", a.route.target(), a.route.port()),
            state: if a.is_done() { "done" } else { "open" }.to_string(),
            up: a.datagrams_up,
            down: a.datagrams_down,
            unit: "datagrams",
        })
    }

    /// The event loop is gone: forget every association.
    pub fn detach(&mut self, steering: &Steering) {
        for key in self.assocs.keys() {
            steering.release(SteerKey::Udp(*key));
        }
        self.assocs.clear();
    }
}
