//! What every kind of flow of one flow table works with: the stack, the policy, the event
//! tokens, steering, and the record of which flows have news for the next pump.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::flow;
use super::key::FlowKey;
use super::steering::Steering;
use super::tokens::Tokens;
use crate::dns::NamePool;
use crate::policy::Policy;
use crate::stack::{SocketHandle, Stack};
use crate::telemetry::Counters;

/// What a stack socket belongs to.
#[derive(Clone, Copy, Debug)]
pub(super) enum SocketOwner {
    Flow(FlowKey),
    Waiting(FlowKey),
    Dns(u64),
}

/// What the next pump must look at: the flows with news (their socket changed, their proxy
/// socket is ready, the guest sent them something), so that the work of an event is in
/// proportion to the flows it concerns, not to the flows open. Everything is looked at
/// anyway every `sweep_every`, for timeouts.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub flows: HashSet<FlowKey>,
    pub waiting: HashSet<FlowKey>,
    pub dns: HashSet<u64>,
    pub udp: HashSet<FlowKey>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
            && self.waiting.is_empty()
            && self.dns.is_empty()
            && self.udp.is_empty()
    }
}

/// The parts of a flow table every kind of flow uses.
#[derive(Debug)]
pub(super) struct Shared {
    pub stack: Stack,
    pub policy: Arc<Policy>,
    pub names: Arc<Mutex<NamePool>>,
    pub counters: Arc<Counters>,
    pub tokens: Tokens,
    /// Who each stack socket belongs to.
    pub by_socket: HashMap<SocketHandle, SocketOwner>,
    /// What the next pump must look at.
    pub pending: Pending,
    /// With several queue pairs: which pair this is, and the VM's flow owners.
    pub steering: Steering,
    /// Open flows with no traffic for this long are reset.
    pub idle: Duration,
}

impl Shared {
    /// The name the guest asked DNS for, if `ip` is one of its answers.
    pub fn dns_name(&self, ip: Ipv4Addr) -> Option<String> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.lookup(ip).map(str::to_string)
    }

    /// The stack socket `handle` is done with: what it still had to send (a RST) goes out
    /// with the next poll's packets, then it is gone.
    pub fn drop_socket(&mut self, handle: SocketHandle) {
        self.by_socket.remove(&handle);
        self.stack.poll();
        self.stack.remove(handle);
    }

    /// The flows whose stack socket changed in the last poll now have news.
    pub fn note_touched(&mut self) {
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
}

/// The flow idle timeout: `MOAT_FLOW_IDLE` seconds if set (operators and tests), else
/// [`flow::DEFAULT_IDLE`].
pub(super) fn idle_timeout() -> Duration {
    std::env::var("MOAT_FLOW_IDLE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(flow::DEFAULT_IDLE)
}

/// A non-blocking connect to the proxy (it completes, or fails, in the event loop).
pub(super) fn connect_nonblocking(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        // Non-blocking from socket(2) on: no FIONBIO call after it.
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}
