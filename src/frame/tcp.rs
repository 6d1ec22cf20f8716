//! TCP over IPv4: the segments the guest sends (parsed by etherparse, their checksum state
//! on demand), and the edits moat makes in them, through smoltcp's checked views
//! (`smoltcp::wire`): no option is walked and no offset is counted by hand here.

use std::net::Ipv4Addr;

use etherparse::TcpSlice;
use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpOption, TcpPacket};

use super::checksum::{self, L4Checksum, Pseudo};
use crate::telemetry::DropReason;

/// A TCP segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub payload: &'a [u8],
    /// The whole segment (header included) and what its checksum covers, for
    /// [`Tcp::checksum`].
    segment: &'a [u8],
    sum: Pseudo,
}

impl Tcp<'_> {
    /// The segment's checksum state, summed when asked: only whoever would use the segment
    /// asks, so frames the firewall drops are never summed.
    pub fn checksum(&self) -> L4Checksum {
        if self.sum.completed {
            L4Checksum::Completed
        } else {
            checksum::tcp_checksum(self.sum.src, self.sum.dst, self.segment)
        }
    }
}

/// The TCP flags moat cares about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// The TCP segment that is an IPv4 packet's payload `l4`, from `src` to `dst`.
/// `completed`: moat has just computed its checksum (a guest's NEEDS_CSUM).
pub(super) fn parse(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: &[u8],
    completed: bool,
) -> Result<Tcp<'_>, DropReason> {
    let tcp = TcpSlice::from_slice(l4).map_err(|_| DropReason::L4Malformed)?;
    Ok(Tcp {
        src_port: tcp.source_port(),
        dst_port: tcp.destination_port(),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags: TcpFlags {
            syn: tcp.syn(),
            ack: tcp.ack(),
            fin: tcp.fin(),
            rst: tcp.rst(),
        },
        payload: tcp.payload(),
        segment: l4,
        sum: Pseudo {
            src,
            dst,
            completed,
        },
    })
}

/// In a TCP SYN (an IPv4 packet), raise the MSS option to `mss`: the guest takes segments
/// that large (GUEST_TSO4) and moat's stack then sends them. Anything else, or a SYN
/// without a well-formed MSS option, is left as it is. The checksum is not redone: the data
/// path verified it before, and the stack does not verify again.
pub fn raise_syn_mss(ip: &mut [u8], mss: u16) {
    let Some(at) = mss_option(ip, mss) else {
        return;
    };
    // Checked by `mss_option` on these very bytes: the views and the offset hold.
    let mut packet = Ipv4Packet::new_unchecked(ip);
    let mut tcp = TcpPacket::new_unchecked(packet.payload_mut());
    if let Some(option) = tcp.options_mut().get_mut(at..) {
        TcpOption::MaxSegmentSize(mss).emit(option);
    }
}

/// Where, in the options of a TCP SYN, an MSS option below `mss` is.
fn mss_option(ip: &[u8], mss: u16) -> Option<usize> {
    let packet = Ipv4Packet::new_checked(ip).ok()?;
    if packet.version() != 4 || packet.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(packet.payload()).ok()?;
    if !tcp.syn() {
        return None;
    }
    let options = tcp.options();
    let mut rest = options;
    while !rest.is_empty() {
        // A malformed option ends the walk: smoltcp refuses such a SYN anyway.
        let (next, option) = TcpOption::parse(rest).ok()?;
        match option {
            TcpOption::EndOfList => return None,
            TcpOption::MaxSegmentSize(announced) => {
                return (announced < mss).then_some(options.len() - rest.len());
            }
            _ => rest = next,
        }
    }
    None
}

/// The length of the TCP header (options included) of a segment; `None` if it is not a
/// well-formed one.
pub fn header_len(segment: &[u8]) -> Option<usize> {
    Some(usize::from(
        TcpPacket::new_checked(segment).ok()?.header_len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, TcpOptionElement};

    fn segment(syn: bool, options: &[TcpOptionElement]) -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 0, 0, 2], [198, 18, 0, 9], 64).tcp(40000, 80, 7, 64240);
        let b = if syn { b.syn() } else { b.ack(1) };
        let b = b.options(options).expect("options fit");
        let mut out = Vec::new();
        b.write(&mut out, &[]).expect("writes");
        out
    }

    fn announced(ip: &[u8]) -> Option<u16> {
        let packet = Ipv4Packet::new_checked(ip).unwrap();
        let tcp = TcpPacket::new_checked(packet.payload()).unwrap();
        let mut rest = tcp.options();
        while let Ok((next, option)) = TcpOption::parse(rest) {
            if let TcpOption::MaxSegmentSize(mss) = option {
                return Some(mss);
            }
            rest = next;
        }
        None
    }

    #[test]
    fn a_syn_mss_is_raised_after_other_options() {
        let opts = [
            TcpOptionElement::Noop,
            TcpOptionElement::WindowScale(7),
            TcpOptionElement::MaximumSegmentSize(1460),
        ];
        let mut p = segment(true, &opts);
        let before = p.clone();
        raise_syn_mss(&mut p, 32_000);
        assert_eq!(announced(&p), Some(32_000));
        let changed = p.iter().zip(&before).filter(|(a, b)| a != b).count();
        assert!(changed <= 2, "only the MSS value changes");
    }

    #[test]
    fn other_segments_and_larger_mss_are_left_alone() {
        let mss = [TcpOptionElement::MaximumSegmentSize(1460)];
        for (mut p, limit) in [
            (segment(false, &mss), 32_000), // not a SYN
            (segment(true, &mss), 1000),    // already larger
            (segment(true, &[]), 32_000),   // no MSS option
            (segment(true, &[TcpOptionElement::Noop]), 32_000),
        ] {
            let before = p.clone();
            raise_syn_mss(&mut p, limit);
            assert_eq!(p, before);
        }
        // An MSS after the end of the option list is not an option.
        let mut p = segment(
            true,
            &[
                TcpOptionElement::Noop,
                TcpOptionElement::Noop,
                TcpOptionElement::Noop,
                TcpOptionElement::Noop,
            ],
        );
        let at = p.len() - 4;
        p[at..].copy_from_slice(&[0, 2, 4, 0]);
        let ended = p.clone();
        raise_syn_mss(&mut p, 32_000);
        assert_eq!(p, ended);
    }

    #[test]
    fn malformed_packets_are_left_alone() {
        for mut p in [vec![], vec![0x45; 10], {
            let mut p = vec![0u8; 200];
            p[0] = 0x45;
            p[9] = 6;
            p
        }] {
            let before = p.clone();
            raise_syn_mss(&mut p, 32_000);
            assert_eq!(p, before);
        }
        let mut bad_len = segment(true, &[TcpOptionElement::MaximumSegmentSize(1460)]);
        let at = bad_len.len() - 3;
        bad_len[at] = 1; // an option length below 2
        let before = bad_len.clone();
        raise_syn_mss(&mut bad_len, 32_000);
        assert_eq!(bad_len, before);
    }
}
