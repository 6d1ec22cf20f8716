//! `[[forward]]`: host addresses forwarded to guest ports, and who may connect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};

use super::super::model::*;
use super::diagnostics::Ctx;
use super::raw::RawForward;
use super::values::{cidr, port, socket_addr};

/// The forwards, one entry per element of the array; `None` for an element whose shape error
/// is reported.
pub(super) fn forwards(ctx: &Ctx<'_>, raw: &[Option<RawForward>]) -> Option<Vec<Forward>> {
    // Every valid listen address so far, with its forward's index.
    let mut listens: Vec<(usize, SocketAddr)> = Vec::new();
    let mut out: Vec<Option<Forward>> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let Some(r) = r else {
            out.push(None);
            continue;
        };
        let key = |k: &str| format!("forward[{i}].{k}");
        let listen = ctx.keep(socket_addr(ctx, &r.listen, &key("listen"), true));
        let guest_port = ctx.keep(port(ctx, &r.guest_port, &key("guest_port")));
        let from = match &r.from {
            None => Some(vec![
                IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("valid prefix")),
                IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ]),
            Some(list) if list.get_ref().is_empty() => {
                ctx.report(ctx.at(
                    list,
                    key("from"),
                    "is empty, so no peer may connect; remove `from` for loopback only, or list CIDRs like \"127.0.0.0/8\"",
                ));
                None
            }
            Some(list) => ctx.all(list.get_ref().iter().map(|c| cidr(ctx, c, &key("from")))),
        };
        let listen = listen.and_then(|listen| {
            let clash = listens.iter().find(|(_, o)| overlaps(*o, listen)).copied();
            listens.push((i, listen));
            match clash {
                Some((j, other)) => {
                    ctx.report(ctx.at(
                        &r.listen,
                        key("listen"),
                        format!(
                            "{listen} overlaps forward[{j}].listen ({other}); give each forward its own port"
                        ),
                    ));
                    None
                }
                None => Some(listen),
            }
        });
        out.push((|| {
            Some(Forward {
                listen: listen?,
                guest_port: guest_port?,
                from: from?,
            })
        })());
    }
    out.into_iter().collect()
}

/// Two listen addresses collide: same port, and the same IP or either one unspecified.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
