//! Host side of guest flows: each allowed guest TCP connection is terminated in the stack
//! and re-originated to the host proxy (HTTP CONNECT), all in the queue pair's event loop.
//!
//! [`Flows`] owns the stack and the flow table. The device feeds it guest packets
//! ([`Flows::guest_tcp`]), proxy socket readiness ([`Flows::host_event`]) and timer ticks,
//! and takes back the IP packets for the guest ([`Flows::pump`]).

pub mod connect;
pub mod explicit;
pub mod fd_budget;
pub mod flow;
pub mod snapshot;
pub mod sniff;
pub mod socks5;
pub mod steering;
pub mod udp;

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stack::SocketHandle;
use smoltcp::socket::tcp::State;

use vmm_sys_util::epoll::EventSet;

use crate::dns::tcp::DnsConn;
use crate::dns::upstream::{self as dns_upstream, Upstream};
use crate::dns::{NamePool, DNS_PORT};
use crate::firewall::gate::{self, Admitted, NameSource, Requested};
use crate::frame::{Ipv4, Tcp, Udp};
use crate::policy::{Forward, Policy, Protocol, Via};
use crate::stack::Stack;
use crate::telemetry::{Counters, DropReason, FlowEvent};
use explicit::Front;
use flow::{End, Flow, FlowKey, FlowRoute, Negotiation, Phase};
pub use snapshot::FlowSnapshot;
use steering::{SteerKey, Steering};

/// How the flow table asks the event loop to watch proxy sockets.
pub trait Registrar: Send + Sync {
    fn register(&self, fd: RawFd, token: u64) -> std::io::Result<()>;
    fn unregister(&self, fd: RawFd, token: u64) -> std::io::Result<()>;
}

/// What an event token belongs to.
#[derive(Clone, Copy, Debug)]
enum Owner {
    Flow(FlowKey),
    Listener(usize),
    Udp(udp::UdpKey),
    /// The upstream resolver's socket (read on every pump).
    Upstream,
}

/// What a stack socket belongs to.
#[derive(Clone, Copy, Debug)]
enum SocketOwner {
    Flow(FlowKey),
    Waiting(FlowKey),
    Dns(u64),
}

/// What the next pump must look at: the flows with news (their socket changed, their proxy
/// socket is ready, the guest sent them something), so that the work of an event is in
/// proportion to the flows it concerns, not to the flows open. Everything is looked at
/// anyway every `sweep_every`, for timeouts.
#[derive(Debug, Default)]
struct Pending {
    flows: HashSet<FlowKey>,
    waiting: HashSet<FlowKey>,
    dns: HashSet<u64>,
    udp: HashSet<udp::UdpKey>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.flows.is_empty()
            && self.waiting.is_empty()
            && self.dns.is_empty()
            && self.udp.is_empty()
    }
}

/// Gateway-side ports of forwarded connections, as the guest sees them.
const FORWARD_PORTS: std::ops::Range<u16> = 20000..60000;

/// Event ids reach the backend as u16, so that is the last token.
const LAST_FLOW_TOKEN: u64 = u16::MAX as u64;
/// How long a flow to an IP literal may take to show its name, and an explicit-proxy client
/// its request head.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused explicit-proxy client gets to read its HTTP error before a reset.
const ANSWER_LINGER: Duration = Duration::from_secs(5);

/// A guest connection moat accepted (handshake done) and reads before it can be admitted.
#[derive(Clone, Copy, Debug)]
struct Waiting {
    handle: SocketHandle,
    since: Instant,
    kind: WaitKind,
    /// Bytes already looked at: the first bytes are parsed again only when they grew.
    seen: usize,
}

/// What a waiting connection's first bytes decided: admitted (with the explicit-proxy
/// front's work, if it came from there), or refused with the HTTP status an explicit-proxy
/// client gets (0: a reset).
type FirstBytes = Result<(Admitted, Option<Front>), (DropReason, u16)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitKind {
    /// An IP literal that only a name rule can allow: its SNI or Host decides.
    Sniff,
    /// A client of the explicit-proxy port: its request head decides.
    Front,
    /// A refused explicit-proxy client reading its HTTP error; closed, then forgotten.
    Answered,
}
/// Rounds of stack <-> proxy progress per pump, at most (bounded work per event).
const MAX_ROUNDS: usize = 64;
/// Every open flow is looked at this often (idle, handshake and sniffing timeouts), at most.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// A guest connection to the gateway's DNS over TCP: its socket, and what answers it.
#[derive(Debug)]
struct DnsTcp {
    key: FlowKey,
    handle: SocketHandle,
    answers: DnsConn,
}

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
    stack: Stack,
    policy: Arc<Policy>,
    names: Arc<Mutex<NamePool>>,
    counters: Arc<Counters>,
    registrar: Option<Box<dyn Registrar>>,
    flows: HashMap<FlowKey, Flow>,
    by_token: HashMap<u64, Owner>,
    /// Open flows with no traffic for this long are reset.
    idle: Duration,
    /// The upstream resolver (`dns.mode = "upstream"`), opened on first use.
    upstream: Option<Upstream>,
    /// UDP associations through the SOCKS5 proxy.
    udp: HashMap<udp::UdpKey, udp::Assoc>,
    /// Where associations read a datagram from their relay.
    udp_scratch: Option<Box<[u8]>>,
    /// Forwards added at run time (`moat forward add`), on top of the policy's.
    runtime_forwards: Vec<Forward>,
    /// Guest connections to the gateway's DNS over TCP, by id, and their ids by flow key.
    dns_conns: HashMap<u64, DnsTcp>,
    dns_by_key: HashMap<FlowKey, u64>,
    /// Who each stack socket belongs to.
    by_socket: HashMap<SocketHandle, SocketOwner>,
    /// What the next pump must look at.
    pending: Pending,
    /// When everything is looked at next (timeouts), and how often.
    next_sweep: Instant,
    sweep_every: Duration,
    next_dns_conn: u64,
    /// Accepted guest connections waiting for their first bytes (sniffing, explicit proxy).
    waiting: HashMap<FlowKey, Waiting>,
    /// `[[forward]]` listeners while a frontend is connected.
    listeners: Vec<(TcpListener, u64, Forward)>,
    next_forward_port: u16,
    next_token: u64,
    /// Tokens below this belong to the event loop (queues, its own events, timer).
    first_token: u64,
    free_tokens: Vec<u64>,
    /// With several queue pairs: which pair this is, and the VM's flow owners.
    steering: Steering,
    /// This pair's slot in the descriptor budget ([`fd_budget`]).
    fd_slot: usize,
}

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flows")
            .field("flows", &self.flows.len())
            .finish()
    }
}

impl Flows {
    pub fn new(policy: Arc<Policy>, names: Arc<Mutex<NamePool>>, counters: Arc<Counters>) -> Flows {
        Flows {
            stack: Stack::new(&policy.vm),
            policy,
            names,
            counters,
            registrar: None,
            flows: HashMap::new(),
            by_token: HashMap::new(),
            listeners: Vec::new(),
            waiting: HashMap::new(),
            dns_conns: HashMap::new(),
            dns_by_key: HashMap::new(),
            by_socket: HashMap::new(),
            pending: Pending::default(),
            next_sweep: Instant::now(),
            sweep_every: SWEEP_EVERY.min(idle_timeout() / 10),
            next_dns_conn: 0,
            runtime_forwards: Vec::new(),
            udp: HashMap::new(),
            udp_scratch: None,
            upstream: None,
            idle: idle_timeout(),
            next_forward_port: FORWARD_PORTS.start,
            next_token: u64::MAX,
            first_token: u64::MAX,
            free_tokens: Vec::new(),
            steering: Steering::default(),
            fd_slot: 0,
        }
    }

    /// Which slot of the descriptor budget this flow table reports in (its queue pair).
    pub fn set_fd_slot(&mut self, slot: usize) {
        self.fd_slot = slot;
    }

    /// Room for one more flow needing `fds` descriptors: every kind of flow (TCP, sniffing,
    /// DNS over TCP, UDP association) counts against `limits.max_flows`, and the VM's flows
    /// stay within the descriptor budget.
    fn admit(&self, fds: usize) -> Result<(), DropReason> {
        let open = self.flows.len() + self.waiting.len() + self.dns_conns.len() + self.udp.len();
        if self.steering.open_flows(open) >= self.policy.limits.max_flows {
            return Err(DropReason::FlowLimit);
        }
        fd_budget::check(self.fd_slot, self.host_fds(), fds)
    }

    /// Descriptors the flows hold or are about to (registered sockets, and connections
    /// still waiting to be admitted, which will need one), for the descriptor budget.
    pub fn host_fds(&self) -> usize {
        self.by_token.len() + self.waiting.len()
    }

    /// Where this flow table sits: the first event token it may hand out (those below
    /// belong to its event loop) and, with several queue pairs, its part in steering.
    pub fn place(&mut self, first_token: u64, steering: Steering) {
        self.first_token = first_token;
        self.next_token = first_token;
        self.steering = steering;
    }

    /// Give the flow table the event loop it registers proxy sockets with, and open the
    /// `[[forward]]` listeners (a forward that cannot listen is logged and skipped).
    pub fn attach(&mut self, registrar: Box<dyn Registrar>) {
        self.registrar = Some(registrar);
        self.open_listeners();
    }

    /// Listen for every `[[forward]]` of the policy (closing any listeners open before).
    fn open_listeners(&mut self) {
        for (listener, token, _) in std::mem::take(&mut self.listeners) {
            self.by_token.remove(&token);
            if let Some(r) = &self.registrar {
                let _ = r.unregister(listener.as_raw_fd(), token);
            }
            self.free_tokens.push(token);
        }
        if !self.steering.owns_forwards() {
            return;
        }
        let forwards: Vec<Forward> = self
            .policy
            .forward
            .iter()
            .chain(&self.runtime_forwards)
            .cloned()
            .collect();
        for forward in forwards {
            let listener = match TcpListener::bind(forward.listen).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(listen = %forward.listen, error = %e, "cannot listen for a [[forward]]; check that the address is free");
                    continue;
                }
            };
            let Some(token) = self.alloc_token() else {
                break;
            };
            let index = self.listeners.len();
            if let Some(r) = &self.registrar {
                if r.register(listener.as_raw_fd(), token).is_err() {
                    continue;
                }
            }
            tracing::info!(listen = %forward.listen, guest_port = forward.guest_port, "forwarding to the guest");
            self.by_token.insert(token, Owner::Listener(index));
            self.listeners.push((listener, token, forward));
        }
    }

    /// Replace the run-time forwards (and re-listen if attached to a loop).
    pub fn set_runtime_forwards(&mut self, forwards: Vec<Forward>) {
        self.runtime_forwards = forwards;
        if self.registrar.is_some() {
            self.open_listeners();
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The guest acked segmentation offloads (HOST_TSO4 / GUEST_TSO4).
    pub fn set_large_segments(&mut self, from_guest: bool, to_guest: bool) {
        self.stack.set_large_segments(from_guest, to_guest);
    }

    /// Follow a reloaded policy: reset the flows it no longer allows (each is judged again
    /// by the gate, as it was first asked for), listen for its forwards. Returns how many
    /// flows were reset.
    pub fn reload(&mut self, policy: Arc<Policy>) -> usize {
        self.policy = policy;
        let policy = Arc::clone(&self.policy);
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
                    .chain(&self.runtime_forwards)
                    .any(|f| f.guest_port == *guest_port),
            };
            if !allowed {
                tracing::info!(flow = %flow.key, target = %flow.route.describe(), "reloaded policy no longer allows this flow: reset");
                flow.reset(&mut self.stack);
                reset += 1;
            }
        }
        for assoc in self.udp.values_mut() {
            if gate::readmit(&policy, &assoc.route).is_err() {
                assoc.close();
                reset += 1;
            }
        }
        // Explicit-proxy clients still sending their request: gone with the port.
        let gone: Vec<(FlowKey, SocketHandle)> = self
            .waiting
            .iter()
            .filter(|(key, w)| w.kind == WaitKind::Front && explicit_port != Some(key.dst_port))
            .map(|(key, w)| (*key, w.handle))
            .collect();
        for (key, handle) in gone {
            self.stack.socket(handle).abort();
            self.forget_waiting(key, handle);
            reset += 1;
        }
        // Every flow is judged again: the reset ones end at the next pump.
        self.pending.flows.extend(self.flows.keys().copied());
        self.pending.udp.extend(self.udp.keys().copied());
        if self.registrar.is_some() {
            self.open_listeners();
        }
        reset
    }

    /// The flow table, for `moat stats`.
    pub fn table(&self) -> Vec<FlowSnapshot> {
        let mut rows: Vec<FlowSnapshot> = self
            .flows
            .values()
            .map(|f| FlowSnapshot {
                flow: format!("tcp {}", f.key),
                target: f.route.describe(),
                state: f.state().to_string(),
                up: f.bytes_up,
                down: f.bytes_down,
                unit: "bytes",
            })
            .collect();
        rows.extend(self.udp.values().map(|a| FlowSnapshot {
            flow: a.key.to_string(),
            target: format!("{}:{}", a.route.target(), a.route.port()),
            state: if a.is_done() { "done" } else { "open" }.to_string(),
            up: a.datagrams_up,
            down: a.datagrams_down,
            unit: "datagrams",
        }));
        rows.sort_by(|a, b| a.flow.cmp(&b.flow));
        rows
    }

    fn alloc_token(&mut self) -> Option<u64> {
        match self.free_tokens.pop() {
            Some(t) => Some(t),
            None if self.next_token <= LAST_FLOW_TOKEN => {
                self.next_token += 1;
                Some(self.next_token - 1)
            }
            None => None,
        }
    }

    /// Accept host peers of a `[[forward]]`: allowed ones get a connection from the gateway
    /// to the guest port, spliced both ways; others are closed at once and counted.
    fn accept(&mut self, index: usize) {
        loop {
            let Some((listener, _, forward)) = self.listeners.get(index) else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(conn) => conn,
                Err(_) => return, // WouldBlock (edge-triggered: drained) or a transient error
            };
            let forward = forward.clone();
            if !forward.from.iter().any(|net| net.contains(&peer.ip())) {
                tracing::info!(%peer, listen = %forward.listen, "forward peer not in `from`: closed");
                self.counters.flow(FlowEvent::ForwardRefused);
                continue;
            }
            let held =
                self.flows.len() + self.waiting.len() + self.dns_conns.len() + self.udp.len();
            if self.steering.open_flows(held) >= self.policy.limits.max_flows
                || fd_budget::check(self.fd_slot, self.host_fds(), 0).is_err()
            {
                self.counters.flow(FlowEvent::ForwardRefused);
                continue;
            }
            if let Err(reason) = self.open_forward(stream, peer, &forward) {
                tracing::info!(%peer, reason = reason.as_str(), "forward not opened");
                self.counters.flow(FlowEvent::ForwardRefused);
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
        let policy = Arc::clone(&self.policy);
        let vm = &policy.vm;
        // A gateway-side port no live flow uses.
        let mut local_port = self.next_forward_port;
        for _ in 0..FORWARD_PORTS.len() {
            local_port = if local_port + 1 >= FORWARD_PORTS.end {
                FORWARD_PORTS.start
            } else {
                local_port + 1
            };
            let key = FlowKey {
                guest_port: forward.guest_port,
                dst: vm.gateway,
                dst_port: local_port,
            };
            if !self.flows.contains_key(&key) {
                break;
            }
        }
        self.next_forward_port = local_port;
        let key = FlowKey {
            guest_port: forward.guest_port,
            dst: vm.gateway,
            dst_port: local_port,
        };
        let handle = self
            .stack
            .connect(vm.gateway, local_port, vm.address, forward.guest_port)
            .ok_or(DropReason::TcpNoFlow)?;
        let Some(token) = self.alloc_token() else {
            self.stack.remove(handle);
            return Err(DropReason::FlowLimit);
        };
        if let Some(r) = &self.registrar {
            if r.register(stream.as_raw_fd(), token).is_err() {
                self.stack.remove(handle);
                self.free_tokens.push(token);
                return Err(DropReason::ProxyUnreachable);
            }
        }
        self.by_socket.insert(handle, SocketOwner::Flow(key));
        self.pending.flows.insert(key);
        let route = FlowRoute::Forward {
            peer,
            guest_port: forward.guest_port,
        };
        tracing::info!(%peer, guest_port = forward.guest_port, "forward open");
        self.counters.flow(FlowEvent::Opened);
        self.by_token.insert(token, Owner::Flow(key));
        let mut flow = Flow::new(key, route, Negotiation::Splice, handle, stream, token);
        flow.writable = true;
        flow.set_idle_timeout(self.idle);
        self.flows.insert(key, flow);
        self.steering.claim(SteerKey::Tcp(key));
        Ok(())
    }

    /// Forget the event loop (its connection ended) and close every flow.
    pub fn detach(&mut self) {
        for (key, flow) in self.flows.drain() {
            let _ = flow.stream.shutdown(std::net::Shutdown::Both);
            self.steering.release(SteerKey::Tcp(key));
        }
        let tcp = self.waiting.keys().chain(self.dns_by_key.keys());
        for key in tcp.copied().map(SteerKey::Tcp) {
            self.steering.release(key);
        }
        for key in self.udp.keys().copied().map(SteerKey::Udp) {
            self.steering.release(key);
        }
        self.listeners.clear();
        self.counters
            .flows_open
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.waiting.clear();
        self.dns_conns.clear();
        self.dns_by_key.clear();
        self.by_socket.clear();
        self.pending = Pending::default();
        self.udp.clear();
        self.upstream = None;
        self.by_token.clear();
        self.free_tokens.clear();
        self.next_token = self.first_token;
        self.registrar = None;
        fd_budget::note(self.fd_slot, 0);
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A guest TCP segment to a non-gateway address (the firewall checked addresses).
    pub fn guest_tcp(&mut self, ip: &Ipv4<'_>, tcp: &Tcp<'_>) -> Result<Carried, DropReason> {
        let key = FlowKey {
            guest_port: tcp.src_port,
            dst: ip.dst,
            dst_port: tcp.dst_port,
        };
        let local = self.flows.contains_key(&key)
            || self.waiting.contains_key(&key)
            || (self.steering.is_shared() && self.dns_by_key.contains_key(&key));
        if !local {
            if let Some(pair) = self.steering.elsewhere(SteerKey::Tcp(key)) {
                return Ok(Carried::Elsewhere(pair));
            }
        }
        let known = local
            || (key.dst == self.policy.vm.gateway && key.dst_port == DNS_PORT && tcp.flags.ack);
        if !known {
            if !tcp.flags.syn || tcp.flags.ack {
                return Err(DropReason::TcpNoFlow);
            }
            if tcp.flags.fin || tcp.flags.rst {
                return Err(DropReason::TcpBadFlags);
            }
            self.open(key)?;
        }
        if !self.stack.ingress(ip.packet) {
            return Err(DropReason::StackQueueFull);
        }
        Ok(Carried::Here)
    }

    fn open(&mut self, key: FlowKey) -> Result<(), DropReason> {
        self.admit(1)?;
        if self.steering.open_flows(
            self.flows.len() + self.waiting.len() + self.dns_conns.len() + self.udp.len(),
        ) >= self.policy.limits.max_flows
        {
            return Err(DropReason::FlowLimit);
        }
        if key.dst == self.policy.vm.gateway && key.dst_port == DNS_PORT {
            let handle = self
                .stack
                .listen(key.dst, key.dst_port, key.guest_port, false)
                .ok_or(DropReason::TcpNoFlow)?;
            self.next_dns_conn += 1;
            let id = self.next_dns_conn;
            let conn = DnsTcp {
                key,
                handle,
                answers: DnsConn::new(),
            };
            self.dns_conns.insert(id, conn);
            self.dns_by_key.insert(key, id);
            self.by_socket.insert(handle, SocketOwner::Dns(id));
            self.steering.claim(SteerKey::Tcp(key));
            return Ok(());
        }
        let gateway = self.policy.vm.gateway;
        if key.dst == gateway && Some(key.dst_port) == self.policy.proxy.explicit_port {
            // The explicit-proxy front: take the handshake, read the request, then decide.
            return self.wait(key, WaitKind::Front);
        }
        let dns_name = {
            let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            names.lookup(key.dst).map(str::to_string)
        };
        let named = dns_name.is_some();
        let requested = Requested::Address {
            ip: key.dst,
            dns_name,
        };
        match gate::admit(&self.policy, Protocol::Tcp, requested, key.dst_port) {
            Ok(admitted) => self.connect_proxy(key, admitted, None, None),
            Err(DropReason::NotAllowed)
                if !named && gate::may_name_later(&self.policy, key.dst, key.dst_port) =>
            {
                // Only a name can allow this flow: take the handshake, read the first bytes
                // (SNI or Host), then have the gate judge that name.
                self.wait(key, WaitKind::Sniff)
            }
            Err(reason) => Err(reason),
        }
    }

    /// Accept a guest connection whose first bytes decide where (if anywhere) it goes.
    fn wait(&mut self, key: FlowKey, kind: WaitKind) -> Result<(), DropReason> {
        let handle = self
            .stack
            .listen(key.dst, key.dst_port, key.guest_port, false)
            .ok_or(DropReason::TcpNoFlow)?;
        self.waiting.insert(
            key,
            Waiting {
                handle,
                since: Instant::now(),
                kind,
                seen: 0,
            },
        );
        self.by_socket.insert(handle, SocketOwner::Waiting(key));
        self.steering.claim(SteerKey::Tcp(key));
        Ok(())
    }

    /// Open the proxy connection of an allowed flow. `handle`: the guest socket if the
    /// handshake already happened (sniffed flows); else a new one holding its SYN-ACK.
    /// Only what the gate admitted gets here: there is no other way to a proxy socket.
    fn connect_proxy(
        &mut self,
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
        if self.registrar.is_none() {
            return Err(DropReason::EgressUnsupported);
        }
        let stream = connect_nonblocking(proxy).map_err(|e| {
            tracing::warn!(%proxy, error = %e, "cannot open a socket to the proxy");
            DropReason::ProxyUnreachable
        })?;
        let handle = match handle {
            Some(h) => h,
            None => self
                .stack
                .listen(key.dst, key.dst_port, key.guest_port, true)
                .ok_or(DropReason::TcpNoFlow)?,
        };
        let Some(token) = self.alloc_token() else {
            self.stack.remove(handle);
            return Err(DropReason::FlowLimit);
        };
        let registered = self
            .registrar
            .as_ref()
            .is_some_and(|r| r.register(stream.as_raw_fd(), token).is_ok());
        if !registered {
            self.stack.remove(handle);
            self.free_tokens.push(token);
            return Err(DropReason::ProxyUnreachable);
        }
        tracing::debug!(flow = %key, target = %admitted.target(), %proxy, "flow requested");
        self.counters.flow(FlowEvent::Opened);
        self.by_token.insert(token, Owner::Flow(key));
        self.by_socket.insert(handle, SocketOwner::Flow(key));
        self.pending.flows.insert(key);
        let route = FlowRoute::Egress(admitted);
        let mut flow = Flow::new(key, route, negotiation, handle, stream, token);
        flow.set_idle_timeout(self.idle);
        if let Some(front) = front {
            flow.set_front(front);
        }
        self.flows.insert(key, flow);
        self.steering.claim(SteerKey::Tcp(key));
        Ok(())
    }

    /// Readiness of a proxy socket (edge-triggered: remember it until WouldBlock).
    pub fn host_event(&mut self, token: u64, events: EventSet) {
        let key = match self.by_token.get(&token) {
            Some(Owner::Flow(key)) => *key,
            Some(Owner::Listener(index)) => return self.accept(*index),
            // An association reads and writes until WouldBlock when it is run.
            Some(Owner::Udp(key)) => {
                self.pending.udp.insert(*key);
                return;
            }
            // The resolver's socket is read on every pump.
            Some(Owner::Upstream) | None => return,
        };
        self.pending.flows.insert(key);
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        tracing::trace!(flow = %key, ?events, "proxy socket ready");
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            flow.readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            flow.writable = true;
        }
    }

    /// A guest UDP datagram to a non-gateway address: carried by a SOCKS5 association.
    pub fn guest_udp(&mut self, ip: &Ipv4<'_>, udp: &Udp<'_>) -> Result<Carried, DropReason> {
        let key = udp::UdpKey {
            guest_port: udp.src_port,
            dst: ip.dst,
            dst_port: udp.dst_port,
        };
        if !self.udp.contains_key(&key) {
            if let Some(pair) = self.steering.elsewhere(SteerKey::Udp(key)) {
                return Ok(Carried::Elsewhere(pair));
            }
            self.open_udp(key)?;
        }
        if let Some(assoc) = self.udp.get_mut(&key) {
            assoc.send(udp.payload);
            self.pending.udp.insert(key);
        }
        Ok(Carried::Here)
    }

    fn open_udp(&mut self, key: udp::UdpKey) -> Result<(), DropReason> {
        self.admit(2)?;
        if self.steering.open_flows(
            self.flows.len() + self.waiting.len() + self.dns_conns.len() + self.udp.len(),
        ) >= self.policy.limits.max_flows
        {
            return Err(DropReason::FlowLimit);
        }
        let dns_name = {
            let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            names.lookup(key.dst).map(str::to_string)
        };
        let requested = Requested::Address {
            ip: key.dst,
            dns_name,
        };
        let route = gate::admit(&self.policy, Protocol::Udp, requested, key.dst_port)?;
        if route.via() != Via::Socks5 || self.registrar.is_none() {
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
        let (Some(ct), Some(rt)) = (self.alloc_token(), self.alloc_token()) else {
            return Err(DropReason::FlowLimit);
        };
        let registered = self.registrar.as_ref().is_some_and(|r| {
            r.register(control.as_raw_fd(), ct).is_ok() && r.register(relay.as_raw_fd(), rt).is_ok()
        });
        if !registered {
            self.free_tokens.extend([ct, rt]);
            return Err(DropReason::ProxyUnreachable);
        }
        self.by_token.insert(ct, Owner::Udp(key));
        self.by_token.insert(rt, Owner::Udp(key));
        self.pending.udp.insert(key);
        self.counters.flow(FlowEvent::Opened);
        tracing::debug!(flow = %key, target = %route.target(), proxy = %route.proxy(), "udp association requested");
        self.udp
            .insert(key, udp::Assoc::new(key, route, control, relay, ct, rt));
        self.steering.claim(SteerKey::Udp(key));
        Ok(())
    }

    /// Forward a DNS query for an allowed name to the upstream resolver.
    pub fn forward_dns(
        &mut self,
        guest_port: u16,
        query: &[u8],
        name: String,
    ) -> Result<(), DropReason> {
        self.upstream()?
            .forward(dns_upstream::ReplyTo::Udp(guest_port), query, name)
    }

    /// The upstream resolver's socket, opened (and registered) on first use.
    fn upstream(&mut self) -> Result<&mut Upstream, DropReason> {
        if self.upstream.is_none() {
            let server = self.policy.dns.upstream.ok_or(DropReason::DnsMalformed)?;
            let upstream = Upstream::new(server).map_err(|_| DropReason::ProxyUnreachable)?;
            let token = self.alloc_token().ok_or(DropReason::FlowLimit)?;
            let registered = self
                .registrar
                .as_ref()
                .is_some_and(|r| r.register(upstream.socket.as_raw_fd(), token).is_ok());
            if !registered {
                self.free_tokens.push(token);
                return Err(DropReason::ProxyUnreachable);
            }
            self.by_token.insert(token, Owner::Upstream);
            self.upstream = Some(upstream);
        }
        self.upstream.as_mut().ok_or(DropReason::ProxyUnreachable)
    }

    /// Run UDP associations; retire finished ones. Packets for the guest go to `out`.
    fn run_udp(&mut self, out: &mut Vec<Vec<u8>>) {
        if self.udp.is_empty() {
            return;
        }
        let guest = self.policy.vm.address;
        let mtu = usize::from(self.policy.vm.mtu);
        // One datagram's room, reused by every association (allocated on first use).
        let scratch = self
            .udp_scratch
            .get_or_insert_with(|| vec![0; 65_536].into_boxed_slice());
        let mut done = Vec::new();
        for key in self.pending.udp.drain() {
            let Some(assoc) = self.udp.get_mut(&key) else {
                continue;
            };
            assoc.step(guest, mtu, scratch, out);
            if assoc.is_done() {
                done.push(key);
            }
        }
        for key in done {
            let Some(assoc) = self.udp.remove(&key) else {
                continue;
            };
            self.steering.release(SteerKey::Udp(key));
            for (fd, token) in [
                (assoc.control.as_raw_fd(), assoc.control_token),
                (assoc.relay.as_raw_fd(), assoc.relay_token),
            ] {
                self.by_token.remove(&token);
                if let Some(r) = &self.registrar {
                    let _ = r.unregister(fd, token);
                }
                self.free_tokens.push(token);
            }
            self.counters.flow(if assoc.failed {
                FlowEvent::ProxyFailed
            } else {
                FlowEvent::Closed
            });
            tracing::info!(flow = %key, up = assoc.datagrams_up, down = assoc.datagrams_down, "udp association closed");
        }
    }

    /// Serve the DNS-over-TCP connections with news; forget finished ones.
    fn answer_dns(&mut self) {
        let mut finished = Vec::new();
        let mut queued: Vec<(u64, Vec<u8>, String)> = Vec::new();
        for id in self.pending.dns.drain() {
            let Some(conn) = self.dns_conns.get_mut(&id) else {
                continue;
            };
            let answers = &mut conn.answers;
            if !answers.step(
                self.stack.socket(conn.handle),
                &self.policy.dns,
                &self.names,
                &self.counters,
            ) {
                finished.push(id);
                continue;
            }
            // mode = "upstream": what the connection could not answer goes to the resolver.
            answers.awaiting += answers.to_upstream.len();
            queued.extend(answers.to_upstream.drain(..).map(|(q, n)| (id, q, n)));
        }
        for id in finished {
            let Some(conn) = self.dns_conns.remove(&id) else {
                continue;
            };
            self.dns_by_key.remove(&conn.key);
            self.by_socket.remove(&conn.handle);
            self.stack.poll();
            self.stack.remove(conn.handle);
            self.steering.release(SteerKey::Tcp(conn.key));
        }
        for (id, query, name) in queued {
            let sent = self
                .upstream()
                .and_then(|u| u.forward(dns_upstream::ReplyTo::Tcp(id), &query, name));
            if let Err(reason) = sent {
                self.counters.drop_frame(
                    reason,
                    format_args!("dns over tcp: upstream query not sent"),
                );
            }
        }
    }

    /// Decide the waiting connections whose first bytes have arrived: sniffed flows by
    /// their SNI or Host, explicit-proxy clients by their request; each through the gate.
    fn decide_waiting(&mut self) {
        let keys: Vec<FlowKey> = self.pending.waiting.drain().collect();
        for key in keys {
            let Some(w) = self.waiting.get(&key).copied() else {
                continue;
            };
            let socket = self.stack.socket(w.handle);
            let state = socket.state();
            if w.kind == WaitKind::Answered {
                let over = matches!(state, State::Closed | State::TimeWait)
                    || w.since.elapsed() > ANSWER_LINGER;
                if over {
                    self.forget_waiting(key, w.handle);
                }
                continue;
            }
            let decided: Option<FirstBytes> = match state {
                State::Listen | State::Closed => Some(Err((DropReason::NotAllowed, 0))),
                _ if w.since.elapsed() > SNIFF_TIMEOUT => Some(Err((DropReason::NotAllowed, 0))),
                // A client may send its request and half-close at once (`printf | nc`): its
                // bytes are read in CloseWait too, and there they are all it will send.
                State::Established | State::CloseWait => {
                    let finished = state == State::CloseWait;
                    let queued = socket.recv_queue();
                    if queued <= w.seen && !finished {
                        None
                    } else {
                        if let Some(w) = self.waiting.get_mut(&key) {
                            w.seen = queued;
                        }
                        let first = match self.stack.socket(w.handle).peek(explicit::MAX_HEAD) {
                            Ok(first) => first.to_vec(),
                            Err(_) => Vec::new(),
                        };
                        match self.judge_first_bytes(&key, w.kind, &first) {
                            None if finished => Some(Err(match w.kind {
                                WaitKind::Front => (DropReason::ExplicitProxyMalformed, 400),
                                _ => (DropReason::NotAllowed, 0),
                            })),
                            decided => decided,
                        }
                    }
                }
                _ => None,
            };
            let Some(decided) = decided else { continue };
            let result = decided.and_then(|(admitted, front)| {
                tracing::debug!(flow = %key, target = %admitted.target(), "admitted by its first bytes");
                let is_front = front.is_some();
                self.waiting.remove(&key);
                self.by_socket.remove(&w.handle);
                self.steering.release(SteerKey::Tcp(key));
                self.connect_proxy(key, admitted, Some(w.handle), front)
                    .map_err(|reason| (reason, if is_front { 503 } else { 0 }))
            });
            let Err((reason, status)) = result else {
                continue;
            };
            self.counters.drop_frame(
                reason,
                format_args!("tcp {key}: not allowed by its first bytes"),
            );
            if self.flows.contains_key(&key) {
                continue;
            }
            if status != 0 {
                // An explicit-proxy client: an HTTP answer saying why, then close.
                let socket = self.stack.socket(w.handle);
                let _ = socket.send_slice(&explicit::error_response(status, reason.as_str()));
                socket.close();
                self.waiting.insert(
                    key,
                    Waiting {
                        kind: WaitKind::Answered,
                        since: Instant::now(),
                        ..w
                    },
                );
                self.by_socket.insert(w.handle, SocketOwner::Waiting(key));
                self.steering.claim(SteerKey::Tcp(key));
            } else {
                self.stack.socket(w.handle).abort();
                self.forget_waiting(key, w.handle);
            }
        }
    }

    /// What a waiting connection's first bytes decide: `None` to wait for more; an error
    /// carries the HTTP status an explicit-proxy client gets (0: a reset).
    fn judge_first_bytes(&self, key: &FlowKey, kind: WaitKind, first: &[u8]) -> Option<FirstBytes> {
        match kind {
            WaitKind::Sniff => match sniff::sniff(first) {
                sniff::Sniffed::NeedMore => None,
                sniff::Sniffed::NoName => Some(Err((DropReason::NotAllowed, 0))),
                sniff::Sniffed::Name(text, source) => {
                    let requested = Requested::Text { text, source };
                    Some(
                        gate::admit(&self.policy, Protocol::Tcp, requested, key.dst_port)
                            .map(|a| (a, None))
                            .map_err(|r| (r, 0)),
                    )
                }
            },
            WaitKind::Front => match explicit::read_head(first) {
                explicit::Head::NeedMore => None,
                explicit::Head::Malformed(why) => {
                    tracing::debug!(flow = %key, why, "explicit proxy: bad request");
                    Some(Err((DropReason::ExplicitProxyMalformed, 400)))
                }
                explicit::Head::Request { host, port, front } => {
                    let requested = Requested::Text {
                        text: host,
                        source: NameSource::ExplicitProxy,
                    };
                    Some(
                        gate::admit(&self.policy, Protocol::Tcp, requested, port)
                            .map(|a| (a, Some(front)))
                            .map_err(|r| (r, 403)),
                    )
                }
            },
            WaitKind::Answered => None,
        }
    }

    fn forget_waiting(&mut self, key: FlowKey, handle: SocketHandle) {
        self.waiting.remove(&key);
        self.by_socket.remove(&handle);
        self.steering.release(SteerKey::Tcp(key));
        self.stack.poll();
        self.stack.remove(handle);
    }

    /// Everything is looked at now and then: timeouts need no event of their own.
    fn sweep_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + self.sweep_every;
        let due = self
            .flows
            .iter()
            .filter(|(_, f)| f.due(now))
            .map(|(k, _)| *k);
        self.pending.flows.extend(due);
        let due = self.waiting.iter().filter(|(_, w)| {
            let limit = match w.kind {
                WaitKind::Answered => ANSWER_LINGER,
                WaitKind::Sniff | WaitKind::Front => SNIFF_TIMEOUT,
            };
            now.duration_since(w.since) > limit
        });
        self.pending.waiting.extend(due.map(|(k, _)| *k));
        self.pending.dns.extend(self.dns_conns.keys().copied());
        self.pending.udp.extend(self.udp.keys().copied());
    }

    /// The flows whose stack socket changed in the last poll now have news.
    fn note_touched(&mut self) {
        for handle in self.stack.take_touched() {
            match self.by_socket.get(&handle) {
                Some(SocketOwner::Flow(key)) => {
                    self.pending.flows.insert(*key);
                }
                Some(SocketOwner::Waiting(key)) => {
                    self.pending.waiting.insert(*key);
                }
                Some(SocketOwner::Dns(id)) => {
                    self.pending.dns.insert(*id);
                }
                None => {}
            }
        }
    }

    /// Move everything that can move; return the IP packets for the guest.
    pub fn pump(&mut self) -> Vec<Vec<u8>> {
        self.sweep_if_due();
        let mut done = Vec::new();
        for _ in 0..MAX_ROUNDS {
            self.stack.poll();
            self.note_touched();
            if self.pending.flows.is_empty()
                && self.pending.waiting.is_empty()
                && self.pending.dns.is_empty()
            {
                break;
            }
            self.decide_waiting();
            self.answer_dns();
            for key in std::mem::take(&mut self.pending.flows) {
                let Some(flow) = self.flows.get_mut(&key) else {
                    continue;
                };
                if flow.step(&mut self.stack) {
                    // It moved: it may move again once the stack has run.
                    self.pending.flows.insert(key);
                }
                if matches!(flow.phase, Phase::Done(_)) {
                    self.pending.flows.remove(&key);
                    done.push(key);
                }
            }
        }
        self.stack.poll();
        self.note_touched();
        self.reap(done);
        let mut out = self.stack.take_egress();
        self.run_udp(&mut out);
        let open = self.flows.len() + self.udp.len() + self.dns_conns.len() + self.waiting.len();
        self.counters
            .flows_open
            .store(open as u64, std::sync::atomic::Ordering::Relaxed);
        // What the descriptor budget counts for this pair (read by the other pairs).
        fd_budget::note(self.fd_slot, self.host_fds());
        if let Some(upstream) = self.upstream.as_mut() {
            let mut tcp = Vec::new();
            {
                let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
                upstream.receive(&mut names, &self.policy, &self.counters, &mut out, &mut tcp);
            }
            if !tcp.is_empty() {
                // Answers for DNS-over-TCP connections: into their streams, out at once.
                for (id, reply) in tcp {
                    if let Some(conn) = self.dns_conns.get_mut(&id) {
                        conn.answers.reply(&reply);
                        self.pending.dns.insert(id);
                    }
                }
                self.answer_dns();
                self.stack.poll();
                out.extend(self.stack.take_egress());
            }
        }
        out
    }

    /// Retire finished flows (`done`: the ones that finished in this pump).
    fn reap(&mut self, done: Vec<FlowKey>) {
        for key in done {
            let Some(flow) = self.flows.remove(&key) else {
                continue;
            };
            self.by_socket.remove(&flow.handle);
            self.steering.release(SteerKey::Tcp(key));
            self.by_token.remove(&flow.token);
            if let Some(r) = &self.registrar {
                let _ = r.unregister(flow.stream.as_raw_fd(), flow.token);
            }
            self.free_tokens.push(flow.token);
            let end = match flow.phase {
                Phase::Done(end) => end,
                _ => End::Closed,
            };
            // A reset/aborted socket still has its RST to send: poll before dropping it.
            self.stack.poll();
            self.stack.remove(flow.handle);
            self.counters.flow(match end {
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
        }
    }

    /// When the flow table next needs a pump of its own: news not yet looked at (now), a
    /// socket timer (retransmits, delayed ACKs), or the next sweep while anything is open.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        if !self.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        let stack = self.stack.poll_delay();
        let open = !self.flows.is_empty()
            || !self.waiting.is_empty()
            || !self.dns_conns.is_empty()
            || !self.udp.is_empty();
        let sweep = open.then(|| self.next_sweep.saturating_duration_since(Instant::now()));
        match (stack, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The flow idle timeout: `MOAT_FLOW_IDLE` seconds if set (operators and tests), else
/// [`flow::DEFAULT_IDLE`].
fn idle_timeout() -> Duration {
    std::env::var("MOAT_FLOW_IDLE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(flow::DEFAULT_IDLE)
}

/// A non-blocking connect to the proxy (it completes, or fails, in the event loop).
fn connect_nonblocking(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}
