//! The TCP flows of one flow table: each a guest connection spliced to its proxy connection
//! (or, for a `[[forward]]`, to the host peer the gateway accepted). How one flow moves is
//! [`super::flow`]; this is the table: opening, stepping, reaping, judging again on reload.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::explicit::Front;
use super::flow::{End, Flow, FlowRoute, Negotiation, Phase};
use super::key::FlowKey;
use super::shared::{connect_nonblocking, Shared, SocketOwner};
use super::snapshot::FlowSnapshot;
use super::steering::{SteerKey, Steering};
use super::tokens::Owner;
use crate::firewall::gate::{self, Admitted};
use crate::policy::{Forward, Via};
use crate::stack::SocketHandle;
use crate::telemetry::{DropReason, FlowEvent};

/// The TCP flows of one flow table, by key.
#[derive(Debug, Default)]
pub(super) struct TcpFlows {
    flows: HashMap<FlowKey, Flow>,
}

impl TcpFlows {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.flows.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = FlowKey> + '_ {
        self.flows.keys().copied()
    }

    /// The flows whose timeouts (idle, handshake) may have passed.
    pub fn due(&self, now: Instant) -> impl Iterator<Item = FlowKey> + '_ {
        self.flows
            .iter()
            .filter(move |(_, f)| f.due(now))
            .map(|(k, _)| *k)
    }

    /// Open the proxy connection of an allowed flow. `handle`: the guest socket if the
    /// handshake already happened (sniffed flows; it stays the caller's if this fails);
    /// else a new one holding its SYN-ACK. Only what the gate admitted gets here: there is
    /// no other way to a proxy socket.
    pub fn connect_proxy(
        &mut self,
        sh: &mut Shared,
        key: FlowKey,
        admitted: Admitted,
        handle: Option<SocketHandle>,
        front: Option<Front>,
    ) -> Result<(), DropReason> {
        let negotiation = match admitted.via() {
            Via::Http => Negotiation::HttpConnect,
            Via::Socks5 => Negotiation::Socks5Greeting,
        };
        let proxy = admitted.proxy();
        if !sh.tokens.is_attached() {
            return Err(DropReason::EgressUnsupported);
        }
        let stream = connect_nonblocking(proxy).map_err(|e| {
            tracing::warn!(%proxy, error = %e, "cannot open a socket to the proxy");
            DropReason::ProxyUnreachable
        })?;
        let (handle, new_socket) = match handle {
            Some(h) => (h, false),
            None => (
                sh.stack
                    .listen(key.dst, key.dst_port, key.guest_port, true)
                    .ok_or(DropReason::TcpNoFlow)?,
                true,
            ),
        };
        let registration = match sh.tokens.register(stream.as_raw_fd(), Owner::Flow(key)) {
            Ok(r) => r,
            Err(reason) => {
                if new_socket {
                    sh.stack.remove(handle);
                }
                return Err(reason);
            }
        };
        tracing::debug!(flow = %key, target = %admitted.target(), %proxy, "flow requested");
        sh.counters.flow(FlowEvent::Opened);
        sh.by_socket.insert(handle, SocketOwner::Flow(key));
        sh.pending.flows.insert(key);
        let route = FlowRoute::Egress(admitted);
        let mut flow = Flow::new(key, route, negotiation, handle, stream, registration);
        flow.set_idle_timeout(sh.idle);
        if let Some(front) = front {
            flow.set_front(front);
        }
        self.flows.insert(key, flow);
        sh.steering.claim(SteerKey::Tcp(key));
        Ok(())
    }

    /// Splice a host peer of a `[[forward]]` (accepted, allowed) to a new connection from
    /// the gateway's port `key.dst_port` to the guest's `key.guest_port`.
    pub fn open_forward(
        &mut self,
        sh: &mut Shared,
        key: FlowKey,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), DropReason> {
        let vm = &sh.policy.vm;
        let handle = sh
            .stack
            .connect(vm.gateway, key.dst_port, vm.address, key.guest_port)
            .ok_or(DropReason::TcpNoFlow)?;
        let registration = match sh.tokens.register(stream.as_raw_fd(), Owner::Flow(key)) {
            Ok(r) => r,
            Err(reason) => {
                sh.stack.remove(handle);
                return Err(reason);
            }
        };
        sh.by_socket.insert(handle, SocketOwner::Flow(key));
        sh.pending.flows.insert(key);
        let route = FlowRoute::Forward {
            peer,
            guest_port: key.guest_port,
        };
        tracing::info!(%peer, guest_port = key.guest_port, "forward open");
        sh.counters.flow(FlowEvent::Opened);
        let mut flow = Flow::new(
            key,
            route,
            Negotiation::Splice,
            handle,
            stream,
            registration,
        );
        flow.writable = true;
        flow.set_idle_timeout(sh.idle);
        self.flows.insert(key, flow);
        sh.steering.claim(SteerKey::Tcp(key));
        Ok(())
    }

    /// Readiness of a flow's proxy socket (edge-triggered: remember it until WouldBlock).
    pub fn ready(&mut self, key: FlowKey, events: EventSet) {
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        tracing::trace!(flow = %key, ?events, "proxy socket ready");
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            flow.readable = true;
        }
        if events.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
            flow.peer_closing = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            flow.writable = true;
        }
    }

    /// Step the flows with news; the ones that finished go to `done`.
    pub fn step(&mut self, sh: &mut Shared, done: &mut Vec<FlowKey>) {
        for key in std::mem::take(&mut sh.pending.flows) {
            let Some(flow) = self.flows.get_mut(&key) else {
                continue;
            };
            if flow.step(&mut sh.stack) {
                // It moved: it may move again once the stack has run.
                sh.pending.flows.insert(key);
            }
            if matches!(flow.phase, Phase::Done(_)) {
                sh.pending.flows.remove(&key);
                done.push(key);
            }
        }
    }

    /// Retire finished flows (`done`: the ones that finished in this pump).
    pub fn reap(&mut self, sh: &mut Shared, done: Vec<FlowKey>) {
        for key in done {
            let Some(flow) = self.flows.remove(&key) else {
                continue;
            };
            sh.by_socket.remove(&flow.handle);
            sh.steering.release(SteerKey::Tcp(key));
            let end = match flow.phase {
                Phase::Done(end) => end,
                _ => End::Closed,
            };
            // A reset/aborted socket still has its RST to send: poll before dropping it.
            sh.drop_socket(flow.handle);
            sh.counters.flow(match end {
                End::Closed => FlowEvent::Closed,
                End::ProxyRefused(_) | End::ProxyUnreachable | End::ProxyBadReply => {
                    FlowEvent::ProxyFailed
                }
                End::GuestReset | End::ProxyReset | End::IdleTimeout | End::PolicyReset => {
                    FlowEvent::Reset
                }
            });
            tracing::info!(
                flow = %key,
                target = %flow.route.describe(),
                end = end.as_str(),
                status = ?matches!(end, End::ProxyRefused(_)).then_some(end),
                bytes_up = flow.bytes_up,
                bytes_down = flow.bytes_down,
                duration_ms = flow.age().as_millis() as u64,
                rule = ?flow.route.rule(),
                "flow closed"
            );
            // Dropping the flow takes its proxy socket out of the loop and frees its token.
        }
    }

    /// Reset the flows the policy in force no longer allows (each judged again by the gate,
    /// as it was first asked for; a forward by the forwards in force). Returns how many.
    pub fn reload(&mut self, sh: &mut Shared, runtime_forwards: &[Forward]) -> usize {
        let policy = Arc::clone(&sh.policy);
        let explicit_port = policy.proxy.explicit_port;
        let mut reset = 0;
        for flow in self.flows.values_mut() {
            let allowed = match &flow.route {
                FlowRoute::Egress(admitted) => {
                    let front_kept = !flow.is_front() || explicit_port == Some(flow.key.dst_port);
                    front_kept && gate::readmit(&policy, admitted).is_ok()
                }
                FlowRoute::Forward { guest_port, .. } => policy
                    .forward
                    .iter()
                    .chain(runtime_forwards)
                    .any(|f| f.guest_port == *guest_port),
            };
            if !allowed {
                tracing::info!(flow = %flow.key, target = %flow.route.describe(), "reloaded policy no longer allows this flow: reset");
                flow.reset(&mut sh.stack);
                reset += 1;
            }
        }
        reset
    }

    /// The flows as `moat stats` shows them.
    pub fn rows(&self) -> impl Iterator<Item = FlowSnapshot> + '_ {
        self.flows.values().map(|f| FlowSnapshot {
            flow: format!("tcp {}", f.key),
            target: f.route.describe(),
            state: f.state().to_string(),
            up: f.bytes_up,
            down: f.bytes_down,
            unit: "bytes",
        })
    }

    /// The event loop is gone: close every proxy connection, forget every flow.
    pub fn detach(&mut self, steering: &Steering) {
        for (key, flow) in self.flows.drain() {
            let _ = flow.stream.shutdown(std::net::Shutdown::Both);
            steering.release(SteerKey::Tcp(key));
        }
    }
}
