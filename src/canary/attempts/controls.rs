//! The controls: allowed flows that must work, or "everything blocked" would prove nothing.
//! Without --live, one flow through a loopback stand-in that echoes; with --live, one per TCP
//! rule through the deployment's real proxy.

use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::socket::tcp::State;

use super::stack::exchange;
use super::{outcome, resolvable, QUIET};
use crate::canary::{Expect, Outcome};
use crate::policy::{Destination, NamePattern, OutboundRule, Policy, Protocol};
use moat_sim::guest::GuestNet;

/// Today's control: an allowed flow through a loopback stand-in that echoes.
pub(super) fn stub_control(net: &mut GuestNet, policy: &Policy) -> Vec<Outcome> {
    let mut out = Vec::new();
    match allowed_flow(policy) {
        Some((name, port)) => {
            let addr = net.resolve(&name, QUIET * 2).ok().and_then(|r| r.addr());
            let echoed = addr.is_some_and(|a| exchange(net, a, port).1);
            out.push(outcome(
                "control: allowed flow via proxy",
                Expect::Works,
                echoed,
                format!("{name}:{port} through a loopback stand-in proxy"),
            ));
        }
        None => out.push(outcome(
            "control: allowed flow via proxy",
            Expect::Works,
            true,
            "policy allows no named TCP flow: not applicable",
        )),
    }
    out
}

/// An allowed TCP destination by name: (name, port), resolvable and allowed by a rule.
fn allowed_flow(policy: &Policy) -> Option<(String, u16)> {
    policy
        .outbound
        .iter()
        .filter(|r| r.protocol == Protocol::Tcp)
        .find_map(|r| {
            let port = r.ports.first()?.lo;
            let name = match &r.to {
                None => resolvable(policy)?,
                Some(to) => to.iter().find_map(|d| match d {
                    Destination::Name(NamePattern::Exact(n)) => Some(n.clone()),
                    Destination::Name(NamePattern::Wildcard(s)) => Some(format!("canary.{s}")),
                    Destination::Cidr(_) => None,
                })?,
            };
            (policy.dns.allows(&name)
                && r.allows_name(&name)
                && !policy.dns.records.contains_key(&name))
            .then_some((name, port))
        })
}

/// `--control-url http://example.com/health`, `https://example.com`, `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    pub url: String,
    pub http: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl ControlUrl {
    pub fn parse(url: &str) -> Result<ControlUrl, String> {
        let bad = |why: &str| format!("--control-url {url}: {why}");
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("give scheme://host[:port][/path]"))?;
        let (default_port, http) = match scheme {
            "http" => (Some(80), true),
            "https" => (Some(443), false),
            "tcp" => (None, false),
            _ => return Err(bad("scheme must be http, https or tcp")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
            None => (
                authority,
                default_port.ok_or_else(|| bad("tcp:// needs a port"))?,
            ),
        };
        if host.is_empty() || port == 0 || host.contains(['[', ']', '@', ' ']) {
            return Err(bad("give a name or IPv4 address and a port"));
        }
        Ok(ControlUrl {
            url: url.to_string(),
            http,
            host: host.to_ascii_lowercase(),
            port,
            path: path.to_string(),
        })
    }

    fn allowed_by(&self, rule: &OutboundRule) -> bool {
        rule.protocol == Protocol::Tcp
            && rule.allows_port(self.port)
            && match self.host.parse::<Ipv4Addr>() {
                Ok(ip) => rule.allows_ip(ip),
                Err(_) => rule.allows_name(&self.host),
            }
    }
}

const CONTROL_WAIT: Duration = Duration::from_secs(15);

/// One control per TCP rule through the real proxy: its destination from `--control-url`
/// (the first one the rule allows) or from the rule itself (its first exact name, or an
/// allowed DNS name when `to` is absent). A rule with neither is reported, not tried;
/// if no rule yields a control the run fails, since "all blocked" would prove nothing.
pub(super) fn live_controls(
    net: &mut GuestNet,
    policy: &Policy,
    urls: &[ControlUrl],
) -> Vec<Outcome> {
    let mut out = Vec::new();
    for u in urls {
        if !policy.outbound.iter().any(|r| u.allowed_by(r)) {
            out.push(outcome(
                format!("control: {}", u.url),
                Expect::Works,
                false,
                "no [[outbound]] rule allows it: fix --control-url or the policy",
            ));
        }
    }
    let mut tried = 0;
    for (i, rule) in policy.outbound.iter().enumerate() {
        if rule.protocol != Protocol::Tcp {
            continue; // UDP controls need a real UDP service to answer: not attempted
        }
        let chosen = urls
            .iter()
            .find(|u| u.allowed_by(rule))
            .cloned()
            .or_else(|| {
                derived_destination(policy, rule).map(|(host, port)| ControlUrl {
                    url: format!("tcp://{host}:{port}"),
                    http: port == 80,
                    host,
                    port,
                    path: "/".into(),
                })
            });
        let Some(c) = chosen else { continue };
        tried += 1;
        let name = format!("control: rule {} {}:{}", i + 1, c.host, c.port);
        let addr = match c.host.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => net.resolve(&c.host, QUIET * 4).ok().and_then(|r| r.addr()),
        };
        let Some(addr) = addr else {
            out.push(outcome(
                name,
                Expect::Works,
                false,
                format!(
                    "{} does not resolve through moat's DNS ([dns] allow?)",
                    c.host
                ),
            ));
            continue;
        };
        let (through, detail) = control_exchange(net, addr, &c);
        out.push(outcome(name, Expect::Works, through, detail));
    }
    let has_tcp = policy.outbound.iter().any(|r| r.protocol == Protocol::Tcp);
    if tried == 0 && has_tcp {
        out.push(outcome(
            "control: allowed flow via proxy",
            Expect::Works,
            false,
            "no TCP rule names a destination the canary can try: give --control-url (or --no-controls)",
        ));
    }
    out
}

/// A destination a rule allows by name: its first exact name, or with `to` absent an
/// allowed DNS name.
fn derived_destination(policy: &Policy, rule: &OutboundRule) -> Option<(String, u16)> {
    let port = rule.ports.first()?.lo;
    let name = match &rule.to {
        None => resolvable(policy).filter(|n| !policy.dns.records.contains_key(n))?,
        Some(to) => to.iter().find_map(|d| match d {
            Destination::Name(NamePattern::Exact(n)) => Some(n.clone()),
            _ => None,
        })?,
    };
    Some((name, port))
}

/// Open the flow; moat answers the guest's SYN only after the proxy said 2xx, so an
/// established connection is a tunnel the proxy opened. For http, a HEAD request must get
/// an HTTP answer back too.
fn control_exchange(net: &mut GuestNet, addr: Ipv4Addr, c: &ControlUrl) -> (bool, String) {
    let h = net.tcp_connect(addr, c.port);
    // Done when established, or when moat reset the flow (the proxy refused it).
    let _ = net.run_until(CONTROL_WAIT, |n| {
        matches!(n.tcp(h).state(), State::Established | State::Closed)
    });
    let established = net.tcp(h).state() == State::Established;
    let mut result = (
        established,
        if established {
            format!("{} ({addr}:{}): tunnel opened by the proxy", c.url, c.port)
        } else {
            format!(
                "{} ({addr}:{}): no connection through the proxy",
                c.url, c.port
            )
        },
    );
    if established && c.http {
        let req = format!(
            "HEAD {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: moat-canary\r\nConnection: close\r\n\r\n",
            c.path, c.host
        );
        let _ = net.tcp(h).send_slice(req.as_bytes());
        let mut got = Vec::new();
        let answered = net
            .run_until(CONTROL_WAIT, |n| {
                let s = n.tcp(h);
                while s.can_recv() {
                    let _ = s.recv(|d| {
                        got.extend_from_slice(d);
                        (d.len(), ())
                    });
                }
                got.len() >= 12 || !s.may_recv()
            })
            .unwrap_or(false);
        let line = String::from_utf8_lossy(&got[..got.len().min(40)]).into_owned();
        let ok = answered && got.starts_with(b"HTTP/");
        result = (
            ok,
            format!(
                "{} ({addr}:{}): {}",
                c.url,
                c.port,
                if ok {
                    line.lines().next().unwrap_or_default().to_string()
                } else {
                    format!("no HTTP answer ({line:?})")
                }
            ),
        );
    }
    net.tcp(h).abort();
    let _ = net.poll(Duration::from_millis(5));
    net.remove(h);
    result
}
