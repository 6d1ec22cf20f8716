//! Errors before validation: TOML syntax, unknown and missing keys, values of the wrong type.

use super::*;

#[test]
fn syntax_errors() {
    let err = fails("[vm\nname = 1\n", "vm", (1, 4), "fix the TOML syntax");
    assert_eq!(err.kind(), Some(ErrorKind::Syntax), "{err:?}");
    fails(
        &format!("{VM}mtu = 1500 x\n"),
        "vm.mtu",
        (5, 7),
        "string values must be quoted",
    );
    fails(
        &format!("{VM}name = \"u\"\n"),
        "vm.name",
        (5, 1),
        "duplicate key; a key may appear once in a table, keep one",
    );
    fails(
        &format!("{VM}{PROXY}[[outbound]]\nports = [80\n"),
        "outbound[0].ports",
        (9, 12),
        "unclosed array, expected `]`; fix the TOML syntax",
    );
}

#[test]
fn unknown_keys_anywhere() {
    let err = fails(
        &format!("{VM}nmae = \"x\"\n"),
        "vm.nmae",
        (5, 1),
        "unknown key `nmae`; did you mean `name`?",
    );
    assert_eq!(err.kind(), Some(ErrorKind::UnknownKey), "{err:?}");
    fails(
        &format!("{VM}[vpn]\nx = 1\n"),
        "vpn",
        (5, 2),
        "unknown key `vpn`; remove it (allowed here: `vm`, `proxy`, `outbound`, `dns`, `forward`, `limits`)",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\nvai = \"http\"\n"),
        "outbound[0].vai",
        (11, 1),
        "did you mean `via`?",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [80]\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto_ = []\n"),
        "outbound[1].to_",
        (14, 1),
        "did you mean `to`?",
    );
    fails(
        "vm = { name = \"t\", mac = \"52:54:00:12:34:56\", adress = \"10.0.0.2/30\" }\n",
        "vm.adress",
        (1, 47),
        "did you mean `address`?",
    );
    fails(
        &format!("{VM}[dns]\nalow = []\n"),
        "dns.alow",
        (6, 1),
        "did you mean `allow`?",
    );
    fails(
        &format!("{VM}[[forward]]\nlisten = \"127.0.0.1:1\"\nguest_port = 1\nfrom_cidr = []\n"),
        "forward[0].from_cidr",
        (8, 1),
        "unknown key `from_cidr`",
    );
    fails(
        &format!("{VM}[limits]\nmax_flow = 1\n"),
        "limits.max_flow",
        (6, 1),
        "did you mean `max_flows`?",
    );
    fails(
        &format!("{VM}[vm.extra]\nx = 1\n"),
        "vm.extra",
        (5, 5),
        "unknown key `extra`",
    );
}

/// A suggestion is one edit away (a swap of neighbours counts as one), or two for keys of six
/// characters or more; anything farther lists the allowed keys instead.
#[test]
fn did_you_mean_is_one_edit_or_two_for_long_keys() {
    let limits = |key: &str| format!("{VM}[limits]\n{key} = 1\n");
    let dns = |key: &str| format!("{VM}[dns]\n{key} = 1\n");
    for (text, key, line, near) in [
        (limits("egres_bsp"), "limits.egres_bsp", 6, "egress_bps"),
        (limits("ingressbps"), "limits.ingressbps", 6, "ingress_bps"),
        (
            limits("bursts_byte"),
            "limits.bursts_byte",
            6,
            "burst_bytes",
        ),
        (dns("mdoe"), "dns.mdoe", 6, "mode"),
        (dns("alloww"), "dns.alloww", 6, "allow"),
        (format!("{VM}mc = 1\n"), "vm.mc", 5, "mac"),
        (format!("{VM}gatwya = 1\n"), "vm.gatwya", 5, "gateway"),
    ] {
        fails(&text, key, (line, 1), &format!("did you mean `{near}`?"));
    }
    for (text, key) in [
        (dns("mdo"), "dns.mdo"),
        (format!("{VM}mx = 1\n"), "vm.mx"),
        (limits("egress"), "limits.egress"),
    ] {
        let err = parse(&text).expect_err("unknown key");
        let msg = err.to_string();
        assert_eq!(err.key(), Some(key), "{msg}");
        assert!(msg.contains("; remove it (allowed here: "), "{msg}");
    }
}

#[test]
fn missing_required_keys() {
    let err = fails(
        "[proxy]\nhttp = \"127.0.0.1:3128\"\n",
        "vm",
        (1, 1),
        "add a [vm] table with name, mac and address",
    );
    assert_eq!(err.kind(), Some(ErrorKind::MissingKey), "{err:?}");
    fails("", "vm", (1, 1), "required key is missing");
    fails(
        "\n[vm]\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n",
        "vm.name",
        (2, 1),
        "required key is missing; add name = \"sandbox-17\"",
    );
    fails(
        "[vm]\nname = \"t\"\naddress = \"10.0.0.2/30\"\n",
        "vm.mac",
        (1, 1),
        "add mac = \"52:54:00:12:34:56\"",
    );
    fails(
        "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\n",
        "vm.address",
        (1, 1),
        "add address = \"10.0.0.2/30\"",
    );
    fails(
        &format!("{VM}{PROXY}[[outbound]]\nports = [1]\n"),
        "outbound[0].protocol",
        (8, 1),
        "add protocol = \"tcp\"",
    );
    fails(
        &format!("{VM}{PROXY}[[outbound]]\nprotocol = \"tcp\"\n"),
        "outbound[0].ports",
        (8, 1),
        "add ports = [443]",
    );
    fails(
        &format!("{VM}[[forward]]\nguest_port = 1\n"),
        "forward[0].listen",
        (5, 1),
        "add listen = \"127.0.0.1:8080\"",
    );
}

#[test]
fn values_of_the_wrong_type() {
    fails(
        &format!("{VM}mtu = \"big\"\n"),
        "vm.mtu",
        (5, 7),
        "invalid type: string \"big\", expected an integer",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = [true]\n"),
        "outbound[0].ports",
        (10, 10),
        "expected a port such as 443 or a range such as \"8000-8100\"",
    );
    fails(
        &rule("protocol = \"tcp\"\nports = 443\n"),
        "outbound[0].ports",
        (10, 9),
        "expected an array",
    );
    fails(
        &vm_with("\"t\"", "7"),
        "vm.name",
        (2, 8),
        "expected a string",
    );
}
