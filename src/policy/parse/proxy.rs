//! `[proxy]`: the host's HTTP and SOCKS5 proxies and the explicit-proxy front.

use toml::Spanned;

use super::super::model::*;
use super::super::{Located, DNS_PORT};
use super::diagnostics::Ctx;
use super::raw::RawProxy;
use super::values::{port, socket_addr};

pub(super) fn proxy(ctx: &Ctx<'_>, raw: &RawProxy) -> Option<Proxy> {
    let address = |v: &Option<Spanned<String>>, key: &str| {
        ctx.keep(
            v.as_ref()
                .map(|v| socket_addr(ctx, v, key, false))
                .transpose(),
        )
    };
    let http = address(&raw.http, "proxy.http");
    let socks5 = address(&raw.socks5, "proxy.socks5");
    let explicit_port = ctx.keep(
        raw.explicit_port
            .as_ref()
            .map(|p| explicit_port(ctx, p, raw.http.is_some()))
            .transpose(),
    );
    Some(Proxy {
        http: http?,
        socks5: socks5?,
        explicit_port: explicit_port?,
    })
}

/// `proxy.explicit_port`; it needs `proxy.http` (present: if its value is wrong, that is its
/// own error).
fn explicit_port(ctx: &Ctx<'_>, p: &Spanned<i64>, has_http: bool) -> Result<u16, Located> {
    let key = "proxy.explicit_port";
    let port = port(ctx, p, key)?;
    if port == DNS_PORT {
        return Err(ctx.at(
            p,
            key,
            "53 is the gateway's DNS port; choose another, such as 3128",
        ));
    }
    if !has_http {
        return Err(ctx.at(
            p,
            key,
            "needs proxy.http, where the spliced connections go; add http = \"127.0.0.1:3128\" to [proxy]",
        ));
    }
    Ok(port)
}
