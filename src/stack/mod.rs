//! Userspace TCP for guest flows: a smoltcp interface that owns the gateway address and, in
//! any-IP mode, answers as if it were each destination (a transparent proxy). It sees only
//! the IP packets of flows the firewall and the egress policy have accepted.
//!
//! The smoltcp `Device` is a pair of packet queues: the data path pushes guest packets in
//! and takes the stack's packets out (to be framed for the guest's RX queue).

mod device;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::iface::{Interface, PollResult, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{IpAddress, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket};

use crate::policy::Vm;
use device::{interface, SlotDevice};

pub use device::Rx;

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
/// Closed sockets kept for reuse, at most. A socket's two buffers are two mappings of their
/// own (see `map_flow_buffers`): a new flow that takes a spare socket saves two mmaps, two
/// munmaps and the first-touch page faults, which were about 12% of moat's CPU per short
/// connection (`perf record` on benches/egress_tcp.rs's connection loop). The price is
/// bounded: at most 32 x 128 KiB of touched buffer pages kept while no flow needs them.
const MAX_SPARE_SOCKETS: usize = 32;
/// Guest packets waiting for the stack, at most (bounded: the guest cannot grow it).
const MAX_QUEUED: usize = 4096;
/// Bytes of guest packets waiting for the stack, at most: 16 segments of 64 KiB. A full
/// queue is first handed to the stack (a poll), so only packets the stack cannot take
/// are dropped.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Bytes of packets the stack may make for the guest before they are taken, at most (then
/// the sockets keep their data, and ask for a poll, until the packets are taken): 32
/// segments of 64 KiB.
pub const MAX_EGRESS_BYTES: usize = 2 << 20;

/// One guest connection in the stack. Handles are reused after `remove`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketHandle(usize);

/// Which guest packets belong to a socket: (its local address and port as the guest
/// addresses them, the guest's port).
type Endpoint = (Ipv4Addr, u16, u16);

/// One guest connection: its socket in a set of its own, so that polling it costs the same
/// however many other connections the VM has open.
struct Slot {
    set: SocketSet<'static>,
    socket: smoltcp::iface::SocketHandle,
    endpoint: Endpoint,
    /// Guest packets for this socket, in order.
    inbox: VecDeque<Vec<u8>>,
    /// Waiting in `Stack::dirty` for a poll.
    dirty: bool,
    /// When smoltcp next wants this socket polled for its own timers.
    wake: Option<SmolInstant>,
}

/// The TCP/IP stack of one VM's flows.
///
/// smoltcp's `Interface::poll` visits every socket of the set it is given, and finds the
/// socket of each packet by a walk over the set: with one set for all flows, every event
/// would cost time in proportion to the open flows, idle ones included. So each socket has
/// a set of its own, packets are sorted to their socket by a hash lookup, and a poll visits
/// only the sockets with something to do: new packets, a caller that touched the socket, or
/// a timer that is due.
pub struct Stack {
    iface: Interface,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    by_endpoint: HashMap<Endpoint, usize>,
    /// Slots to poll at the next `poll`.
    dirty: Vec<usize>,
    /// (when, slot) of socket timers; an entry is stale unless the slot's `wake` matches.
    timers: BinaryHeap<Reverse<(SmolInstant, usize)>>,
    /// Slots whose poll changed something since the last `take_touched`.
    touched: Vec<SocketHandle>,
    /// Guest packets in all inboxes, and their bytes.
    queued: usize,
    queued_bytes: usize,
    /// Packets for the guest, and their bytes.
    from_stack: Vec<Vec<u8>>,
    from_stack_bytes: usize,
    /// Guest packets no socket takes: smoltcp answers them (a RST) from an empty set.
    unmatched: VecDeque<Vec<u8>>,
    no_sockets: SocketSet<'static>,
    mtu: usize,
    epoch: std::time::Instant,
    /// The VM's MTU (the stack's own when no segmentation offload is on).
    vm_mtu: usize,
    /// The gateway address and prefix the interface owns.
    gateway: (Ipv4Addr, u8),
    /// GUEST_TSO4: guest SYNs announce a 64 KiB MSS to the stack, so it sends large segments.
    raise_mss: bool,
    /// Closed sockets whose buffers a new flow may take (`MAX_SPARE_SOCKETS` at most).
    spare: Vec<tcp::Socket<'static>>,
}

/// Bytes of the packets in an inbox.
fn inbox_bytes(inbox: &VecDeque<Vec<u8>>) -> usize {
    inbox.iter().map(Vec::len).sum()
}

/// The endpoint a guest TCP packet is for: (destination, destination port, source port).
fn endpoint_of(packet: &[u8]) -> Option<Endpoint> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((ip.dst_addr(), tcp.dst_port(), tcp.src_port()))
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("sockets", &self.by_endpoint.len())
            .field("queued", &self.queued)
            .finish()
    }
}

impl Stack {
    pub fn new(vm: &Vm) -> Stack {
        let mtu = usize::from(vm.mtu);
        Stack {
            iface: interface(mtu, vm.gateway, vm.prefix_len),
            slots: Vec::new(),
            free: Vec::new(),
            by_endpoint: HashMap::new(),
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            touched: Vec::new(),
            queued: 0,
            queued_bytes: 0,
            from_stack: Vec::new(),
            from_stack_bytes: 0,
            unmatched: VecDeque::new(),
            no_sockets: SocketSet::new(Vec::new()),
            mtu,
            epoch: std::time::Instant::now(),
            vm_mtu: mtu,
            gateway: (vm.gateway, vm.prefix_len),
            raise_mss: false,
            spare: Vec::new(),
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
        if mtu != self.mtu {
            // smoltcp reads the device's MTU once, when the interface is made: make it anew
            // (features are acked before any flow exists; sockets live apart from it).
            self.mtu = mtu;
            self.iface = interface(mtu, self.gateway.0, self.gateway.1);
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn mark(&mut self, index: usize) {
        if let Some(Some(slot)) = self.slots.get_mut(index) {
            if !slot.dirty {
                slot.dirty = true;
                self.dirty.push(index);
            }
        }
    }

    /// Hand a guest IP packet to the stack. Returns false if the queue is full (dropped).
    pub fn ingress(&mut self, packet: &[u8]) -> bool {
        let full =
            |s: &Stack| s.queued >= MAX_QUEUED || s.queued_bytes + packet.len() > MAX_QUEUED_BYTES;
        if full(self) {
            // Let the stack take what waits (into its sockets' bounded buffers) first.
            self.poll();
            if full(self) {
                return false;
            }
        }
        let mut packet = packet.to_vec();
        if self.raise_mss {
            crate::frame::tcp::raise_syn_mss(&mut packet, LARGE_SEGMENT_MSS);
        }
        self.queued += 1;
        self.queued_bytes += packet.len();
        match endpoint_of(&packet).and_then(|e| self.by_endpoint.get(&e).copied()) {
            Some(index) => {
                if let Some(Some(slot)) = self.slots.get_mut(index) {
                    slot.inbox.push_back(packet);
                }
                self.mark(index);
            }
            None => self.unmatched.push_back(packet),
        }
        true
    }

    /// Run the stack for the sockets with something to do: queued packets, a caller's
    /// change, a due timer. Work in proportion to those, not to the sockets open.
    pub fn poll(&mut self) {
        let now = self.now();
        while let Some(Reverse((at, index))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let due = matches!(self.slots.get(index), Some(Some(s)) if s.wake == Some(at));
            if due {
                self.mark(index);
            }
        }
        if !self.unmatched.is_empty() {
            self.queued -= self.unmatched.len();
            self.queued_bytes -= inbox_bytes(&self.unmatched);
            let mut device = SlotDevice {
                inbox: &mut self.unmatched,
                out: &mut self.from_stack,
                out_bytes: &mut self.from_stack_bytes,
                mtu: self.mtu,
            };
            self.iface.poll(now, &mut device, &mut self.no_sockets);
        }
        for index in std::mem::take(&mut self.dirty) {
            let Some(Some(slot)) = self.slots.get_mut(index) else {
                continue;
            };
            slot.dirty = false;
            self.queued -= slot.inbox.len();
            self.queued_bytes -= inbox_bytes(&slot.inbox);
            let mut device = SlotDevice {
                inbox: &mut slot.inbox,
                out: &mut self.from_stack,
                out_bytes: &mut self.from_stack_bytes,
                mtu: self.mtu,
            };
            let changed = self.iface.poll(now, &mut device, &mut slot.set);
            if changed == PollResult::SocketStateChanged {
                self.touched.push(SocketHandle(index));
            }
            let wake = self.iface.poll_at(now, &slot.set);
            if wake != slot.wake {
                slot.wake = wake;
                if let Some(at) = wake {
                    self.timers.push(Reverse((at, index)));
                }
            }
        }
    }

    /// The sockets whose last poll changed something (took packets, sent some, changed
    /// state) since the last call: the flows the caller needs to look at.
    pub fn take_touched(&mut self) -> Vec<SocketHandle> {
        std::mem::take(&mut self.touched)
    }

    /// IP packets the stack sent to the guest since the last call, each behind
    /// PACKET_HEADROOM.
    pub fn take_egress(&mut self) -> Vec<Vec<u8>> {
        self.from_stack_bytes = 0;
        std::mem::take(&mut self.from_stack)
    }

    /// When the stack next needs `poll` (zero if a socket is waiting for one now).
    pub fn poll_delay(&mut self) -> Option<Duration> {
        if !self.dirty.is_empty() || !self.unmatched.is_empty() {
            return Some(Duration::ZERO);
        }
        while let Some(Reverse((at, index))) = self.timers.peek().copied() {
            let live = matches!(self.slots.get(index), Some(Some(s)) if s.wake == Some(at));
            if live {
                let now = self.now();
                let micros = if at > now {
                    (at - now).total_micros()
                } else {
                    0
                };
                return Some(Duration::from_micros(micros));
            }
            self.timers.pop();
        }
        None
    }

    fn add(&mut self, socket: tcp::Socket<'static>, endpoint: Endpoint) -> Option<SocketHandle> {
        if self.by_endpoint.contains_key(&endpoint) {
            return None;
        }
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let inner = set.add(socket);
        let slot = Slot {
            set,
            socket: inner,
            endpoint,
            inbox: VecDeque::new(),
            dirty: false,
            wake: None,
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.by_endpoint.insert(endpoint, index);
        self.mark(index);
        Some(SocketHandle(index))
    }

    /// A socket listening as `dst:port` for the guest's connection from `guest_port`. With
    /// `hold_synack` its SYN-ACK waits until `pause_synack(false)` (the proxy has accepted)
    /// or the socket is aborted.
    pub fn listen(
        &mut self,
        dst: Ipv4Addr,
        port: u16,
        guest_port: u16,
        hold_synack: bool,
    ) -> Option<SocketHandle> {
        let mut socket = self.closed_socket();
        socket.pause_synack(hold_synack);
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(dst)),
            port,
        };
        socket.listen(endpoint).ok()?;
        self.add(socket, (dst, port, guest_port))
    }

    /// A socket connecting from `local:local_port` (the gateway) to the guest.
    pub fn connect(
        &mut self,
        local: Ipv4Addr,
        local_port: u16,
        guest: Ipv4Addr,
        port: u16,
    ) -> Option<SocketHandle> {
        let mut socket = self.closed_socket();
        socket.pause_synack(false);
        let remote = IpEndpoint::new(IpAddress::Ipv4(guest), port);
        let local_end = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(local)),
            port: local_port,
        };
        socket
            .connect(self.iface.context(), remote, local_end)
            .ok()?;
        self.add(socket, (local, local_port, port))
    }

    /// A socket, to read, write or close. Touching it schedules it for the next poll.
    ///
    /// # Panics
    /// On a handle that was removed (a bug in the caller, never guest input).
    pub fn socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.mark(handle.0);
        let Some(Some(slot)) = self.slots.get_mut(handle.0) else {
            panic!("stack: socket {handle:?} was removed");
        };
        slot.set.get_mut::<tcp::Socket>(slot.socket)
    }

    /// A closed socket for a new flow: a spare one if there is one, else one with new buffers.
    fn closed_socket(&mut self) -> tcp::Socket<'static> {
        self.spare.pop().unwrap_or_else(|| {
            let rx = tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]);
            let tx = tcp::SocketBuffer::new(vec![0; FLOW_BUFFER]);
            let mut socket = tcp::Socket::new(rx, tx);
            socket.set_nagle_enabled(false);
            socket
        })
    }

    /// Forget a socket (whatever it still had to send is dropped: poll first for that).
    pub fn remove(&mut self, handle: SocketHandle) {
        let Some(mut slot) = self.slots.get_mut(handle.0).and_then(Option::take) else {
            return;
        };
        if self.spare.len() < MAX_SPARE_SOCKETS {
            // Every socket of a slot is TCP (`listen` and `connect` make them).
            if let smoltcp::socket::Socket::Tcp(mut socket) = slot.set.remove(slot.socket) {
                // Closed at once, nothing sent: `listen` and `connect` reset a closed socket
                // (state, sequence numbers, both buffers emptied), so nothing of this flow
                // reaches the next one.
                socket.abort();
                self.spare.push(socket);
            }
        }
        self.queued -= slot.inbox.len();
        self.queued_bytes -= inbox_bytes(&slot.inbox);
        self.by_endpoint.remove(&slot.endpoint);
        self.free.push(handle.0);
    }

    /// Reset a socket now: its RST goes out with the next `take_egress`, then it is gone.
    pub fn discard(&mut self, handle: SocketHandle) {
        self.socket(handle).abort();
        self.poll();
        self.remove(handle);
    }

    /// Open sockets.
    pub fn len(&self) -> usize {
        self.by_endpoint.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }
}

#[cfg(test)]
mod tests;
