//! Userspace TCP for guest flows: a smoltcp interface that owns the gateway address and, in
//! any-IP mode, answers as if it were each destination (a transparent proxy). It sees only
//! the IP packets of flows the firewall and the egress policy have accepted.
//!
//! The smoltcp `Device` is a pair of packet queues: the data path pushes guest packets in
//! and takes the stack's packets out (to be framed for the guest's RX queue).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use crate::frame::PACKET_HEADROOM;
use crate::policy::Vm;

/// The stack's MTU when the guest sends or takes large TCP segments (TSO offloads): half a
/// flow's window of payload, so two segments are in flight. (Segments as large as the whole
/// 64 KiB window leave one in flight at a time: measured 0.19 Gbit/s guest -> proxy against
/// 2.5 Gbit/s with half-window segments, benches/egress_tcp.rs.)
const LARGE_SEGMENT_MTU: usize = FLOW_BUFFER / 2 + 40;
/// The MSS a guest that takes large segments is made to announce (the MTU less IP and TCP).
const LARGE_SEGMENT_MSS: u16 = (LARGE_SEGMENT_MTU - 40) as u16;

/// Per-flow buffer in each direction. Bounds memory per flow at about twice this.
pub const FLOW_BUFFER: usize = 64 * 1024;

/// Have the allocator give every allocation of FLOW_BUFFER bytes or more (each flow's two
/// buffers) its own anonymous mapping. Pages a flow never writes then cost no memory, and a
/// closed flow's buffers go back to the system at once. Under glibc's default (the heap
/// below 128 KiB, a threshold it raises at run time), allocator headers and reused chunks
/// touch pages inside each buffer: 18 KB of RSS per idle flow, against 9.4 KB with this
/// (benches/footprint.rs, 10 000 flows). The price is one mmap and one munmap per buffer.
/// Process-wide: `moat serve` calls it once, before any flow exists.
pub fn map_flow_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes an allocator tunable; it is called before the worker threads
    // start, and any value is valid for M_MMAP_THRESHOLD.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, FLOW_BUFFER as libc::c_int);
    }
}
/// Guest packets waiting for the stack, at most (bounded: the guest cannot grow it).
const MAX_QUEUED: usize = 4096;
/// Bytes of guest packets waiting for the stack, at most: 16 segments of 64 KiB. A full
/// queue is first handed to the stack (a poll), so only packets the stack cannot take
/// are dropped.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Bytes of packets the stack may make for the guest before they are taken, at most (then
/// the stack's sockets keep their data until the next poll): 32 segments of 64 KiB.
pub const MAX_EGRESS_BYTES: usize = 2 << 20;

/// Packet queues standing in for a NIC.
#[derive(Debug, Default)]
struct Queues {
    to_stack: VecDeque<Vec<u8>>,
    /// Bytes in `to_stack`.
    queued_bytes: usize,
    from_stack: Vec<Vec<u8>>,
    /// Bytes in `from_stack`.
    egress_bytes: usize,
    mtu: usize,
}

impl Queues {
    fn full(&self, more: usize) -> bool {
        self.to_stack.len() >= MAX_QUEUED || self.queued_bytes + more > MAX_QUEUED_BYTES
    }
}

/// A received packet as a smoltcp RX token (also used by the simulated guest's stack).
pub struct Rx(pub Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>, &'a mut usize);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    /// The packet is built behind PACKET_HEADROOM, where the data path writes the
    /// virtio-net and Ethernet headers without copying the packet.
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; PACKET_HEADROOM + len];
        let r = f(&mut buf[PACKET_HEADROOM..]);
        *self.1 += buf.len();
        self.0.push(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let packet = self.to_stack.pop_front()?;
        self.queued_bytes -= packet.len();
        // Answers to a received packet (ACKs, RSTs) always go: at most one per packet.
        Some((Rx(packet), Tx(&mut self.from_stack, &mut self.egress_bytes)))
    }

    fn transmit(&mut self, _now: SmolInstant) -> Option<Tx<'_>> {
        if self.egress_bytes >= MAX_EGRESS_BYTES {
            return None; // the sockets keep their data until the packets are taken
        }
        Some(Tx(&mut self.from_stack, &mut self.egress_bytes))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The data path already checked the IPv4 header (frame::parse) and the TCP sum (or
        // computed a guest's partial one) of every packet it hands over: compute sums on
        // the way out, do not verify them a second time on the way in.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps
    }
}

/// In a TCP SYN, raise the MSS option to `mss`: the guest takes segments that large
/// (GUEST_TSO4) and moat's stack then sends them. Anything else, or a SYN without a
/// well-formed MSS option, is left as it is. The checksum is not redone: the data path
/// verified it before, and the stack does not verify again.
fn raise_syn_mss(ip: &mut [u8], mss: u16) {
    use crate::frame::checksum::L4Layout;
    let Some(l4) = L4Layout::of(ip) else { return };
    let tcp = l4.start;
    let (Some(&flags), Some(&offset)) = (ip.get(tcp + 13), ip.get(tcp + 12)) else {
        return;
    };
    if l4.protocol != 6 || flags & 0x02 == 0 {
        return;
    }
    let options_end = (tcp + usize::from(offset >> 4) * 4).min(l4.end);
    let mut at = tcp + 20;
    while at < options_end {
        match ip[at] {
            0 => return,
            1 => at += 1,
            kind => {
                let Some(&len) = ip.get(at + 1) else { return };
                let len = usize::from(len);
                if len < 2 || at + len > options_end {
                    return;
                }
                if kind == 2 && len == 4 {
                    let announced = u16::from_be_bytes([ip[at + 2], ip[at + 3]]);
                    if announced < mss {
                        ip[at + 2..at + 4].copy_from_slice(&mss.to_be_bytes());
                    }
                    return;
                }
                at += len;
            }
        }
    }
}

/// The TCP/IP stack of one VM's flows.
pub struct Stack {
    iface: Interface,
    queues: Queues,
    sockets: SocketSet<'static>,
    epoch: std::time::Instant,
    /// The VM's MTU (the stack's own when no segmentation offload is on).
    vm_mtu: usize,
    /// The gateway address and prefix the interface owns.
    gateway: (Ipv4Addr, u8),
    /// GUEST_TSO4: guest SYNs announce a 64 KiB MSS to the stack, so it sends large segments.
    raise_mss: bool,
}

/// The interface: the gateway's address, any-IP (it answers for every destination the
/// data path hands it), a default route.
fn interface(queues: &mut Queues, gateway: Ipv4Addr, prefix_len: u8) -> Interface {
    let mut iface = Interface::new(Config::new(HardwareAddress::Ip), queues, SmolInstant::ZERO);
    iface.update_ip_addrs(|addrs| {
        let cidr = IpCidr::new(IpAddress::Ipv4(gateway), prefix_len);
        // One address: cannot overflow the fixed-size list.
        let _ = addrs.push(cidr);
    });
    let _ = iface.routes_mut().add_default_ipv4_route(gateway);
    iface.set_any_ip(true);
    iface
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("queued", &self.queues.to_stack.len())
            .finish()
    }
}

impl Stack {
    pub fn new(vm: &Vm) -> Stack {
        let mut queues = Queues {
            mtu: usize::from(vm.mtu),
            ..Queues::default()
        };
        let epoch = std::time::Instant::now();
        let iface = interface(&mut queues, vm.gateway, vm.prefix_len);
        Stack {
            iface,
            queues,
            sockets: SocketSet::new(Vec::new()),
            epoch,
            vm_mtu: usize::from(vm.mtu),
            gateway: (vm.gateway, vm.prefix_len),
            raise_mss: false,
        }
    }

    /// Segmentation offloads acked by the guest: with either, the stack takes and makes
    /// packets up to 64 KiB (a guest without GUEST_TSO4 still gets segments no larger than
    /// the MSS it announced); with `to_guest`, guest SYNs announce a 64 KiB MSS.
    pub fn set_large_segments(&mut self, from_guest: bool, to_guest: bool) {
        let mtu = if from_guest || to_guest {
            LARGE_SEGMENT_MTU
        } else {
            self.vm_mtu
        };
        self.raise_mss = to_guest;
        if mtu != self.queues.mtu {
            // smoltcp reads the device's MTU once, when the interface is made: make it anew
            // (features are acked before any flow exists; sockets live apart from it).
            self.queues.mtu = mtu;
            self.iface = interface(&mut self.queues, self.gateway.0, self.gateway.1);
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Hand a guest IP packet to the stack. Returns false if the queue is full (dropped).
    pub fn ingress(&mut self, packet: &[u8]) -> bool {
        if self.queues.full(packet.len()) {
            // Let the stack take what waits (into its sockets' bounded buffers) first.
            self.poll();
            if self.queues.full(packet.len()) {
                return false;
            }
        }
        let mut packet = packet.to_vec();
        if self.raise_mss {
            raise_syn_mss(&mut packet, LARGE_SEGMENT_MSS);
        }
        self.queues.queued_bytes += packet.len();
        self.queues.to_stack.push_back(packet);
        true
    }

    /// Run the stack: process queued packets, timers, and socket output.
    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.queues, &mut self.sockets);
    }

    /// IP packets the stack sent to the guest since the last call, each behind
    /// PACKET_HEADROOM.
    pub fn take_egress(&mut self) -> Vec<Vec<u8>> {
        self.queues.egress_bytes = 0;
        std::mem::take(&mut self.queues.from_stack)
    }

    /// When the stack next needs `poll` for its own timers (retransmits, delayed ACKs).
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// A socket listening as `dst` for one guest connection. With `hold_synack` its SYN-ACK
    /// waits until `pause_synack(false)` (the proxy has accepted) or the socket is aborted.
    pub fn listen(&mut self, dst: Ipv4Addr, port: u16, hold_synack: bool) -> Option<SocketHandle> {
        let rx = tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]);
        let tx = tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]);
        let mut socket = tcp::Socket::new(rx, tx);
        socket.pause_synack(hold_synack);
        socket.set_nagle_enabled(false);
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(dst)),
            port,
        };
        socket.listen(endpoint).ok()?;
        Some(self.sockets.add(socket))
    }

    /// A socket connecting from `local:local_port` (the gateway) to the guest.
    pub fn connect(
        &mut self,
        local: Ipv4Addr,
        local_port: u16,
        guest: Ipv4Addr,
        port: u16,
    ) -> Option<SocketHandle> {
        let rx = tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]);
        let tx = tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]);
        let mut socket = tcp::Socket::new(rx, tx);
        socket.set_nagle_enabled(false);
        let remote = IpEndpoint::new(IpAddress::Ipv4(guest), port);
        let local = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(local)),
            port: local_port,
        };
        socket.connect(self.iface.context(), remote, local).ok()?;
        Some(self.sockets.add(socket))
    }

    pub fn socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    pub fn remove(&mut self, handle: SocketHandle) {
        self.sockets.remove(handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest flooding 64 KiB segments the stack has no socket for: what waits for the
    /// stack stays within its byte bound (by count alone it was 4096 x 64 KiB = 256 MiB).
    #[test]
    fn inbound_queue_is_bounded_in_bytes() {
        let policy = crate::policy::Policy::parse(
            "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("valid policy");
        let mut stack = Stack::new(&policy.vm);
        stack.set_large_segments(true, true);
        // An IPv4 header claiming TCP, then 64 KiB of zeros: parsed (and dropped) by the
        // stack only when it polls.
        let mut packet = vec![0u8; 65_000];
        packet[0] = 0x45;
        packet[9] = 6;
        let mut taken = 0;
        for _ in 0..4096 {
            taken += usize::from(stack.ingress(&packet));
            assert!(stack.queues.queued_bytes <= MAX_QUEUED_BYTES);
            assert!(stack.queues.to_stack.len() * packet.len() <= MAX_QUEUED_BYTES);
        }
        assert_eq!(
            taken, 4096,
            "a full queue is handed to the stack, not dropped"
        );
    }
}
