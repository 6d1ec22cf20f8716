//! `[[forward]]`: a host peer connecting to `listen` reaches the guest's port, seen from the
//! gateway; peers outside `from` are closed at once and counted.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use moat::telemetry::FlowEvent;
use moat_sim::guest::tcp_drain;
use smoltcp::socket::tcp::State;
use smoltcp::wire::IpAddress;
use support::*;

const T: Duration = Duration::from_secs(10);

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn policy(listen: SocketAddr, from: &str) -> String {
    format!(
        "[vm]\nname = \"fwd\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
         [[forward]]\nlisten = \"{listen}\"\nguest_port = 3000\n{from}\n"
    )
}

#[test]
fn a_host_peer_reaches_the_guest_port_from_the_gateway() {
    let listen = free_addr();
    let served = Served::start(&policy(listen, ""), true);
    let mut net = guest_net(&served);
    let h = net.tcp_listen(3000);
    net.poll(Duration::from_millis(50)).unwrap();
    let client = std::thread::spawn(move || {
        let mut c = TcpStream::connect(listen).expect("moat listens for the forward");
        c.set_read_timeout(Some(T)).unwrap();
        c.write_all(b"ping from the host").unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).unwrap();
        reply
    });
    assert!(net
        .run_until(T, |n| n.tcp(h).state() == State::Established)
        .unwrap());
    let remote = net.tcp(h).remote_endpoint().unwrap();
    assert_eq!(
        remote.addr,
        IpAddress::Ipv4(GW),
        "the guest sees the gateway, not the host"
    );
    let mut got = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(h);
        tcp_drain(s, |d| {
            got.extend_from_slice(d);
        });
        got.len() >= 18
    })
    .unwrap();
    assert_eq!(got, b"ping from the host");
    net.tcp(h).send_slice(b"pong from the guest").unwrap();
    net.tcp(h).close();
    let mut done = false;
    net.run_until(T, |_| {
        done = client.is_finished();
        done
    })
    .unwrap();
    assert!(done);
    assert_eq!(client.join().unwrap(), b"pong from the guest");
    assert!(net
        .run_until(T, |_| served.counters.flows(FlowEvent::Closed) == 1)
        .unwrap());
}

#[test]
fn peers_outside_from_are_closed_and_counted() {
    let listen = free_addr();
    let served = Served::start(&policy(listen, "from = [\"192.0.2.0/24\"]"), true);
    let mut net = guest_net(&served);
    let h = net.tcp_listen(3000);
    net.poll(Duration::from_millis(50)).unwrap();
    let mut c = TcpStream::connect(listen).expect("accepted, then closed");
    c.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 16];
    // Closed (FIN) or reset: either ends the connection; a read timeout means it was left open.
    match c.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "closed at once, without data"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "closed at once, not left open: {e}"
        ),
    }
    eventually("refusal counted", || {
        served.counters.flows(FlowEvent::ForwardRefused) == 1
    });
    net.poll(Duration::from_millis(200)).unwrap();
    assert_eq!(
        net.tcp(h).state(),
        State::Listen,
        "nothing reached the guest"
    );
}
