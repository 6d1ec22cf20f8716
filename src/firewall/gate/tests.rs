//! The gate, table-driven: every way of spelling a destination × the reserved ranges × the
//! shapes a rule can take; and a property: nothing admitted is a reserved address unless a
//! CIDR inside its range names it.

use std::net::Ipv4Addr;
use std::path::Path;

use proptest::prelude::*;

use super::*;

fn policy(rules: &str) -> Policy {
    let text = format!(
        "[vm]\nname = \"g\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n[proxy]\nhttp = \"127.0.0.1:3128\"\nsocks5 = \"127.0.0.1:1080\"\n{rules}"
    );
    Policy::parse(&text, Path::new("g.toml")).unwrap()
}

fn rule(to: &str) -> String {
    format!("[[outbound]]\nprotocol = \"tcp\"\nports = [80]\n{to}\n")
}

fn text(t: &str) -> Requested {
    Requested::Text {
        text: t.into(),
        source: NameSource::HttpHost,
    }
}

fn ip(a: [u8; 4]) -> Requested {
    Requested::Address {
        ip: Ipv4Addr::from(a),
        dns_name: None,
    }
}

const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Host text -> what it is, for resolvers and URL parsers.
#[test]
fn normalisation_reads_every_address_form() {
    let addr = |s: &str| normalize(s).map_err(|e| e.as_str());
    let cases: &[(&str, Result<Host, &str>)] = &[
        ("127.0.0.1", Ok(Host::Ip(LOOPBACK))),
        ("127.0.0.1.", Ok(Host::Ip(LOOPBACK))),
        ("127.1", Ok(Host::Ip(LOOPBACK))),
        ("127.0.1", Ok(Host::Ip(LOOPBACK))),
        ("0x7f000001", Ok(Host::Ip(LOOPBACK))),
        ("0X7F000001", Ok(Host::Ip(LOOPBACK))),
        ("0x7f.1", Ok(Host::Ip(LOOPBACK))),
        ("2130706433", Ok(Host::Ip(LOOPBACK))),
        ("0177.0.0.1", Ok(Host::Ip(LOOPBACK))),
        ("017700000001", Ok(Host::Ip(LOOPBACK))),
        ("0", Ok(Host::Ip(Ipv4Addr::UNSPECIFIED))),
        ("0x", Ok(Host::Ip(Ipv4Addr::UNSPECIFIED))),
        ("localhost", Ok(Host::Ip(LOOPBACK))),
        ("LocalHost.", Ok(Host::Ip(LOOPBACK))),
        ("db.localhost", Ok(Host::Ip(LOOPBACK))),
        ("169.254.169.254", Ok(Host::Ip(METADATA))),
        ("0xa9fea9fe", Ok(Host::Ip(METADATA))),
        ("2852039166", Ok(Host::Ip(METADATA))),
        ("169.254.43518", Ok(Host::Ip(METADATA))),
        ("10.1", Ok(Host::Ip(Ipv4Addr::new(10, 0, 0, 1)))),
        ("203.0.113.5", Ok(Host::Ip(Ipv4Addr::new(203, 0, 113, 5)))),
        ("Example.COM.", Ok(Host::Name("example.com".into()))),
        (
            "api-1.example.com",
            Ok(Host::Name("api-1.example.com".into())),
        ),
        (
            "localhost.example.com",
            Ok(Host::Name("localhost.example.com".into())),
        ),
        ("0xg.example", Ok(Host::Name("0xg.example".into()))),
        ("1.2.3.4.5", Err("bad_destination")),
        ("foo.123", Err("bad_destination")),
        ("256.1.1.1", Err("bad_destination")),
        ("1.2.3.256", Err("bad_destination")),
        ("4294967296", Err("bad_destination")),
        // Hex too long for any address still ends in a number (WHATWG): an invalid
        // address, not a name (found by the `gate` fuzz target).
        ("0xddddddddddeddddd00", Err("bad_destination")),
        ("0x100000000000000007f000001", Err("bad_destination")),
        ("a.0x100000000000000007f000001", Err("bad_destination")),
        ("08", Err("bad_destination")),
        ("[::1]", Err("bad_destination")),
        ("::1", Err("bad_destination")),
        ("[::ffff:127.0.0.1]", Err("bad_destination")),
        ("example.com:80", Err("bad_destination")),
        ("a..b", Err("bad_destination")),
        ("", Err("bad_destination")),
        (".", Err("bad_destination")),
        ("evil.com/x", Err("bad_destination")),
        ("ex ample.com", Err("bad_destination")),
        ("exam%70le.com", Err("bad_destination")),
    ];
    for (input, want) in cases {
        assert_eq!(addr(input), *want, "{input:?}");
    }
}

/// Every spelling of loopback, metadata and private space, from every source, against every
/// rule shape.
#[test]
fn every_form_of_a_reserved_destination_faces_the_reserved_rule() {
    let loopback_forms = [
        "127.0.0.1",
        "127.1",
        "0x7f000001",
        "2130706433",
        "0177.0.0.1",
        "localhost",
        "db.localhost",
        "127.0.0.1.",
    ];
    let metadata_forms = ["169.254.169.254", "0xa9fea9fe", "2852039166"];
    let private_forms = [
        "10.0.0.1",
        "10.1",
        "192.168.1.1",
        "172.16.0.1",
        "100.64.0.1",
    ];
    let sources = [
        NameSource::Sni,
        NameSource::HttpHost,
        NameSource::ExplicitProxy,
    ];
    // (rule, loopback admitted?, metadata admitted?, private admitted?)
    let shapes = [
        (rule(""), false, false, false),
        (rule("to = [\"example.com\"]"), false, false, false),
        (rule("to = [\"*.example.com\"]"), false, false, false),
        (rule("to = [\"203.0.113.0/24\"]"), false, false, false),
        (rule("to = [\"0.0.0.0/0\"]"), false, false, false),
        (
            rule("to = [\"0.0.0.0/1\", \"128.0.0.0/1\"]"),
            false,
            false,
            false,
        ),
        (rule("to = [\"127.0.0.0/8\"]"), true, false, false),
        (rule("to = [\"169.254.169.254/32\"]"), false, true, false),
        (
            rule("to = [\"10.0.0.0/8\", \"192.168.0.0/16\", \"172.16.0.0/12\", \"100.64.0.0/10\"]"),
            false,
            false,
            true,
        ),
    ];
    for (shape, loop_ok, meta_ok, private_ok) in &shapes {
        let p = policy(shape);
        for (forms, ok) in [
            (&loopback_forms[..], loop_ok),
            (&metadata_forms[..], meta_ok),
            (&private_forms[..], private_ok),
        ] {
            for form in forms {
                for source in sources {
                    let requested = Requested::Text {
                        text: form.to_string(),
                        source,
                    };
                    let got = admit(&p, Protocol::Tcp, requested, 80);
                    if *ok {
                        let a = got.unwrap_or_else(|e| panic!("{form} under {shape}: {e:?}"));
                        assert!(matches!(a.target(), Target::Ip(_)), "{form}: by address");
                    } else {
                        assert_eq!(
                            got.map(|a| a.target().clone()),
                            Err(DropReason::ReservedDestination),
                            "{form} from {source:?} under {shape}"
                        );
                    }
                }
            }
        }
        // The gateway's own address is private space too.
        if !private_ok {
            assert_eq!(
                admit(&p, Protocol::Tcp, text("10.0.0.1"), 80).map(|_| ()),
                Err(DropReason::ReservedDestination)
            );
        }
    }
}

#[test]
fn names_follow_the_rules_and_bad_text_is_refused() {
    let any = policy(&rule(""));
    let a = admit(&any, Protocol::Tcp, text("WWW.Example.com."), 80).unwrap();
    assert_eq!(a.target(), &Target::Name("www.example.com".into()));
    assert_eq!((a.port(), a.via(), a.rule()), (80, Via::Http, 0));
    assert_eq!(a.proxy(), "127.0.0.1:3128".parse().unwrap());
    assert_eq!(
        admit(&any, Protocol::Tcp, text("example.com"), 443).map(|_| ()),
        Err(DropReason::NotAllowed),
        "port"
    );
    for bad in ["[::1]", "::1", "1.2.3.4.5", "evil.com/x", "a b"] {
        assert_eq!(
            admit(&any, Protocol::Tcp, text(bad), 80).map(|_| ()),
            Err(DropReason::BadDestination),
            "{bad}"
        );
    }
    // "Any name" is not "any IP literal": a public address as text needs a CIDR too.
    assert_eq!(
        admit(&any, Protocol::Tcp, text("203.0.113.5"), 80).map(|_| ()),
        Err(DropReason::NotAllowed)
    );
    let wild = policy(&rule("to = [\"*.example.com\"]"));
    assert!(admit(&wild, Protocol::Tcp, text("a.example.com"), 80).is_ok());
    for no in ["example.com", "evil.test", "a.example.com.evil.test"] {
        assert_eq!(
            admit(&wild, Protocol::Tcp, text(no), 80).map(|_| ()),
            Err(DropReason::NotAllowed),
            "{no}"
        );
    }
    let cidr = policy(&rule("to = [\"203.0.113.0/24\"]"));
    assert_eq!(
        admit(&cidr, Protocol::Tcp, text("203.0.113.9"), 80)
            .unwrap()
            .target(),
        &Target::Ip(Ipv4Addr::new(203, 0, 113, 9))
    );
    assert_eq!(
        admit(&cidr, Protocol::Tcp, text("0xcb007109"), 80)
            .unwrap()
            .target(),
        &Target::Ip(Ipv4Addr::new(203, 0, 113, 9)),
        "hex form of an allowed address"
    );
}

#[test]
fn addresses_from_moats_dns_route_by_name_and_unknown_synthetic_ones_are_refused() {
    let p = policy(&rule("to = [\"*.example.com\"]"));
    let pooled = |name: &str| Requested::Address {
        ip: Ipv4Addr::new(198, 18, 0, 7),
        dns_name: Some(name.into()),
    };
    let a = admit(&p, Protocol::Tcp, pooled("www.example.com"), 80).unwrap();
    assert_eq!(a.target(), &Target::Name("www.example.com".into()));
    assert_eq!(
        admit(&p, Protocol::Tcp, pooled("evil.test"), 80).map(|_| ()),
        Err(DropReason::NotAllowed)
    );
    assert_eq!(
        admit(&p, Protocol::Tcp, ip([198, 18, 200, 1]), 80).map(|_| ()),
        Err(DropReason::UnknownSyntheticAddress)
    );
    // An allowlisted name that reads as an address is that address.
    let any = policy(&rule(""));
    assert_eq!(
        admit(&any, Protocol::Tcp, pooled("localhost"), 80).map(|_| ()),
        Err(DropReason::ReservedDestination)
    );
}

#[test]
fn ip_literals_need_a_cidr_and_reserved_ranges_need_their_own() {
    let p = policy(&rule(
        "to = [\"203.0.113.0/24\", \"0.0.0.0/0\", \"127.0.0.1/32\"]",
    ));
    assert!(admit(&p, Protocol::Tcp, ip([203, 0, 113, 5]), 80).is_ok());
    assert!(
        admit(&p, Protocol::Tcp, ip([198, 51, 100, 5]), 80).is_ok(),
        "0.0.0.0/0 covers public space"
    );
    for reserved in [
        [169, 254, 169, 254],
        [10, 0, 0, 3],
        [192, 168, 1, 1],
        [172, 16, 0, 1],
        [100, 64, 0, 1],
        [0, 1, 2, 3],
        [127, 0, 0, 2],
        [224, 0, 0, 1],
        [240, 0, 0, 1],
        [255, 255, 255, 255],
    ] {
        assert_eq!(
            admit(&p, Protocol::Tcp, ip(reserved), 80).map(|_| ()),
            Err(DropReason::ReservedDestination),
            "{reserved:?}: a catch-all CIDR does not name a reserved range"
        );
    }
    assert!(
        admit(&p, Protocol::Tcp, ip([127, 0, 0, 1]), 80).is_ok(),
        "named by 127.0.0.1/32"
    );
    let no_cidr = policy(&rule(""));
    assert_eq!(
        admit(&no_cidr, Protocol::Tcp, ip([203, 0, 113, 5]), 80).map(|_| ()),
        Err(DropReason::NotAllowed)
    );
}

#[test]
fn protocol_and_proxy_kind_come_from_the_rule() {
    let p = policy(
        "[[outbound]]\nprotocol = \"udp\"\nports = [53]\nto = [\"203.0.113.0/24\"]\n[[outbound]]\nprotocol = \"tcp\"\nports = [22]\nto = [\"git.example.com\"]\nvia = \"socks5\"\n",
    );
    let udp = admit(&p, Protocol::Udp, ip([203, 0, 113, 1]), 53).unwrap();
    assert_eq!(
        (udp.via(), udp.proxy().port(), udp.rule()),
        (Via::Socks5, 1080, 0)
    );
    assert_eq!(
        admit(&p, Protocol::Tcp, ip([203, 0, 113, 1]), 53).map(|_| ()),
        Err(DropReason::NotAllowed),
        "a UDP rule does not admit TCP"
    );
    let git = admit(&p, Protocol::Tcp, text("git.example.com"), 22).unwrap();
    assert_eq!((git.via(), git.rule()), (Via::Socks5, 1));
}

#[test]
fn readmission_follows_a_reload() {
    let before = policy(&rule("to = [\"*.example.com\"]"));
    let a = admit(&before, Protocol::Tcp, text("a.example.com"), 80).unwrap();
    assert_eq!(readmit(&before, &a), Ok(a.clone()));
    let after = policy(&rule("to = [\"other.test\"]"));
    assert_eq!(readmit(&after, &a).map(|_| ()), Err(DropReason::NotAllowed));
}

#[test]
fn naming_later_only_for_public_literals_under_name_rules() {
    let any = policy(&rule(""));
    assert!(may_name_later(&any, Ipv4Addr::new(203, 0, 113, 5), 80));
    assert!(
        !may_name_later(&any, Ipv4Addr::new(203, 0, 113, 5), 443),
        "port"
    );
    assert!(!may_name_later(&any, LOOPBACK, 80), "reserved");
    assert!(
        !may_name_later(&any, Ipv4Addr::new(198, 18, 0, 1), 80),
        "pool"
    );
    let cidr_only = policy(&rule("to = [\"203.0.113.0/24\"]"));
    assert!(!may_name_later(
        &cidr_only,
        Ipv4Addr::new(198, 51, 100, 1),
        80
    ));
}

#[test]
fn upstream_answers_into_reserved_ranges_need_a_cidr() {
    let p = policy(&rule(""));
    assert_eq!(admit_resolved(&p, Ipv4Addr::new(203, 0, 113, 1)), Ok(()));
    for a in [
        LOOPBACK,
        METADATA,
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::UNSPECIFIED,
    ] {
        assert_eq!(
            admit_resolved(&p, a),
            Err(DropReason::DnsAnswerReserved),
            "{a}"
        );
    }
    let named = policy(&rule("to = [\"10.1.0.0/16\"]"));
    assert_eq!(admit_resolved(&named, Ipv4Addr::new(10, 1, 2, 3)), Ok(()));
    assert_eq!(
        admit_resolved(&named, Ipv4Addr::new(10, 2, 0, 1)),
        Err(DropReason::DnsAnswerReserved)
    );
}

/// Render an address the many ways a client can write it.
fn spellings(a: Ipv4Addr) -> Vec<String> {
    let n = u32::from(a);
    let o = a.octets();
    vec![
        a.to_string(),
        n.to_string(),
        format!("{n:#x}"),
        format!("0{n:o}"),
        format!("{}.{}", o[0], n & 0xff_ffff),
        format!("{}.{}.{}", o[0], o[1], n & 0xffff),
        format!("{:#x}.{:#x}.{:#x}.{:#x}", o[0], o[1], o[2], o[3]),
        format!("0{:o}.0{:o}.0{:o}.0{:o}", o[0], o[1], o[2], o[3]),
        format!("{a}."),
    ]
}

fn rule_shape() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("to = [\"*.example.com\"]".to_string()),
        Just("to = [\"0.0.0.0/0\"]".to_string()),
        Just("to = [\"127.0.0.0/8\"]".to_string()),
        Just("to = [\"10.0.0.0/8\", \"example.com\"]".to_string()),
        Just("to = [\"169.254.169.254/32\", \"203.0.113.0/24\"]".to_string()),
    ]
    .prop_map(|to| rule(&to))
}

fn host_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u32>().prop_flat_map(|n| {
            let forms = spellings(Ipv4Addr::from(n));
            (0..forms.len()).prop_map(move |i| forms[i].clone())
        }),
        "[a-z0-9.:\\[\\]x-]{1,24}",
        "(localhost|[a-z]{1,5}\\.localhost|127\\.[0-9]{1,3}|0x7f[0-9a-f]{0,6})\\.?",
    ]
}

proptest! {
    /// Every spelling of an address is that address.
    #[test]
    fn all_spellings_agree(n in any::<u32>()) {
        let a = Ipv4Addr::from(n);
        for s in spellings(a) {
            prop_assert_eq!(normalize(&s), Ok(Host::Ip(a)), "{}", s);
        }
    }

    /// Nothing the gate admits is a reserved address unless a CIDR inside its range names it,
    /// and nothing it admits by name reads as an address.
    #[test]
    fn admitted_is_never_reserved_unless_named(shape in rule_shape(), host in host_text(), port in prop_oneof![Just(80u16), any::<u16>()]) {
        let p = policy(&shape);
        let Ok(admitted) = admit(&p, Protocol::Tcp, text(&host), port) else {
            return Ok(());
        };
        match admitted.target() {
            Target::Ip(ip) => {
                if let Some(range) = reserved_range(*ip) {
                    let named = p.outbound[admitted.rule()].to.iter().flatten().any(|d| {
                        matches!(d, Destination::Cidr(c) if c.contains(ip) && range.contains(c))
                    });
                    prop_assert!(named, "{} admitted as {} under {}", host, ip, shape);
                }
            }
            Target::Name(name) => {
                prop_assert_eq!(normalize(name), Ok(Host::Name(name.clone())));
                prop_assert!(name != "localhost" && !name.ends_with(".localhost"));
            }
        }
    }
}
