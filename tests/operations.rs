//! Running moat as an operator: Prometheus metrics, `moat stats`, JSON logs, and live policy
//! reload (SIGHUP or `moat reload`): good files swap in, bad ones change nothing, a
//! tightened policy resets the flows it no longer allows.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use moat_sim::craft;
use moat_sim::guest::{tcp_drain, GuestOptions, SimGuest};
use smoltcp::socket::tcp::State;
use support::peers::free_port;
use support::proxy::{origin, ProxyMode, TestProxy};
use support::*;

const T: Duration = Duration::from_secs(10);

fn start(policy: &str, extra: &[&str], stderr: Stdio) -> MoatProcess {
    MoatProcess::start(policy, extra, stderr)
}

fn moat(args: &[&str], control: &Path) -> (i32, String, String) {
    let out = Command::new(moat_bin())
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn scrape(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body
}

fn policy(extra: &str) -> String {
    format!("[vm]\nname = \"ops\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n{extra}")
}

#[test]
fn metrics_and_stats_show_what_moat_did() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let m = start(
        &policy(""),
        &["--metrics", &addr.to_string()],
        Stdio::null(),
    );
    let mut guest = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    guest
        .send_frame(&craft::icmp_echo(GUEST_MAC, GW_MAC, GUEST, GW, 1, 1, b"x"))
        .unwrap();
    recv_matching(&mut guest, "echo reply", |_| true);
    guest
        .send_frame(&craft::arp_request(
            GUEST_MAC,
            GUEST,
            std::net::Ipv4Addr::new(10, 0, 0, 9),
        ))
        .unwrap();
    let lines = [
        "moat_answers_total{vm=\"ops\",service=\"icmp_echo\"} 1",
        "moat_drops_total{vm=\"ops\",reason=\"arp_not_for_gateway\"} 1",
        "moat_frames_total{vm=\"ops\",direction=\"tx\"} 2",
        "moat_policy_generation{vm=\"ops\"} 1",
    ];
    // Wait until every line reads exactly so: a drop is counted as its frame is judged,
    // the batch's frame count when the batch ends, so a scrape in between sees the drop
    // and one frame fewer (seen once in CI).
    // Past the deadline the asserts below say which line is missing.
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut text = scrape(addr);
    while !lines.iter().all(|l| text.contains(l)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
        text = scrape(addr);
    }
    assert!(
        text.starts_with("HTTP/1.") && text.contains(" 200 "),
        "{text}"
    );
    for line in lines {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }

    let control = m.path("control.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&control).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "owner-only control socket");
    let (code, table, _) = moat(&["stats"], &control);
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .any(|l| l.contains("icmp_echo") && l.trim_end().ends_with('1')),
        "{table}"
    );
    let (code, json, _) = moat(&["stats", "--json"], &control);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).expect("stats --json is JSON");
    assert_eq!(v["vm"], "ops");
    assert_eq!(v["counters"]["answered.icmp_echo"], 1);
    assert_eq!(v["counters"]["drop.arp_not_for_gateway"], 1);
}

#[test]
fn metrics_refuse_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vm.toml"), policy("")).unwrap();
    let out = Command::new(moat_bin())
        .args(["serve", "--metrics", "0.0.0.0:9100", "--socket"])
        .arg(dir.path().join("s"))
        .arg("--policy")
        .arg(dir.path().join("vm.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn json_logs_name_the_drop_reason_and_the_frame() {
    let mut m = start(&policy(""), &["--log-format", "json"], Stdio::piped());
    // moat's stderr, line by line, as it comes.
    let log = LineLog::collect(m.child.stderr.take().unwrap());
    let mut guest = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    let spoofed = moat::frame::MacAddr([0x52, 0x54, 0, 9, 9, 9]);
    guest
        .send_frame(&craft::icmp_echo(spoofed, GW_MAC, GUEST, GW, 1, 1, b""))
        .unwrap();
    let drop_line = wait_for("the JSON drop line", DEADLINE, || {
        log.so_far()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["reason"] == "spoofed_src_mac")
    });
    drop(guest);
    let _ = m.child.kill();
    let _ = m.child.wait();
    let stderr = log.finish();
    // Every line moat wrote is JSON.
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert_eq!(drop_line["level"], "INFO");
    assert_eq!(
        drop_line["span"]["vm"], "ops",
        "the VM's name on every line: {drop_line}"
    );
    assert!(
        drop_line["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("52:54:00:09:09:09"),
        "{drop_line}"
    );
}

#[test]
fn reload_swaps_good_policies_refuses_bad_ones_and_resets_what_is_no_longer_allowed() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let allow = |names: &str| {
        policy(&format!(
            "[proxy]\nhttp = \"{}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [{names}]\n[dns]\nallow = [{names}]\n",
            proxy.addr
        ))
    };
    let m = start(&allow("\"a.example\", \"b.example\""), &[], Stdio::null());
    let control = m.path("control.sock");
    let sim = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    let mut net = vm_net(sim);
    let a = net.resolve_a("a.example", T).unwrap();
    let b = net.resolve_a("b.example", T).unwrap();
    let ha = net.tcp_connect(a, 80);
    let hb = net.tcp_connect(b, 80);
    assert!(net
        .run_until(T, |n| n.tcp(ha).state() == State::Established
            && n.tcp(hb).state() == State::Established)
        .unwrap());

    // A bad file changes nothing and says why.
    std::fs::write(
        m.path("vm.toml"),
        policy("").replace("52:54:00:12:34:56", "not-a-mac"),
    )
    .unwrap();
    let (code, _, err) = moat(&["reload"], &control);
    assert_eq!(code, 1);
    assert!(err.contains("vm.toml:3") && err.contains("vm.mac"), "{err}");
    // Changing the VM's identity is refused too.
    std::fs::write(
        m.path("vm.toml"),
        allow("\"a.example\"").replace("10.0.0.2/24", "10.0.0.5/24"),
    )
    .unwrap();
    let (code, _, err) = moat(&["reload"], &control);
    assert_eq!(code, 1);
    assert!(err.contains("vm.address"), "{err}");

    // Tighten: b.example is no longer allowed; its flow is reset, a.example's continues.
    std::fs::write(m.path("vm.toml"), allow("\"a.example\"")).unwrap();
    let (code, out, err) = moat(&["reload"], &control);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("generation 2") && out.contains("flows_reset 1"),
        "{out}"
    );
    assert!(
        net.run_until(T, |n| n.tcp(hb).state() == State::Closed)
            .unwrap(),
        "b's flow reset"
    );
    assert_eq!(
        net.tcp(ha).state(),
        State::Established,
        "a's flow untouched"
    );
    net.tcp(ha).send_slice(b"Estill here").unwrap();
    let mut got = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(ha);
        tcp_drain(s, |d| {
            got.extend_from_slice(d);
        });
        got.len() >= 10
    })
    .unwrap();
    assert_eq!(got, b"still here");
    let b_now = net.resolve("b.example", T).unwrap();
    assert!(
        b_now.is_nxdomain(),
        "new DNS answers follow the new policy: NXDOMAIN, not {b_now:?}"
    );

    // SIGHUP reloads too.
    std::fs::write(m.path("vm.toml"), allow("\"a.example\", \"c.example\"")).unwrap();
    // SAFETY: kill(2) on the pid of a child this test started.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGHUP) };
    // Until the reload lands, c.example is NXDOMAIN (an answer every time, never silence).
    let mut resolved = None;
    net.run_until(T, |n| {
        let reply = n.resolve("c.example", T).unwrap();
        assert!(
            reply.addr().is_some() || reply.is_nxdomain(),
            "c.example: an address after the reload, NXDOMAIN before it, not {reply:?}"
        );
        resolved = reply.addr();
        resolved.is_some()
    })
    .unwrap();
    assert!(resolved.is_some(), "c.example allowed after SIGHUP");
    let (_, json, _) = moat(&["stats", "--json"], &control);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["policy_generation"], 3);
}

/// `moat forward --control PATH ARGS...` (the form the issue documents).
fn forward(args: &[&str], control: &Path) -> (i32, String, String) {
    let out = Command::new(moat_bin())
        .arg("forward")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn runtime_forwards_can_be_added_listed_and_removed() {
    let m = start(&policy(""), &[], Stdio::null());
    let control = m.path("control.sock");
    let sim = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    let mut net = vm_net(sim);
    let h = net.tcp_listen(3000);
    net.poll(Duration::from_millis(20)).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, out, err) = forward(&["add", &listen, "3000"], &control);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&listen), "{out}");
    let (_, list, _) = forward(&["list"], &control);
    assert!(
        list.lines()
            .any(|l| l.contains(&listen) && l.contains("runtime")),
        "{list}"
    );
    let (code, _, err) = forward(&["add", &listen, "3001"], &control);
    assert_eq!(code, 1, "a second forward on the same address is refused");
    assert!(err.contains("overlaps"), "{err}");

    // The kernel completes the handshake on moat's listener; keep the connection open
    // until the guest side is established.
    let mut c = TcpStream::connect(&listen).expect("moat listens for the runtime forward");
    c.write_all(b"hi").unwrap();
    assert!(net
        .run_until(T, |n| n.tcp(h).state() == State::Established)
        .unwrap());
    drop(c);

    let (code, _, err) = forward(&["remove", &listen], &control);
    assert_eq!(code, 0, "{err}");
    wait_for("the listener closed after remove", DEADLINE, || {
        TcpStream::connect(&listen).is_err().then_some(())
    });
}

/// SIGHUP with a file that does not parse: nothing changes (generation, DNS answers, open
/// flows), the refusal is counted in `moat_policy_reloads_total{result="refused"}`, and a
/// good file afterwards is taken.
#[test]
fn sighup_with_a_bad_file_changes_nothing_and_counts_the_refusal() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let allow = |names: &str| {
        policy(&format!(
            "[proxy]\nhttp = \"{}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [{names}]\n[dns]\nallow = [{names}]\n",
            proxy.addr
        ))
    };
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let m = start(
        &allow("\"a.example\""),
        &["--metrics", &metrics.to_string()],
        Stdio::null(),
    );
    let sim = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    let mut net = vm_net(sim);
    let a = net.resolve_a("a.example", T).unwrap();
    let h = established(&mut net, a, 80);
    assert!(net.tcp_send_all(h, b"E", T).unwrap());
    let reloads = |text: &str, result: &str| -> Option<u64> {
        text.lines()
            .find(|l| {
                l.starts_with("moat_policy_reloads_total{")
                    && l.contains(&format!("result=\"{result}\""))
            })?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };

    std::fs::write(
        m.path("vm.toml"),
        allow("\"a.example\", \"b.example\"").replace("[dns]", "[dns\n"),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGHUP) };
    let text = wait_for("the refused reload counted", DEADLINE, || {
        let text = scrape(metrics);
        (reloads(&text, "refused") == Some(1)).then_some(text)
    });
    assert_eq!(reloads(&text, "ok"), Some(0), "{text}");
    assert!(
        text.contains("moat_policy_generation{vm=\"ops\"} 1"),
        "{text}"
    );
    let b = net.resolve("b.example", T).unwrap();
    assert!(b.is_nxdomain(), "the bad file's names are not taken: {b:?}");
    assert_eq!(net.resolve_a("a.example", T).unwrap(), a);
    assert!(net.tcp_send_all(h, b"still", T).unwrap());
    let mut echo = Vec::new();
    net.tcp_recv(h, T, |d| {
        echo.extend_from_slice(d);
        echo.len() >= 5
    })
    .unwrap();
    assert_eq!(echo, b"still", "the open flow carries on");

    // A good file afterwards is taken.
    std::fs::write(m.path("vm.toml"), allow("\"a.example\", \"b.example\"")).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGHUP) };
    let text = wait_for("the good reload counted", DEADLINE, || {
        let text = scrape(metrics);
        (reloads(&text, "ok") == Some(1)).then_some(text)
    });
    assert_eq!(reloads(&text, "refused"), Some(1), "{text}");
    assert!(net.resolve("b.example", T).unwrap().addr().is_some());
}

/// `--busy-poll-us` carries traffic like the default: DNS, a flow through the proxy, 1 MiB
/// echoed byte for byte.
#[test]
fn busy_polling_carries_traffic() {
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let text = policy(&format!(
        "[proxy]\nhttp = \"{}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"a.example\"]\n[dns]\nallow = [\"a.example\"]\n",
        proxy.addr
    ));
    let m = start(&text, &["--busy-poll-us", "50"], Stdio::null());
    let sim = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    let mut net = vm_net(sim);
    let a = net.resolve_a("a.example", T).unwrap();
    assert!(net.resolve("b.example", T).unwrap().is_nxdomain());
    let h = established(&mut net, a, 80);
    assert!(net.tcp_send_all(h, b"E", T).unwrap());
    let data = support::proxy::pattern(0, 1 << 20);
    let (mut sent, mut got) = (0usize, Vec::with_capacity(data.len()));
    assert!(net
        .run_until(Duration::from_secs(60), |n| {
            let s = n.tcp(h);
            if let Ok(k) = s.send_slice(&data[sent..]) {
                sent += k;
            }
            tcp_drain(s, |d| {
                got.extend_from_slice(d);
            });
            got.len() == data.len()
        })
        .unwrap());
    assert!(got == data, "byte for byte");
    assert_eq!(proxy.requests(), ["a.example:80"]);
}

/// The drop log is rate-limited per reason: a guest sending a thousand bad frames gets a
/// handful of log lines whose counts say how many there were, not a thousand lines.
#[test]
fn drop_logs_are_rate_limited_and_say_how_many() {
    let mut m = start(&policy(""), &["--log-format", "json"], Stdio::piped());
    let log = LineLog::collect(m.child.stderr.take().unwrap());
    let mut guest = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    let spoofed = moat::frame::MacAddr([0x52, 0x54, 0, 9, 9, 9]);
    let frame = craft::icmp_echo(spoofed, GW_MAC, GUEST, GW, 1, 1, b"");
    const SENT: u64 = 1000;
    for _ in 0..SENT {
        guest.send_frame(&frame).unwrap();
    }
    wait_counter(&m.path("control.sock"), "drop.spoofed_src_mac", SENT);
    drop(guest);
    let _ = m.child.kill();
    let _ = m.child.wait();
    let counts: Vec<u64> = log
        .finish()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["reason"] == "spoofed_src_mac")
        .map(|v| {
            v["fields"]["count"]
                .as_u64()
                .expect("a count on each drop line")
        })
        .collect();
    // Bounded: the first few, then about one line per doubling (log2(1000) < 10).
    assert!(
        (6..=20).contains(&counts.len()),
        "{} drop lines for {SENT} drops: {:?}...",
        counts.len(),
        &counts[..counts.len().min(24)]
    );
    assert!(
        counts.windows(2).all(|w| w[0] < w[1]),
        "counts grow: {counts:?}"
    );
    assert!(
        counts.last().is_some_and(|&c| c > SENT / 2 && c <= SENT),
        "the last line says about how many: {counts:?}"
    );
}

/// The control socket's pool: clients that connect and say nothing (twice as many as it
/// holds, as some may be refused before the workers wake) hold every worker and
/// queue slot; one more is told "busy" in words (its request read first, so it is not reset),
/// and once they go, requests are answered again. Then many requests one after another are
/// all answered (a pool that counted a finishing thread as busy refused some under load).
#[test]
fn the_control_socket_refuses_in_words_when_full_and_serves_one_request_after_another() {
    use std::os::unix::net::UnixStream;
    let m = start(&policy(""), &[], Stdio::null());
    let control = m.path("control.sock");
    let silent: Vec<UnixStream> = (0..24)
        .map(|_| UnixStream::connect(&control).unwrap())
        .collect();
    let (ok, answer) = support::wait_for("a busy answer", Duration::from_secs(10), || {
        let reply = moat::control::socket::request(&control, "stats");
        match reply {
            Ok((false, answer)) if answer.contains("busy") => Some((false, answer)),
            Ok(_) | Err(_) => None,
        }
    });
    assert!(
        !ok && answer.contains("too many control requests"),
        "{answer}"
    );
    drop(silent);
    for i in 0..50 {
        let (ok, answer) = moat::control::socket::request(&control, "stats")
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(ok, "request {i}: {answer}");
    }
}
