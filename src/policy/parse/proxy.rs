//! `[proxy]`: the host's HTTP and SOCKS5 proxies and the explicit-proxy front.

use super::super::model::*;
use super::super::Located;
use super::diagnostics::Ctx;
use super::raw::RawProxy;
use super::values::{port, socket_addr};

/// The gateway answers DNS on this port (UDP and TCP): the explicit proxy cannot have it.
const DNS_PORT: u16 = 53;

pub(super) fn proxy(ctx: &Ctx<'_>, raw: Option<&RawProxy>) -> Result<Proxy, Located> {
    let Some(raw) = raw else {
        return Ok(Proxy::default());
    };
    let http = raw
        .http
        .as_ref()
        .map(|v| socket_addr(ctx, v, "proxy.http", false))
        .transpose()?;
    let socks5 = raw
        .socks5
        .as_ref()
        .map(|v| socket_addr(ctx, v, "proxy.socks5", false))
        .transpose()?;
    let explicit_port = match &raw.explicit_port {
        None => None,
        Some(p) => {
            let key = "proxy.explicit_port";
            let port = port(ctx, p, key)?;
            if port == DNS_PORT {
                return Err(ctx.at(
                    p,
                    key,
                    "53 is the gateway's DNS port; choose another, such as 3128",
                ));
            }
            if http.is_none() {
                return Err(ctx.at(
                    p,
                    key,
                    "needs proxy.http, where the spliced connections go; add http = \"127.0.0.1:3128\" to [proxy]",
                ));
            }
            Some(port)
        }
    };
    Ok(Proxy {
        http,
        socks5,
        explicit_port,
    })
}
