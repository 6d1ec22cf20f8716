//! What the device offers: virtio feature bits, vhost-user protocol features, config space.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use crate::policy::Vm;

/// Within a pair (and in the event ids of its worker): queue 0 receives (moat -> guest),
/// queue 1 transmits (guest -> moat). Pair i is virtqueues 2i and 2i+1.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The virtio feature bits moat offers: MQ with several queue pairs.
pub fn virtio_features(queue_pairs: usize) -> u64 {
    let mq = if queue_pairs > 1 {
        1 << VIRTIO_NET_F_MQ
    } else {
        0
    };
    mq | (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_STATUS)
        | (1 << VIRTIO_NET_F_MTU)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        // Offloads: partial checksums and 64 KiB TCPv4 segments, both ways (see
        // frame::virtio_hdr::Offloads and datapath::complete_checksum).
        | (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Whether `acked` includes feature bit `bit`.
pub fn has_feature(acked: u64, bit: u32) -> bool {
    acked & (1 << bit) != 0
}

/// vhost-user protocol features: CONFIG (config space reads carry the policy's MAC and MTU),
/// MQ (QEMU and Cloud Hypervisor ask for the queue count), REPLY_ACK and
/// CONFIGURE_MEM_SLOTS (Cloud Hypervisor adds memory with them).
///
/// CONFIGURE_MEM_SLOTS only with one queue pair: QEMU (7.2) opens one vhost device per pair
/// on the same connection and each adds every memory region with ADD_MEM_REG, which the
/// backend refuses as overlapping; without the feature QEMU sends SET_MEM_TABLE once.
pub fn protocol_features(queue_pairs: usize) -> VhostUserProtocolFeatures {
    let features = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    if queue_pairs == 1 {
        features | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    } else {
        features
    }
}

/// `struct virtio_net_config` up to and including `mtu` (virtio 1.2, 5.1.4).
pub fn config_space(vm: &Vm, queue_pairs: u16) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0..6].copy_from_slice(&vm.mac.0);
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&queue_pairs.to_le_bytes()); // max_virtqueue_pairs
    c[10..12].copy_from_slice(&vm.mtu.to_le_bytes());
    c
}

/// The bytes of `space` the frontend asked for; bytes past the end read as zero.
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size.min(256) as usize];
    let start = offset as usize;
    if start < space.len() {
        let n = (space.len() - start).min(out.len());
        out[..n].copy_from_slice(&space[start..start + n]);
    }
    out
}
