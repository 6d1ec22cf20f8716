//! Host side of guest flows: each allowed guest TCP connection is terminated in the stack
//! and re-originated to the host proxy (HTTP CONNECT), all in the queue pair's event loop.
//!
//! [`Flows`] is one queue pair's flow table: it takes guest packets ([`Flows::guest_tcp`],
//! [`Flows::guest_udp`]), host socket readiness ([`Flows::host_event`]) and timer ticks,
//! routes each to the kind of flow it concerns, and pumps them all ([`Flows::pump`]) for the
//! IP packets of the guest. Each kind of flow has its own table:
//!
//! - `tcp.rs`: TCP flows (one guest connection and its proxy connection each, [`flow`]);
//! - `waiting.rs`: accepted connections whose first bytes decide ([`sniff`], [`explicit`]);
//! - `associations.rs`: UDP associations through the SOCKS5 proxy ([`udp`]);
//! - `forwards.rs`: `[[forward]]` listeners, whose peers become TCP flows into the guest;
//! - `dns_flows.rs`: DNS over TCP at the gateway and the upstream resolver's socket.
//!
//! What they share (the stack, the policy, event [`tokens`], [`steering`], the flows with
//! news) is in `shared.rs`.

pub mod associations;
pub mod connect;
pub mod dns_flows;
pub mod explicit;
pub mod fd_budget;
pub mod flow;
pub mod forwards;
pub mod key;
mod shared;
pub mod snapshot;
pub mod sniff;
pub mod socks5;
pub mod steering;
pub mod tcp;
pub mod tokens;
pub mod udp;
pub mod waiting;

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use crate::dns::{NamePool, DNS_PORT};
use crate::firewall::gate::{self, Requested};
use crate::frame::{Ipv4, Tcp, Udp};
use crate::policy::{Forward, Policy, Protocol};
use crate::stack::Stack;
use crate::telemetry::{Counters, DropReason, FlowEvent};
use associations::Associations;
use dns_flows::DnsFlows;
use forwards::Forwards;
use shared::{idle_timeout, Pending, Shared};
use steering::{SteerKey, Steering};
use tcp::TcpFlows;
use tokens::{Owner, Tokens};
use waiting::{WaitKind, WaitingConns};

pub use key::FlowKey;
pub use snapshot::FlowSnapshot;
pub use tokens::Registrar;

/// Rounds of stack <-> proxy progress per pump, at most (bounded work per event).
const MAX_ROUNDS: usize = 64;
/// Every open flow is looked at this often (idle, handshake and sniffing timeouts), at most.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Where a guest packet of a flow went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    /// Into this pair's stack or association.
    Here,
    /// The flow belongs to another queue pair: hand the frame to that pair.
    Elsewhere(usize),
}

/// All flows of one queue pair of a VM (all of the VM's with one pair).
pub struct Flows {
    shared: Shared,
    tcp: TcpFlows,
    waiting: WaitingConns,
    udp: Associations,
    forwards: Forwards,
    dns: DnsFlows,
    /// When everything is looked at next (timeouts), and how often.
    next_sweep: Instant,
    sweep_every: Duration,
    /// This pair's slot in the descriptor budget ([`fd_budget`]).
    fd_slot: usize,
}

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flows")
            .field("flows", &self.tcp.len())
            .finish()
    }
}

impl Flows {
    pub fn new(policy: Arc<Policy>, names: Arc<Mutex<NamePool>>, counters: Arc<Counters>) -> Flows {
        Flows {
            shared: Shared {
                stack: Stack::new(&policy.vm),
                policy,
                names,
                counters,
                tokens: Tokens::default(),
                by_socket: Default::default(),
                pending: Pending::default(),
                steering: Steering::default(),
                idle: idle_timeout(),
            },
            tcp: TcpFlows::default(),
            waiting: WaitingConns::default(),
            udp: Associations::default(),
            forwards: Forwards::default(),
            dns: DnsFlows::default(),
            next_sweep: Instant::now(),
            sweep_every: SWEEP_EVERY.min(idle_timeout() / 10),
            fd_slot: 0,
        }
    }

    /// Which slot of the descriptor budget this flow table reports in (its queue pair).
    pub fn set_fd_slot(&mut self, slot: usize) {
        self.fd_slot = slot;
    }

    /// Flows open, of every kind: what `limits.max_flows` counts.
    fn open_count(&self) -> usize {
        self.tcp.len() + self.waiting.len() + self.dns.len() + self.udp.len()
    }

    /// Room for one more flow needing `fds` descriptors: every kind of flow (TCP, sniffing,
    /// DNS over TCP, UDP association, forward) counts against `limits.max_flows`, and the
    /// VM's flows stay within the descriptor budget.
    fn admit(&self, fds: usize) -> Result<(), DropReason> {
        let sh = &self.shared;
        if sh.steering.open_flows(self.open_count()) >= sh.policy.limits.max_flows {
            return Err(DropReason::FlowLimit);
        }
        fd_budget::check(self.fd_slot, self.host_fds(), fds)
    }

    /// Descriptors the flows hold or are about to (registered sockets, and connections
    /// still waiting to be admitted, which will need one), for the descriptor budget.
    pub fn host_fds(&self) -> usize {
        self.shared.tokens.held() + self.waiting.len()
    }

    /// Where this flow table sits: the first event token it may hand out (those below
    /// belong to its event loop) and, with several queue pairs, its part in steering.
    pub fn place(&mut self, first_token: u64, steering: Steering) {
        self.shared.tokens.place(first_token);
        self.shared.steering = steering;
    }

    /// Give the flow table the event loop it registers proxy sockets with, and open the
    /// `[[forward]]` listeners (a forward that cannot listen is logged and skipped).
    pub fn attach(&mut self, registrar: Box<dyn Registrar>) {
        self.shared.tokens.attach(registrar);
        self.forwards.listen(&self.shared);
    }

    /// Replace the run-time forwards (and re-listen if attached to a loop).
    pub fn set_runtime_forwards(&mut self, forwards: Vec<Forward>) {
        self.forwards.set_runtime(forwards);
        if self.shared.tokens.is_attached() {
            self.forwards.listen(&self.shared);
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.shared.policy
    }

    /// The guest acked segmentation offloads (HOST_TSO4 / GUEST_TSO4).
    pub fn set_large_segments(&mut self, from_guest: bool, to_guest: bool) {
        self.shared.stack.set_large_segments(from_guest, to_guest);
    }

    /// Follow a reloaded policy: reset the flows it no longer allows (each is judged again
    /// by the gate, as it was first asked for), listen for its forwards. Returns how many
    /// flows were reset.
    pub fn reload(&mut self, policy: Arc<Policy>) -> usize {
        let sh = &mut self.shared;
        sh.policy = policy;
        let mut reset = self.tcp.reload(sh, self.forwards.runtime());
        reset += self.udp.reload(sh);
        // Explicit-proxy clients still sending their request: gone with the port.
        reset += self.waiting.reload(sh);
        // Every flow is judged again: the reset ones end at the next pump.
        sh.pending.flows.extend(self.tcp.keys());
        sh.pending.udp.extend(self.udp.keys());
        if sh.tokens.is_attached() {
            self.forwards.listen(sh);
        }
        reset
    }

    /// The flow table, for `moat stats`.
    pub fn table(&self) -> Vec<FlowSnapshot> {
        let mut rows: Vec<FlowSnapshot> = self.tcp.rows().chain(self.udp.rows()).collect();
        rows.sort_by(|a, b| a.flow.cmp(&b.flow));
        rows
    }

    /// Forget the event loop (its connection ended) and close every flow.
    pub fn detach(&mut self) {
        let sh = &mut self.shared;
        // First: the flows dropped below give their tokens back without calling the loop.
        sh.tokens.detach();
        self.tcp.detach(&sh.steering);
        self.waiting.detach(&sh.steering);
        self.dns.detach(&sh.steering);
        self.udp.detach(&sh.steering);
        self.forwards.detach();
        sh.counters
            .flows_open
            .store(0, std::sync::atomic::Ordering::Relaxed);
        sh.by_socket.clear();
        sh.pending = Pending::default();
        sh.tokens.reset();
        fd_budget::note(self.fd_slot, 0);
    }

    pub fn len(&self) -> usize {
        self.tcp.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty()
    }

    /// A guest TCP segment to a non-gateway address (the firewall checked addresses).
    pub fn guest_tcp(&mut self, ip: &Ipv4<'_>, tcp: &Tcp<'_>) -> Result<Carried, DropReason> {
        let key = FlowKey {
            guest_port: tcp.src_port,
            dst: ip.dst,
            dst_port: tcp.dst_port,
        };
        let steering = &self.shared.steering;
        let local = self.tcp.contains(&key)
            || self.waiting.contains(&key)
            || (steering.is_shared() && self.dns.contains(&key));
        if !local {
            if let Some(pair) = steering.elsewhere(SteerKey::Tcp(key)) {
                return Ok(Carried::Elsewhere(pair));
            }
        }
        let gateway = self.shared.policy.vm.gateway;
        let known = local || (key.dst == gateway && key.dst_port == DNS_PORT && tcp.flags.ack);
        if !known {
            if !tcp.flags.syn || tcp.flags.ack {
                return Err(DropReason::TcpNoFlow);
            }
            if tcp.flags.fin || tcp.flags.rst {
                return Err(DropReason::TcpBadFlags);
            }
            self.open(key)?;
        }
        if !self.shared.stack.ingress(ip.packet) {
            return Err(DropReason::StackQueueFull);
        }
        Ok(Carried::Here)
    }

    /// A guest's SYN for a new flow: DNS over TCP, the explicit-proxy front, or a flow the
    /// gate judges by its address (or, if only a name could allow it, by its first bytes).
    fn open(&mut self, key: FlowKey) -> Result<(), DropReason> {
        self.admit(1)?;
        let sh = &mut self.shared;
        let gateway = sh.policy.vm.gateway;
        if key.dst == gateway && key.dst_port == DNS_PORT {
            return self.dns.open(sh, key);
        }
        if key.dst == gateway && Some(key.dst_port) == sh.policy.proxy.explicit_port {
            // The explicit-proxy front: take the handshake, read the request, then decide.
            return self.waiting.wait(sh, key, WaitKind::Front);
        }
        let dns_name = sh.dns_name(key.dst);
        let named = dns_name.is_some();
        let requested = Requested::Address {
            ip: key.dst,
            dns_name,
        };
        match gate::admit(&sh.policy, Protocol::Tcp, requested, key.dst_port) {
            Ok(admitted) => self.tcp.connect_proxy(sh, key, admitted, None, None),
            Err(DropReason::NotAllowed)
                if !named && gate::may_name_later(&sh.policy, key.dst, key.dst_port) =>
            {
                // Only a name can allow this flow: take the handshake, read the first bytes
                // (SNI or Host), then have the gate judge that name.
                self.waiting.wait(sh, key, WaitKind::Sniff)
            }
            Err(reason) => Err(reason),
        }
    }

    /// A guest UDP datagram to a non-gateway address: carried by a SOCKS5 association.
    pub fn guest_udp(&mut self, ip: &Ipv4<'_>, udp: &Udp<'_>) -> Result<Carried, DropReason> {
        let key = FlowKey {
            guest_port: udp.src_port,
            dst: ip.dst,
            dst_port: udp.dst_port,
        };
        if !self.udp.contains(&key) {
            if let Some(pair) = self.shared.steering.elsewhere(SteerKey::Udp(key)) {
                return Ok(Carried::Elsewhere(pair));
            }
            // A control connection and a relay socket.
            self.admit(2)?;
            self.udp.open(&mut self.shared, key)?;
        }
        self.udp.send(&mut self.shared, key, udp.payload);
        Ok(Carried::Here)
    }

    /// Forward a DNS query for an allowed name to the upstream resolver.
    pub fn forward_dns(
        &mut self,
        guest_port: u16,
        query: &[u8],
        name: String,
    ) -> Result<(), DropReason> {
        self.dns.forward(&self.shared, guest_port, query, name)
    }

    /// Readiness of a host socket (edge-triggered: remember it until WouldBlock).
    pub fn host_event(&mut self, token: u64, events: EventSet) {
        match self.shared.tokens.owner(token) {
            Some(Owner::Flow(key)) => {
                self.shared.pending.flows.insert(key);
                self.tcp.ready(key, events);
            }
            Some(Owner::Listener(index)) => self.accept(index),
            // An association reads and writes until WouldBlock when it is run.
            Some(Owner::Udp(key)) => {
                self.shared.pending.udp.insert(key);
            }
            // The resolver's socket is read on every pump.
            Some(Owner::Upstream) | None => {}
        }
    }

    /// Accept host peers of a `[[forward]]`: allowed ones get a connection from the gateway
    /// to the guest port, spliced both ways; others are closed at once and counted.
    fn accept(&mut self, index: usize) {
        let counters = Arc::clone(&self.shared.counters);
        while let Some((stream, peer, forward)) = self.forwards.accept(index, &counters) {
            if self.admit(0).is_err() {
                counters.flow(FlowEvent::ForwardRefused);
                continue;
            }
            if let Err(reason) = self.open_forward(stream, peer, &forward) {
                tracing::info!(%peer, reason = reason.as_str(), "forward not opened");
                counters.flow(FlowEvent::ForwardRefused);
            }
        }
    }

    fn open_forward(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        forward: &Forward,
    ) -> Result<(), DropReason> {
        stream
            .set_nonblocking(true)
            .map_err(|_| DropReason::ProxyUnreachable)?;
        let _ = stream.set_nodelay(true);
        let tcp = &self.tcp;
        let gateway = self.shared.policy.vm.gateway;
        let key = self
            .forwards
            .key(gateway, forward.guest_port, |k| tcp.contains(k));
        self.tcp.open_forward(&mut self.shared, key, stream, peer)
    }

    /// Decide the waiting connections whose first bytes have arrived: sniffed flows by
    /// their SNI or Host, explicit-proxy clients by their request; each through the gate.
    fn decide_waiting(&mut self) {
        let keys: Vec<FlowKey> = self.shared.pending.waiting.drain().collect();
        for key in keys {
            let sh = &mut self.shared;
            let Some((w, decided)) = self.waiting.decide(sh, key) else {
                continue;
            };
            let result = decided.and_then(|(admitted, front)| {
                tracing::debug!(flow = %key, target = %admitted.target(), "admitted by its first bytes");
                let is_front = front.is_some();
                self.waiting.admitted(sh, key, w.handle);
                self.tcp
                    .connect_proxy(sh, key, admitted, Some(w.handle), front)
                    .map_err(|reason| (reason, if is_front { 503 } else { 0 }))
            });
            let Err((reason, status)) = result else {
                continue;
            };
            sh.counters.drop_frame(
                reason,
                format_args!("tcp {key}: not allowed by its first bytes"),
            );
            if self.tcp.contains(&key) {
                continue;
            }
            self.waiting.refuse(sh, key, w, reason, status);
        }
    }

    /// Everything is looked at now and then: timeouts need no event of their own.
    fn sweep_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + self.sweep_every;
        let pending = &mut self.shared.pending;
        pending.flows.extend(self.tcp.due(now));
        pending.waiting.extend(self.waiting.due(now));
        pending.dns.extend(self.dns.ids());
        pending.udp.extend(self.udp.keys());
    }

    /// Move everything that can move; return the IP packets for the guest.
    pub fn pump(&mut self) -> Vec<Vec<u8>> {
        self.sweep_if_due();
        let mut done = Vec::new();
        for _ in 0..MAX_ROUNDS {
            self.shared.stack.poll();
            self.shared.note_touched();
            let pending = &self.shared.pending;
            if pending.flows.is_empty() && pending.waiting.is_empty() && pending.dns.is_empty() {
                break;
            }
            self.decide_waiting();
            self.dns.answer(&mut self.shared);
            self.tcp.step(&mut self.shared, &mut done);
        }
        let sh = &mut self.shared;
        sh.stack.poll();
        sh.note_touched();
        self.tcp.reap(sh, done);
        let mut out = sh.stack.take_egress();
        self.udp.run(sh, &mut out);
        let open = self.open_count();
        let sh = &mut self.shared;
        sh.counters
            .flows_open
            .store(open as u64, std::sync::atomic::Ordering::Relaxed);
        self.dns.receive(sh, &mut out);
        // What the descriptor budget counts for this pair (read by the other pairs).
        fd_budget::note(self.fd_slot, self.host_fds());
        out
    }

    /// When the flow table next needs a pump of its own: news not yet looked at (now), a
    /// socket timer (retransmits, delayed ACKs), or the next sweep while anything is open.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        if !self.shared.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        let stack = self.shared.stack.poll_delay();
        let open = self.open_count() > 0;
        let sweep = open.then(|| self.next_sweep.saturating_duration_since(Instant::now()));
        match (stack, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
