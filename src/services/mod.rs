//! The gateway's own answers: ARP for the gateway address, DHCP for the VM, ICMP echo.
//! (DNS, the fourth service, has its own home: `crate::dns`.)
//!
//! Each service takes a frame the firewall already handed to it and returns the frame to put
//! in the guest's RX queue (Ethernet onwards; the device adds the virtio-net header), or the
//! reason it will not answer.

pub mod arp;
pub mod dhcp;
pub mod icmp;

use crate::frame::Frame;
use crate::policy::{Policy, Vm};
use crate::telemetry::{DropReason, Service};

/// The gateway as the guest sees it: the VM's addressing from the policy (which a reload
/// cannot change).
#[derive(Debug)]
pub struct Gateway {
    vm: Vm,
}

impl Gateway {
    pub fn new(policy: &Policy) -> Gateway {
        Gateway {
            vm: policy.vm.clone(),
        }
    }

    /// Answer `frame` with `service`. `Ok(None)` means handled with nothing to send back
    /// (a DHCP RELEASE).
    pub fn answer(
        &mut self,
        service: Service,
        frame: &Frame<'_>,
    ) -> Result<Option<Vec<u8>>, DropReason> {
        match service {
            Service::Arp => arp::answer(&self.vm, frame).map(Some),
            Service::Dhcp => dhcp::answer(&self.vm, frame),
            Service::IcmpEcho => icmp::answer(&self.vm, frame).map(Some),
            // DNS is answered by `crate::dns::udp::UdpDns`, which the data path asks first.
            Service::Dns => Err(DropReason::NotAllowed),
        }
    }
}
