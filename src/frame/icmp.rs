//! ICMP over IPv4: the messages the guest sends (the gateway answers echo requests). The
//! wire format is etherparse's.

use etherparse::Icmpv4Slice;

use super::checksum::{self, L4Checksum};
use crate::telemetry::DropReason;

/// ICMP echo request type.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP echo reply type.
pub const ICMP_ECHO_REPLY: u8 = 0;

/// An ICMP message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp<'a> {
    pub icmp_type: u8,
    pub code: u8,
    /// The whole ICMP message (header included), for echo replies.
    pub message: &'a [u8],
    pub checksum: L4Checksum,
}

/// The ICMP message that is an IPv4 packet's payload `l4`.
pub(super) fn parse(l4: &[u8]) -> Result<Icmp<'_>, DropReason> {
    let icmp = Icmpv4Slice::from_slice(l4).map_err(|_| DropReason::L4Malformed)?;
    Ok(Icmp {
        icmp_type: icmp.type_u8(),
        code: icmp.code_u8(),
        message: l4,
        // Offloads complete TCP and UDP sums only: an ICMP message is always summed.
        checksum: checksum::icmp_checksum(l4),
    })
}
