//! `[proxy]`.

use super::*;

#[test]
fn proxy_addresses() {
    let proxy = |body: &str| format!("{VM}[proxy]\n{body}\n");
    fails(
        &proxy("http = \"localhost:3128\""),
        "proxy.http",
        (6, 8),
        "\"localhost:3128\" is not an IP address and port; write it like 127.0.0.1:3128",
    );
    fails(
        &proxy("socks5 = \"127.0.0.1\""),
        "proxy.socks5",
        (6, 10),
        "is not an IP address and port",
    );
    fails(
        &proxy("http = \"127.0.0.1:0\""),
        "proxy.http",
        (6, 8),
        "port 0 cannot be connected to",
    );
    fails(
        &proxy("socks5 = \"0.0.0.0:1080\""),
        "proxy.socks5",
        (6, 10),
        "0.0.0.0 is not an address to connect to",
    );
    let p = parse(&proxy("http = \"[::1]:3128\"")).unwrap();
    assert_eq!(p.proxy.http, Some("[::1]:3128".parse().unwrap()));
}

#[test]
fn explicit_port_rules() {
    let proxy = |body: &str| format!("{VM}[proxy]\n{body}\n");
    fails(
        &proxy("explicit_port = 3128"),
        "proxy.explicit_port",
        (6, 17),
        "needs proxy.http, where the spliced connections go",
    );
    fails(
        &proxy("http = \"127.0.0.1:3128\"\nexplicit_port = 0"),
        "proxy.explicit_port",
        (7, 17),
        "0 is not a port; use 1..=65535",
    );
    fails(
        &proxy("http = \"127.0.0.1:3128\"\nexplicit_port = 53"),
        "proxy.explicit_port",
        (7, 17),
        "53 is the gateway's DNS port",
    );
}
