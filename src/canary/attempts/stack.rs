//! TCP and DNS through the simulated guest's stack: other VMs, the gateway's ports, cloud
//! metadata, names outside the allow-list, the internet by IP literal. A flow got through if
//! moat opened a proxy connection for it (its own witness) or bytes came back.

use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::socket::tcp::State;

use super::smuggling::payload_attempts;
use super::{closed_port, internet_address, neighbour, outcome, resolvable, Mode, QUIET, TCP_WAIT};
use crate::canary::{Expect, Outcome, Witness};
use crate::policy::{DnsMode, Policy, Protocol};
use moat_sim::guest::GuestNet;

/// Connect, send a line, and see whether it comes back (the stand-in proxies echo).
pub(super) fn exchange(net: &mut GuestNet, dst: Ipv4Addr, port: u16) -> (bool, bool) {
    exchange_with(net, dst, port, b"moat-canary\n")
}

/// Connect, send `payload`, and see whether it comes back (the stand-in proxies echo).
pub(super) fn exchange_with(
    net: &mut GuestNet,
    dst: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> (bool, bool) {
    let h = net.tcp_connect(dst, port);
    let established = net
        .run_until(TCP_WAIT, |n| n.tcp(h).state() == State::Established)
        .unwrap_or(false);
    let mut echoed = false;
    if established {
        let _ = net.tcp(h).send_slice(payload);
        let mut got = Vec::new();
        echoed = net
            .run_until(TCP_WAIT, |n| {
                let s = n.tcp(h);
                while s.can_recv() {
                    let _ = s.recv(|d| {
                        got.extend_from_slice(d);
                        (d.len(), ())
                    });
                }
                got.ends_with(payload)
            })
            .unwrap_or(false);
    }
    net.tcp(h).abort();
    let _ = net.poll(Duration::from_millis(5));
    net.remove(h);
    (established, echoed)
}

/// A forbidden TCP attempt: it got through if moat opened a proxy connection for it (its
/// own witness), or bytes came back.
fn forbidden_tcp(
    net: &mut GuestNet,
    witness: &dyn Witness,
    dst: Ipv4Addr,
    port: u16,
) -> (bool, bool) {
    let before = witness.proxy_flows();
    let (established, echoed) = exchange(net, dst, port);
    let opened = witness.proxy_flows() > before;
    (established, opened || echoed)
}

pub(super) fn through_the_stack(
    net: &mut GuestNet,
    policy: &Policy,
    witness: &dyn Witness,
    mode: &Mode,
) -> Vec<Outcome> {
    let vm = &policy.vm;
    let near = neighbour(policy);
    let mut out = Vec::new();
    for (name, dst) in [
        ("tcp to another vm :22", near),
        (
            "tcp to another 10/8 subnet :22",
            Ipv4Addr::new(10, 99, 0, 1),
        ),
    ] {
        let (established, through) = forbidden_tcp(net, witness, dst, 22);
        out.push(outcome(
            name,
            Expect::Blocked,
            established || through,
            format!("{dst}:22"),
        ));
    }
    for port in [22u16, 2375, 2376, 10250, 8080] {
        if Some(port) == policy.proxy.explicit_port {
            continue; // the policy's own explicit proxy port, spliced by design
        }
        let (established, through) = forbidden_tcp(net, witness, vm.gateway, port);
        out.push(outcome(
            format!("tcp to gateway :{port}"),
            Expect::Blocked,
            established || through,
            format!("{}:{port}", vm.gateway),
        ));
    }
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let (established, through) = forbidden_tcp(net, witness, metadata, 80);
    out.push(outcome(
        "tcp to cloud metadata :80",
        Expect::Blocked,
        established || through,
        "169.254.169.254:80",
    ));
    let forbidden = "canary-forbidden.invalid";
    let resolved = net
        .resolve(forbidden, QUIET * 2)
        .ok()
        .and_then(|r| r.addr());
    out.push(outcome(
        "dns for a non-allowlisted name",
        Expect::Blocked,
        resolved.is_some(),
        format!("{forbidden} -> {resolved:?}"),
    ));
    for a in payload_attempts(policy) {
        let before = witness.proxy_flows();
        let (_, echoed) = exchange_with(net, a.dst, a.port, &a.payload);
        let opened = witness.proxy_flows() > before;
        out.push(outcome(a.name, Expect::Blocked, opened || echoed, a.detail));
    }
    let internet = internet_address(policy);
    let closed = closed_port(policy, Protocol::Tcp);
    let (established, through) = forbidden_tcp(net, witness, internet, closed);
    out.push(outcome(
        "tcp to the internet, other port",
        Expect::Blocked,
        established || through,
        format!("{internet}:{closed}"),
    ));

    // Control: names the policy allows resolve (in upstream mode through the real resolver,
    // a real request: skipped with --no-controls).
    let real_query = policy.dns.mode == DnsMode::Upstream;
    if matches!(
        mode,
        Mode::Live {
            controls: false,
            ..
        }
    ) && real_query
    {
        return out;
    }
    match resolvable(policy) {
        Some(name) => {
            let got = net.resolve(&name, QUIET * 4).ok().and_then(|r| r.addr());
            out.push(outcome(
                "control: resolve an allowed name",
                Expect::Works,
                got.is_some(),
                format!("{name} -> {got:?}"),
            ));
        }
        None => out.push(outcome(
            "control: resolve an allowed name",
            Expect::Works,
            true,
            "policy allows no names: not applicable",
        )),
    }
    out
}
