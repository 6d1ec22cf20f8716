//! A TCP/IP stack on the guest side of the simulated guest (smoltcp over its virtqueues),
//! so tests, the canary and benchmarks can open real TCP connections through moat.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};

use super::{GuestError, SimGuest};

/// Socket buffers on the guest side (large enough for bulk transfers).
const BUFFER: usize = 256 * 1024;

struct Link<'a> {
    guest: &'a mut SimGuest,
    inbox: &'a mut VecDeque<Vec<u8>>,
    /// The stack's MTU (Ethernet frame): 64 KiB with TSO, else the VM's.
    mtu: usize,
    /// The VM's frame size: larger frames go out as TSO segments.
    wire_mtu: usize,
}

/// A received frame, handed to the stack.
struct Rx(Vec<u8>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct Tx<'a> {
    guest: &'a mut SimGuest,
    wire_mtu: usize,
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        let sent = if len > self.wire_mtu {
            // Only TCP segments grow past the MTU (the stack's MTU is 64 KiB with TSO):
            // hand them to the device as a TSO segment of MSS-sized pieces, as Linux does.
            let ihl = usize::from(buf.get(14).map_or(5, |b| b & 0xf)) * 4;
            let thl = usize::from(buf.get(14 + ihl + 12).map_or(5, |b| b >> 4)) * 4;
            // The stack computed the full sum where a partial one belongs: moat recomputes.
            let hdr = crate::wire::tso_hdr(
                (14 + ihl + thl) as u16,
                self.wire_mtu.saturating_sub(14 + ihl + thl).max(1) as u16,
                (14 + ihl) as u16,
            );
            self.guest.send_frame_with_hdr(&hdr, &buf)
        } else {
            self.guest.send_frame(&buf)
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "simulated guest could not send");
        }
        r
    }
}

impl Device for Link<'_> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.inbox.pop_front()?;
        let tx = Tx {
            guest: self.guest,
            wire_mtu: self.wire_mtu,
        };
        Some((Rx(frame), tx))
    }

    fn transmit(&mut self, _now: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx {
            guest: self.guest,
            wire_mtu: self.wire_mtu,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

pub use hickory_proto::op::ResponseCode;

/// What the gateway's DNS answered to an A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    /// NoError, NXDomain, ServFail, Refused, ...
    pub rcode: ResponseCode,
    /// The A records of the answer section, in order.
    pub addrs: Vec<Ipv4Addr>,
}

impl DnsReply {
    /// The first address of a NOERROR reply (`None` for any other response code).
    pub fn addr(&self) -> Option<Ipv4Addr> {
        (self.rcode == ResponseCode::NoError)
            .then(|| self.addrs.first().copied())
            .flatten()
    }

    /// NXDOMAIN with no address in it.
    pub fn is_nxdomain(&self) -> bool {
        self.rcode == ResponseCode::NXDomain && self.addrs.is_empty()
    }
}

/// Hand everything `socket` has received so far to `sink`, without waiting: the drain step
/// of a [`GuestNet::run_until`] loop that also sends, counts or checks as it goes.
pub fn tcp_drain(socket: &mut tcp::Socket<'_>, mut sink: impl FnMut(&[u8])) {
    while socket.can_recv() {
        let _ = socket.recv(|d| {
            sink(d);
            (d.len(), ())
        });
    }
}

/// The simulated guest with an IP address, a default route and sockets.
pub struct GuestNet {
    guest: SimGuest,
    iface: Interface,
    sockets: SocketSet<'static>,
    inbox: VecDeque<Vec<u8>>,
    epoch: Instant,
    gateway: Ipv4Addr,
    next_port: u16,
    mtu: usize,
    wire_mtu: usize,
}

impl GuestNet {
    /// Configure `guest` as `mac`, `address/prefix`, default route via `gateway`.
    pub fn new(
        mut guest: SimGuest,
        mac: [u8; 6],
        address: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        mtu: u16,
    ) -> GuestNet {
        let wire_mtu = usize::from(mtu) + 14;
        let tso = guest.negotiated_features()
            & (1 << virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_HOST_TSO4)
            != 0;
        let mtu = if tso { 65535 + 14 } else { wire_mtu };
        let mut inbox = VecDeque::new();
        let mut link = Link {
            guest: &mut guest,
            inbox: &mut inbox,
            mtu,
            wire_mtu,
        };
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        let mut iface = Interface::new(config, &mut link, SmolInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(address), prefix));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        GuestNet {
            guest,
            iface,
            sockets: SocketSet::new(Vec::new()),
            inbox,
            epoch: Instant::now(),
            gateway,
            next_port: 49152,
            mtu,
            wire_mtu,
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn port(&mut self) -> u16 {
        self.next_port = if self.next_port >= 65000 {
            49152
        } else {
            self.next_port + 1
        };
        self.next_port
    }

    /// Process what arrived and what is due; wait up to `wait` for a frame first.
    pub fn poll(&mut self, wait: Duration) -> Result<(), GuestError> {
        let now = self.now();
        let delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(wait)
            .min(wait);
        let mut wait = delay;
        while let Some((hdr, mut frame)) = self.guest.recv_frame_with_hdr(wait)? {
            wait = Duration::ZERO;
            if hdr[0] & 3 != 0 {
                // NEEDS_CSUM (GUEST_CSUM) or DATA_VALID: the stack here verifies checksums,
                // so complete a partial one as a NIC would, and make a "valid" one so (passt
                // sends TCP with DATA_VALID and no checksum computed, even without
                // GUEST_CSUM); a frame that cannot be completed is left to fail.
                let ipv4 = frame.get(12..14) == Some(&[0x08, 0x00][..]);
                if let Some(ip) = frame.get_mut(14..).filter(|ip| ipv4 && ip.len() >= 20) {
                    let _ = crate::wire::fill_l4_checksum(ip);
                    if hdr[0] & 2 != 0 {
                        let ihl = usize::from(ip[0] & 0xf) * 4;
                        if let Some(h) = ip.get_mut(..ihl).filter(|h| h.len() >= 20) {
                            h[10..12].copy_from_slice(&[0, 0]);
                            let c = crate::wire::internet_checksum(h);
                            h[10..12].copy_from_slice(&c.to_be_bytes());
                        }
                    }
                }
            }
            self.inbox.push_back(frame);
        }
        let now = self.now();
        let mut link = Link {
            guest: &mut self.guest,
            inbox: &mut self.inbox,
            mtu: self.mtu,
            wire_mtu: self.wire_mtu,
        };
        self.iface.poll(now, &mut link, &mut self.sockets);
        Ok(())
    }

    /// Poll until `done` says so or `timeout` passes; returns whether it was done.
    pub fn run_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&mut GuestNet) -> bool,
    ) -> Result<bool, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.poll(left.min(Duration::from_millis(10)))?;
        }
    }

    /// Start a TCP connection to `dst:port` (from an ephemeral port).
    pub fn tcp_connect(&mut self, dst: Ipv4Addr, port: u16) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; BUFFER]),
            tcp::SocketBuffer::new(vec![0; BUFFER]),
        );
        let local = self.port();
        let remote = IpEndpoint::new(IpAddress::Ipv4(dst), port);
        // An error here means the socket was not closed: a fresh socket always connects.
        let _ = socket.connect(self.iface.context(), remote, local);
        self.sockets.add(socket)
    }

    /// Connect to `dst:port` and wait for the handshake; `None` if it does not complete in
    /// `timeout` (the socket is left for the caller to inspect or remove).
    pub fn tcp_established(
        &mut self,
        dst: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> Result<Option<SocketHandle>, GuestError> {
        let h = self.tcp_connect(dst, port);
        let ok = self.run_until(timeout, |n| n.tcp(h).state() == tcp::State::Established)?;
        Ok(ok.then_some(h))
    }

    /// Send all of `data` on `h`, running the stack; false if it did not all go in `timeout`.
    pub fn tcp_send_all(
        &mut self,
        h: SocketHandle,
        data: &[u8],
        timeout: Duration,
    ) -> Result<bool, GuestError> {
        let mut off = 0;
        self.run_until(timeout, |n| {
            if let Ok(k) = n.tcp(h).send_slice(&data[off..]) {
                off += k;
            }
            off == data.len()
        })
    }

    /// Hand everything that arrives on `h` to `sink` until it returns true (done) or the
    /// stream ends; false on timeout.
    pub fn tcp_recv(
        &mut self,
        h: SocketHandle,
        timeout: Duration,
        mut sink: impl FnMut(&[u8]) -> bool,
    ) -> Result<bool, GuestError> {
        let mut done = false;
        self.run_until(timeout, |n| {
            let s = n.tcp(h);
            while !done && s.can_recv() {
                let _ = s.recv(|d| {
                    done = sink(d);
                    (d.len(), ())
                });
            }
            done || !s.may_recv()
        })
    }

    /// A socket listening on `port` (for connections forwarded from the host).
    pub fn tcp_listen(&mut self, port: u16) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; BUFFER]),
            tcp::SocketBuffer::new(vec![0; BUFFER]),
        );
        // Listening on a fresh socket cannot fail for a non-zero port.
        let _ = socket.listen(port);
        self.sockets.add(socket)
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    pub fn remove(&mut self, handle: SocketHandle) {
        self.sockets.remove(handle);
    }

    /// A UDP socket bound to `port` on the guest.
    pub fn udp_bind(&mut self, port: u16) -> SocketHandle {
        let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 65536]);
        let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 65536]);
        let mut socket = udp::Socket::new(rx, tx);
        let _ = socket.bind(port);
        self.sockets.add(socket)
    }

    pub fn udp(&mut self, handle: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut::<udp::Socket>(handle)
    }

    /// Ask the gateway's DNS for `name`'s A records and wait up to `timeout` for the reply:
    /// its response code and addresses, or [`GuestError::DnsTimeout`] when nothing came back
    /// (so NXDOMAIN and silence are told apart). A reply that is not the answer to this query
    /// (another ID or question, from anywhere but gateway:53) is [`GuestError::Dns`].
    pub fn resolve(&mut self, name: &str, timeout: Duration) -> Result<DnsReply, GuestError> {
        use hickory_proto::op::{Message, MessageType, Query};
        use hickory_proto::rr::{Name, RData, RecordType};
        let mut qname =
            Name::from_ascii(name).map_err(|e| GuestError::Dns(format!("name {name:?}: {e}")))?;
        // Replies carry the question as an absolute name.
        qname.set_fqdn(true);
        let id = self.port();
        let mut query = Message::query();
        query.metadata.id = id;
        query.metadata.recursion_desired = true;
        let question = Query::query(qname, RecordType::A);
        query.add_query(question.clone());
        let bytes = query
            .to_vec()
            .map_err(|e| GuestError::Dns(format!("query for {name}: {e}")))?;
        let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]);
        let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]);
        let mut socket = udp::Socket::new(rx, tx);
        let local = self.port();
        let _ = socket.bind(local);
        let server = IpEndpoint::new(IpAddress::Ipv4(self.gateway), 53);
        let _ = socket.send_slice(&bytes, server);
        let handle = self.sockets.add(socket);
        let mut answer = None;
        let polled = self.run_until(timeout, |net| {
            let s = net.sockets.get_mut::<udp::Socket>(handle);
            if let Ok((data, meta)) = s.recv() {
                answer = Some((data.to_vec(), meta.endpoint));
                return true;
            }
            false
        });
        self.sockets.remove(handle);
        polled?;
        let Some((bytes, from)) = answer else {
            return Err(GuestError::DnsTimeout {
                name: name.to_string(),
                after: timeout,
            });
        };
        if from != server {
            return Err(GuestError::Dns(format!(
                "reply for {name} from {from}, not {server}"
            )));
        }
        let reply = Message::from_vec(&bytes)
            .map_err(|e| GuestError::Dns(format!("reply for {name} does not parse: {e}")))?;
        if reply.metadata.id != id
            || reply.metadata.message_type != MessageType::Response
            || reply.queries != [question]
        {
            return Err(GuestError::Dns(format!(
                "reply for {name} is not the answer to the query (id {} for {id}, \
                 questions {:?})",
                reply.metadata.id, reply.queries
            )));
        }
        Ok(DnsReply {
            rcode: reply.metadata.response_code,
            addrs: reply
                .answers
                .iter()
                .filter_map(|r| match r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect(),
        })
    }

    /// Resolve `name`, expecting an address: the first A record of a NOERROR reply, else an
    /// error that says what came back instead (NXDOMAIN, SERVFAIL, no records, nothing).
    pub fn resolve_a(&mut self, name: &str, timeout: Duration) -> Result<Ipv4Addr, GuestError> {
        let reply = self.resolve(name, timeout)?;
        reply
            .addr()
            .ok_or_else(|| GuestError::Dns(format!("{name}: no address in {reply:?}")))
    }

    /// The simulated guest underneath (for raw frames).
    pub fn sim(&mut self) -> &mut SimGuest {
        &mut self.guest
    }
}
