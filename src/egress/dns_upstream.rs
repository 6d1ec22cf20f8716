//! `dns.mode = "upstream"`: queries for allowed names go to the upstream resolver over UDP
//! with a fresh id, and answers come back to the guest under its own id. The addresses in
//! the answers are remembered with the name, so a flow to one of them goes to the proxy by
//! that name.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use crate::services::dns::{self, DnsOutcome, NamePool};
use crate::telemetry::{Counters, DropReason};

/// An unanswered query is forgotten after this long (the guest retries on its own).
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries in flight at most (a flooding guest cannot grow the table).
const MAX_PENDING: usize = 1024;

/// Where an upstream answer goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTo {
    /// A UDP query from this guest port.
    Udp(u16),
    /// A DNS-over-TCP connection of the guest (by its id).
    Tcp(u64),
}

#[derive(Debug)]
struct Pending {
    reply_to: ReplyTo,
    guest_id: u16,
    name: String,
    sent: Instant,
}

/// The upstream resolver side of one VM.
#[derive(Debug)]
pub struct Upstream {
    pub server: SocketAddr,
    pub socket: UdpSocket,
    pending: HashMap<u16, Pending>,
    next_id: u16,
}

impl Upstream {
    pub fn new(server: SocketAddr) -> std::io::Result<Upstream> {
        let bind: SocketAddr = if server.ip().is_loopback() {
            ([127, 0, 0, 1], 0).into()
        } else {
            ([0, 0, 0, 0], 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        Ok(Upstream {
            server,
            socket,
            pending: HashMap::new(),
            next_id: 1,
        })
    }

    /// Send the guest's query upstream under a fresh id.
    pub fn forward(
        &mut self,
        reply_to: ReplyTo,
        query: &[u8],
        name: String,
    ) -> Result<(), DropReason> {
        self.pending.retain(|_, p| p.sent.elapsed() < QUERY_TIMEOUT);
        if self.pending.len() >= MAX_PENDING || query.len() < 12 {
            return Err(DropReason::DnsMalformed);
        }
        let mut id = self.next_id;
        while self.pending.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        let guest_id = u16::from_be_bytes([query[0], query[1]]);
        let mut out = query.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        self.socket
            .send_to(&out, self.server)
            .map_err(|_| DropReason::ProxyUnreachable)?;
        self.pending.insert(
            id,
            Pending {
                reply_to,
                guest_id,
                name,
                sent: Instant::now(),
            },
        );
        Ok(())
    }

    /// Relay the resolver's answers to the guest: UDP ones as IP packets from the gateway's
    /// port 53 into `out`, DNS-over-TCP ones as (connection id, message) into `tcp`.
    pub fn receive(
        &mut self,
        names: &mut NamePool,
        gateway: Ipv4Addr,
        guest: Ipv4Addr,
        counters: &Counters,
        out: &mut Vec<Vec<u8>>,
        tcp: &mut Vec<(u64, Vec<u8>)>,
    ) {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            if from != self.server || n < 12 {
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            let mut reply = buf[..n].to_vec();
            reply[..2].copy_from_slice(&p.guest_id.to_be_bytes());
            for addr in dns::a_records(&reply) {
                names.remember(addr, &p.name);
            }
            counters.dns_answered(DnsOutcome::Forwarded);
            let guest_port = match p.reply_to {
                ReplyTo::Udp(port) => port,
                ReplyTo::Tcp(conn) => {
                    tcp.push((conn, reply));
                    continue;
                }
            };
            let (from, to) = (
                SocketAddrV4::new(gateway, 53),
                SocketAddrV4::new(guest, guest_port),
            );
            out.extend(crate::frame::udp_packet(from, to, &reply));
        }
    }
}
