//! ICMP over IPv4: the messages the guest sends (the gateway answers echo requests). The
//! wire format is etherparse's.

use etherparse::Icmpv4Slice;
use smoltcp::wire::{Icmpv4Message, Icmpv4Packet};

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
}

impl Icmp<'_> {
    /// The message's checksum state, summed when asked (offloads complete TCP and UDP sums
    /// only: an ICMP message is always summed).
    pub fn checksum(&self) -> L4Checksum {
        checksum::icmp_checksum(self.message)
    }

    /// The echo reply to this message: the rest of it (identifier, sequence number, data)
    /// as it came, the type made "echo reply" and the checksum redone. `None` if it is
    /// shorter than an echo header (never: parsing refuses those).
    pub fn echo_reply(&self) -> Option<Vec<u8>> {
        let mut reply = self.message.to_vec();
        let mut packet = Icmpv4Packet::new_checked(&mut reply[..]).ok()?;
        packet.set_msg_type(Icmpv4Message::EchoReply);
        packet.fill_checksum();
        Some(reply)
    }
}

/// The ICMP message that is an IPv4 packet's payload `l4`.
pub(super) fn parse(l4: &[u8]) -> Result<Icmp<'_>, DropReason> {
    let icmp = Icmpv4Slice::from_slice(l4).map_err(|_| DropReason::L4Malformed)?;
    Ok(Icmp {
        icmp_type: icmp.type_u8(),
        code: icmp.code_u8(),
        message: l4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_reply_mirrors_the_request() {
        let request = [8, 0, 0, 0, 0x42, 0x42, 0, 7, b'p', b'i', b'n', b'g', b'!'];
        let mut request = request.to_vec();
        let sum = checksum::internet_checksum(&request);
        request[2..4].copy_from_slice(&sum.to_be_bytes());
        let icmp = parse(&request).expect("parses");
        assert_eq!(
            (icmp.icmp_type, icmp.checksum()),
            (ICMP_ECHO_REQUEST, L4Checksum::Verified)
        );
        let reply = icmp.echo_reply().expect("a reply");
        let parsed = parse(&reply).expect("parses");
        assert_eq!(
            (parsed.icmp_type, parsed.checksum()),
            (ICMP_ECHO_REPLY, L4Checksum::Verified)
        );
        assert_eq!(
            reply[4..],
            request[4..],
            "identifier, sequence and data are echoed"
        );
        assert_eq!(parse(&request[..7]).err(), Some(DropReason::L4Malformed));
    }
}
