//! `[[forward]]`s: host listeners whose allowed peers get a connection from the gateway to
//! a guest port (the flow itself is a TCP flow of [`super::tcp`]). Pair 0 of a VM listens
//! (or the only flow table); the policy's forwards and those added at run time
//! (`moat forward add`).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use super::key::FlowKey;
use super::shared::Shared;
use super::tokens::{Owner, Registration};
use crate::policy::Forward;
use crate::telemetry::{Counters, FlowEvent};

/// Gateway-side ports of forwarded connections, as the guest sees them.
const FORWARD_PORTS: std::ops::Range<u16> = 20000..60000;

/// One listening `[[forward]]`.
#[derive(Debug)]
struct Listener {
    /// Declared before the listener: it leaves the loop before the socket closes.
    _registration: Registration,
    listener: TcpListener,
    forward: Forward,
}

/// The forwards of one flow table.
#[derive(Debug)]
pub(super) struct Forwards {
    /// Listening while a frontend is connected.
    listeners: Vec<Listener>,
    /// Forwards added at run time (`moat forward add`), on top of the policy's.
    runtime: Vec<Forward>,
    next_port: u16,
}

impl Default for Forwards {
    fn default() -> Self {
        Forwards {
            listeners: Vec::new(),
            runtime: Vec::new(),
            next_port: FORWARD_PORTS.start,
        }
    }
}

impl Forwards {
    /// The forwards added at run time.
    pub fn runtime(&self) -> &[Forward] {
        &self.runtime
    }

    pub fn set_runtime(&mut self, forwards: Vec<Forward>) {
        self.runtime = forwards;
    }

    /// Listen for every forward in force (closing any listeners open before); a forward
    /// that cannot listen is logged and skipped.
    pub fn listen(&mut self, sh: &Shared) {
        self.listeners.clear();
        if !sh.steering.owns_forwards() {
            return;
        }
        let forwards: Vec<Forward> = sh
            .policy
            .forward
            .iter()
            .chain(&self.runtime)
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
            let index = self.listeners.len();
            let registration = match sh
                .tokens
                .register(listener.as_raw_fd(), Owner::Listener(index))
            {
                Ok(r) => r,
                Err(crate::telemetry::DropReason::FlowLimit) => break,
                Err(_) => continue,
            };
            tracing::info!(listen = %forward.listen, guest_port = forward.guest_port, "forwarding to the guest");
            self.listeners.push(Listener {
                _registration: registration,
                listener,
                forward,
            });
        }
    }

    /// The next host peer of listener `index` that its forward's `from` allows (others are
    /// closed at once and counted). None: nobody left (edge-triggered: drained).
    pub fn accept(
        &self,
        index: usize,
        counters: &Counters,
    ) -> Option<(TcpStream, SocketAddr, Forward)> {
        loop {
            let Listener {
                listener, forward, ..
            } = self.listeners.get(index)?;
            // WouldBlock (edge-triggered: drained) or a transient error.
            let (stream, peer) = listener.accept().ok()?;
            if !forward.from.iter().any(|net| net.contains(&peer.ip())) {
                tracing::info!(%peer, listen = %forward.listen, "forward peer not in `from`: closed");
                counters.flow(FlowEvent::ForwardRefused);
                continue;
            }
            return Some((stream, peer, forward.clone()));
        }
    }

    /// The key of a new forwarded connection to `guest_port`: from a gateway-side port no
    /// live flow uses (`in_use`).
    pub fn key(
        &mut self,
        gateway: Ipv4Addr,
        guest_port: u16,
        in_use: impl Fn(&FlowKey) -> bool,
    ) -> FlowKey {
        let mut local_port = self.next_port;
        for _ in 0..FORWARD_PORTS.len() {
            local_port = if local_port + 1 >= FORWARD_PORTS.end {
                FORWARD_PORTS.start
            } else {
                local_port + 1
            };
            let key = FlowKey {
                guest_port,
                dst: gateway,
                dst_port: local_port,
            };
            if !in_use(&key) {
                break;
            }
        }
        self.next_port = local_port;
        FlowKey {
            guest_port,
            dst: gateway,
            dst_port: local_port,
        }
    }

    /// The event loop is gone: stop listening.
    pub fn detach(&mut self) {
        self.listeners.clear();
    }
}
