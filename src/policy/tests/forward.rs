//! `[[forward]]`.

use super::*;

#[test]
fn forward_rules() {
    let fwd = |body: &str| format!("{VM}[[forward]]\n{body}\n");
    fails(
        &fwd("listen = \"127.0.0.1\"\nguest_port = 80"),
        "forward[0].listen",
        (6, 10),
        "\"127.0.0.1\" is not an IP address and port; write it like 127.0.0.1:8080",
    );
    fails(
        &fwd("listen = \"127.0.0.1:0\"\nguest_port = 80"),
        "forward[0].listen",
        (6, 10),
        "port 0 would listen on a random port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 0"),
        "forward[0].guest_port",
        (7, 14),
        "0 is not a port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 70000"),
        "forward[0].guest_port",
        (7, 14),
        "70000 is not a port",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 80\nfrom = [\"everyone\"]"),
        "forward[0].from",
        (8, 9),
        "\"everyone\" is not a valid CIDR",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 80\nfrom = [\"192.168.1.7/24\"]"),
        "forward[0].from",
        (8, 9),
        "has host bits set; write 192.168.1.0/24",
    );
    fails(
        &fwd("listen = \"127.0.0.1:8080\"\nguest_port = 80\nfrom = []"),
        "forward[0].from",
        (8, 8),
        "is empty, so no peer may connect",
    );
    let p = parse(&fwd(
        "listen = \"0.0.0.0:8080\"\nguest_port = 80\nfrom = [\"192.0.2.0/24\", \"2001:db8::/32\"]",
    ))
    .unwrap();
    assert_eq!(p.forward[0].from.len(), 2);
}

#[test]
fn forward_listen_addresses_must_not_overlap() {
    let two = |a: &str, b: &str| {
        format!("{VM}[[forward]]\nlisten = \"{a}\"\nguest_port = 80\n[[forward]]\nlisten = \"{b}\"\nguest_port = 81\n")
    };
    fails(
        &two("127.0.0.1:8080", "127.0.0.1:8080"),
        "forward[1].listen",
        (9, 10),
        "127.0.0.1:8080 overlaps forward[0].listen (127.0.0.1:8080); give each forward its own port",
    );
    fails(
        &two("127.0.0.1:8080", "0.0.0.0:8080"),
        "forward[1].listen",
        (9, 10),
        "0.0.0.0:8080 overlaps forward[0].listen (127.0.0.1:8080)",
    );
    fails(
        &two("[::]:8080", "127.0.0.1:8080"),
        "forward[1].listen",
        (9, 10),
        "overlaps forward[0].listen ([::]:8080)",
    );
    assert!(parse(&two("127.0.0.1:8080", "127.0.0.2:8080")).is_ok());
    assert!(parse(&two("0.0.0.0:8080", "0.0.0.0:8081")).is_ok());
}
