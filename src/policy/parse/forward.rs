//! `[[forward]]`: host addresses forwarded to guest ports, and who may connect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};

use super::super::model::*;
use super::super::Located;
use super::diagnostics::Ctx;
use super::raw::RawForward;
use super::values::{cidr, port, socket_addr};

pub(super) fn forwards(ctx: &Ctx<'_>, raw: &[RawForward]) -> Result<Vec<Forward>, Located> {
    let mut out: Vec<Forward> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |k: &str| format!("forward[{i}].{k}");
        let listen = socket_addr(ctx, &r.listen, &key("listen"), true)?;
        let guest_port = port(ctx, &r.guest_port, &key("guest_port"))?;
        let from = match &r.from {
            None => vec![
                IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("valid prefix")),
                IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ],
            Some(list) if list.get_ref().is_empty() => {
                return Err(ctx.at(
                    list,
                    key("from"),
                    "is empty, so no peer may connect; remove `from` for loopback only, or list CIDRs like \"127.0.0.0/8\"",
                ))
            }
            Some(list) => list
                .get_ref()
                .iter()
                .map(|c| cidr(ctx, c, &key("from")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if let Some((j, other)) = out
            .iter()
            .enumerate()
            .find(|(_, o)| overlaps(o.listen, listen))
        {
            return Err(ctx.at(
                &r.listen,
                key("listen"),
                format!(
                    "{listen} overlaps forward[{j}].listen ({}); give each forward its own port",
                    other.listen
                ),
            ));
        }
        out.push(Forward {
            listen,
            guest_port,
            from,
        });
    }
    Ok(out)
}

/// Two listen addresses collide: same port, and the same IP or either one unspecified.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
