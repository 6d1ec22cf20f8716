//! Host side of guest flows: each allowed guest TCP connection is terminated in the stack
//! and re-originated to the host proxy (HTTP CONNECT), all in the queue pair's event loop.
//!
//! [`Flows`] owns the stack and the flow table. The device feeds it guest packets
//! ([`Flows::guest_tcp`]), proxy socket readiness ([`Flows::host_event`]) and timer ticks,
//! and takes back the IP packets for the guest ([`Flows::pump`]).

pub mod connect;
pub mod flow;
pub mod route;
pub mod socks5;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::epoll::EventSet;

use crate::frame::{Ipv4, Tcp};
use crate::policy::{Policy, Via};
use crate::services::dns::NamePool;
use crate::stack::Stack;
use crate::telemetry::{Counters, DropReason, FlowEvent};
use flow::{End, Flow, FlowKey, Negotiation, Phase};

/// How the flow table asks the event loop to watch proxy sockets.
pub trait Registrar: Send + Sync {
    fn register(&self, fd: RawFd, token: u64) -> std::io::Result<()>;
    fn unregister(&self, fd: RawFd, token: u64) -> std::io::Result<()>;
}

/// The first token handed to proxy sockets (below are queues, the loop's own events, timer).
pub const FIRST_FLOW_TOKEN: u64 = 4;
/// Event ids reach the backend as u16, so that is the last token.
const LAST_FLOW_TOKEN: u64 = u16::MAX as u64;
/// Rounds of stack <-> proxy progress per pump, at most (bounded work per event).
const MAX_ROUNDS: usize = 64;

/// All flows of one VM.
pub struct Flows {
    stack: Stack,
    policy: Arc<Policy>,
    names: Arc<Mutex<NamePool>>,
    counters: Arc<Counters>,
    registrar: Option<Box<dyn Registrar>>,
    flows: HashMap<FlowKey, Flow>,
    by_token: HashMap<u64, FlowKey>,
    next_token: u64,
    free_tokens: Vec<u64>,
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
            next_token: FIRST_FLOW_TOKEN,
            free_tokens: Vec::new(),
        }
    }

    /// Give the flow table the event loop it registers proxy sockets with.
    pub fn attach(&mut self, registrar: Box<dyn Registrar>) {
        self.registrar = Some(registrar);
    }

    /// Forget the event loop (its connection ended) and close every flow.
    pub fn detach(&mut self) {
        for (_, flow) in self.flows.drain() {
            let _ = flow.stream.shutdown(std::net::Shutdown::Both);
        }
        self.by_token.clear();
        self.free_tokens.clear();
        self.next_token = FIRST_FLOW_TOKEN;
        self.registrar = None;
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A guest TCP segment to a non-gateway address (the firewall checked addresses).
    pub fn guest_tcp(&mut self, ip: &Ipv4<'_>, tcp: &Tcp<'_>) -> Result<(), DropReason> {
        let key = FlowKey {
            guest_port: tcp.src_port,
            dst: ip.dst,
            dst_port: tcp.dst_port,
        };
        if !self.flows.contains_key(&key) {
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
        Ok(())
    }

    fn open(&mut self, key: FlowKey) -> Result<(), DropReason> {
        if self.flows.len() >= self.policy.limits.max_flows {
            return Err(DropReason::FlowLimit);
        }
        let (route, negotiation) = match route::explicit_proxy(&self.policy, key.dst, key.dst_port)
        {
            Some(route) => (route, Negotiation::Splice),
            None => {
                let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
                let route = route::route_tcp(&self.policy, &names, key.dst, key.dst_port)?;
                let negotiation = match route.via {
                    Via::Http => Negotiation::HttpConnect,
                    Via::Socks5 => Negotiation::Socks5Greeting,
                };
                (route, negotiation)
            }
        };
        let Some(registrar) = self.registrar.as_ref() else {
            return Err(DropReason::EgressUnsupported);
        };
        let stream = connect_nonblocking(route.proxy).map_err(|e| {
            tracing::warn!(proxy = %route.proxy, error = %e, "cannot open a socket to the proxy");
            DropReason::ProxyUnreachable
        })?;
        let handle = self
            .stack
            .listen(key.dst, key.dst_port)
            .ok_or(DropReason::TcpNoFlow)?;
        let token = match self.free_tokens.pop() {
            Some(t) => t,
            None if self.next_token <= LAST_FLOW_TOKEN => {
                self.next_token += 1;
                self.next_token - 1
            }
            None => {
                self.stack.remove(handle);
                return Err(DropReason::FlowLimit);
            }
        };
        if registrar.register(stream.as_raw_fd(), token).is_err() {
            self.stack.remove(handle);
            self.free_tokens.push(token);
            return Err(DropReason::ProxyUnreachable);
        }
        tracing::debug!(flow = %key, target = %route.target, proxy = %route.proxy, "flow requested");
        self.counters.flow(FlowEvent::Opened);
        self.by_token.insert(token, key);
        self.flows.insert(
            key,
            Flow::new(key, route, negotiation, handle, stream, token),
        );
        Ok(())
    }

    /// Readiness of a proxy socket (edge-triggered: remember it until WouldBlock).
    pub fn host_event(&mut self, token: u64, events: EventSet) {
        let Some(key) = self.by_token.get(&token) else {
            return;
        };
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            flow.readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            flow.writable = true;
        }
    }

    /// Move everything that can move; return the IP packets for the guest.
    pub fn pump(&mut self) -> Vec<Vec<u8>> {
        for _ in 0..MAX_ROUNDS {
            self.stack.poll();
            let mut moved = false;
            for flow in self.flows.values_mut() {
                moved |= flow.step(&mut self.stack);
            }
            if !moved {
                break;
            }
        }
        self.stack.poll();
        self.reap();
        self.stack.take_egress()
    }

    fn reap(&mut self) {
        let done: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| matches!(f.phase, Phase::Done(_)))
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            let Some(flow) = self.flows.remove(&key) else {
                continue;
            };
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
                End::GuestReset | End::ProxyReset => FlowEvent::Reset,
            });
            tracing::info!(
                flow = %key,
                target = %flow.route.target,
                end = end.as_str(),
                status = ?matches!(end, End::ProxyRefused(_)).then_some(end),
                bytes_up = flow.bytes_up,
                bytes_down = flow.bytes_down,
                "flow closed"
            );
        }
    }

    /// When the stack next needs a poll of its own (retransmits, keepalives).
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let stack = self.stack.poll_delay();
        // Flows waiting on the proxy are checked for their handshake deadline too.
        let waiting = self
            .flows
            .values()
            .any(|f| matches!(f.phase, Phase::Connecting | Phase::Handshake));
        match (stack, waiting) {
            (Some(d), true) => Some(d.min(Duration::from_millis(500))),
            (None, true) => Some(Duration::from_millis(500)),
            (d, false) => d,
        }
    }
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
