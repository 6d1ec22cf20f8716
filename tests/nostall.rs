//! A hostile guest cannot stall, starve or bloat its own moat, nor keep the operator out
//! (issue 11). Each test runs the real binary, attacks it through the simulated guest and
//! measures what the attack costs: CPU from /proc/PID/task/*/schedstat (ns on CPU; the
//! /proc/PID/stat times read wrong in these VMs), memory from /proc/PID/status.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_sim::craft;
use moat_sim::guest::{GuestOptions, SimGuest};
use support::proxy::{origin, ProxyMode, TestProxy};
use support::*;

/// How long an operator command may take while the guest attacks. The issue asks for a
/// second; the bound leaves room for a loaded 2-CPU machine (the failure it catches is a
/// hang, which is forever).
const PROMPT: Duration = Duration::from_secs(2);
/// CPU moat may burn over [`CPU_WINDOW`] while a guest attacks and nothing else happens
/// ("near idle"; a spinning pair thread burns the whole window).
const CPU_BOUND: Duration = Duration::from_millis(150);
const CPU_WINDOW: Duration = Duration::from_secs(2);

fn policy(extra: &str) -> String {
    format!(
        "[vm]\nname = \"nostall\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n{extra}"
    )
}

/// Nanoseconds every thread of `pid` has spent on a CPU (first field of each schedstat).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU moat spends over `window` (while the caller does nothing).
fn cpu_over(pid: u32, window: Duration) -> Duration {
    let before = cpu_ns(pid);
    std::thread::sleep(window);
    Duration::from_nanos(cpu_ns(pid).saturating_sub(before))
}

/// Run `moat ARGS --control PATH`, killed if it takes longer than `PROMPT`; (exit code,
/// stdout, how long it took).
fn moat_prompt(args: &[&str], control: &Path) -> (i32, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(moat_bin())
        .args(args)
        .arg("--control")
        .arg(control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let took = started.elapsed();
            let mut out = String::new();
            if let Some(mut s) = child.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut out);
            }
            if let Some(mut s) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut out);
            }
            return (status.code().unwrap_or(-1), out, took);
        }
        if started.elapsed() > PROMPT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("moat {args:?} did not answer within {PROMPT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `moat stats --json`, promptly, parsed.
fn stats(control: &Path) -> serde_json::Value {
    let (code, out, took) = moat_prompt(&["stats", "--json"], control);
    assert_eq!(code, 0, "moat stats failed: {out}");
    eprintln!("moat stats answered in {took:?}");
    serde_json::from_str(&out).expect("stats --json is JSON")
}

fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["counters"][name].as_u64().unwrap_or(0)
}

fn ping(guest: &mut SimGuest, seq: u16, payload: &[u8]) {
    guest
        .send_frame(&craft::icmp_echo(
            GUEST_MAC, GW_MAC, GUEST, GW, 7, seq, payload,
        ))
        .unwrap();
}

/// Wait until moat has returned every TX chain the guest posted (it reads TX).
fn tx_served(guest: &SimGuest, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest.tx_in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: {} TX chains never returned",
            guest.tx_in_flight()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_near_idle(pid: u32, what: &str) {
    let cpu = cpu_over(pid, CPU_WINDOW);
    eprintln!("{what}: moat used {cpu:?} of CPU over {CPU_WINDOW:?} (bound {CPU_BOUND:?})");
    assert!(
        cpu < CPU_BOUND,
        "{what}: moat used {cpu:?} of CPU over {CPU_WINDOW:?} (bound {CPU_BOUND:?})"
    );
}

/// Zero-length, then tiny RX buffers with mergeable RX: moat neither spins nor stops
/// serving TX; the drops are counted; the operator's commands, a hang-up and SIGTERM all
/// work while the guest keeps at it.
#[test]
fn tiny_rx_buffers_do_not_make_moat_spin() {
    let mut m = MoatProcess::start(&policy(""), &[], Stdio::null());
    let pid = m.child.id();
    let control = m.path("control.sock");
    let opts = GuestOptions::default();
    assert!(opts.mrg_rxbuf);
    let mut guest = SimGuest::connect(&m.path("moat.sock"), opts.clone()).unwrap();
    ping(&mut guest, 0, b"before");
    recv_matching(&mut guest, "echo reply before the attack", |_| true);

    // Zero-length buffers: nothing can ever be delivered into them.
    guest.set_rx_buffer_len(0, 0);
    for seq in 1..=4 {
        ping(&mut guest, seq, b"zero");
    }
    tx_served(&guest, "zero-length RX buffers");
    std::thread::sleep(Duration::from_millis(200));
    assert_near_idle(pid, "zero-length RX buffers");
    // TX on that pair is still read: 100 more frames, every chain comes back.
    for seq in 10..110 {
        ping(&mut guest, seq, b"tx still served");
    }
    tx_served(&guest, "TX under the RX attack");
    let s = stats(&control);
    assert!(
        counter(&s, "drop.rx_ring_too_small") >= 1,
        "a frame that can never fit is dropped with its reason: {s}"
    );
    let (code, out, took) = moat_prompt(&["reload"], &control);
    assert_eq!(code, 0, "reload: {out}");
    eprintln!("moat reload answered in {took:?}");

    // Buffers of a few bytes: small frames fit across many, a large one never can.
    guest.set_rx_buffer_len(0, 4);
    // Taking the used (zero-length) buffers gives them back at 4 bytes each.
    while guest
        .recv_frame(Duration::from_millis(100))
        .unwrap()
        .is_some()
    {}
    let dropped = counter(&stats(&control), "drop.rx_ring_too_small");
    ping(&mut guest, 200, &[0x55; 1400]);
    tx_served(&guest, "a large frame for tiny RX buffers");
    std::thread::sleep(Duration::from_millis(200));
    assert_near_idle(pid, "4-byte RX buffers");
    let s = stats(&control);
    assert!(
        counter(&s, "drop.rx_ring_too_small") > dropped,
        "the 1442-byte reply cannot fit 256 x 4 bytes: dropped with its reason: {s}"
    );

    // Hang-up: the device is reset and a well-behaved guest is served again.
    guest.disconnect();
    let mut guest = SimGuest::connect(&m.path("moat.sock"), opts).unwrap();
    ping(&mut guest, 300, b"after the hang-up");
    recv_matching(&mut guest, "echo reply after the hang-up", |_| true);

    // The attack again, then SIGHUP and SIGTERM back to back: moat exits promptly.
    guest.set_rx_buffer_len(0, 0);
    for seq in 400..410 {
        ping(&mut guest, seq, b"zero again");
    }
    tx_served(&guest, "zero-length RX buffers, second guest");
    let started = Instant::now();
    for sig in [libc::SIGHUP, libc::SIGTERM] {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, sig) };
    }
    loop {
        if let Some(status) = m.child.try_wait().unwrap() {
            eprintln!("SIGHUP + SIGTERM: moat exited in {:?}", started.elapsed());
            assert!(status.success(), "exit after SIGTERM: {status:?}");
            break;
        }
        assert!(
            started.elapsed() < PROMPT,
            "moat did not exit within {PROMPT:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A SYN from the guest's port `sport` to 203.0.113.`host`:443, sent on queue pair `pair`.
fn syn(guest: &mut SimGuest, pair: usize, sport: u16, host: u8) {
    guest.set_tx_pair(pair);
    guest
        .send_frame(&craft::tcp_syn(
            GUEST_MAC,
            GW_MAC,
            (GUEST, sport),
            (std::net::Ipv4Addr::new(203, 0, 113, host), 443),
        ))
        .unwrap();
}

/// Two queue pairs, pair 0's RX stalled by zero-length buffers, the guest carrying on over
/// pair 1: `moat reload` with a policy that allows nothing returns promptly, and from then
/// on no flow opens on either pair.
#[test]
fn reload_revokes_on_every_pair_while_one_is_stalled() {
    // The proxy refuses every CONNECT (and so never connects anywhere); it logs each target.
    let proxy = TestProxy::start(ProxyMode::Refuse(403), origin());
    let allow = format!(
        "[proxy]\nhttp = \"{}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"203.0.113.0/24\"]\n",
        proxy.addr
    );
    let m = MoatProcess::start(&policy(&allow), &["--queues", "2"], Stdio::null());
    let control = m.path("control.sock");
    let opts = GuestOptions {
        queue_pairs: 2,
        ..GuestOptions::default()
    };
    let mut guest = SimGuest::connect(&m.path("moat.sock"), opts).unwrap();
    guest.set_rx_buffer_len(0, 0);
    guest.set_tx_pair(0);
    for seq in 0..8 {
        ping(&mut guest, seq, b"stall pair 0");
    }
    let requested = |host: u8| {
        let target = format!("203.0.113.{host}:443");
        proxy.requests().contains(&target)
    };
    // Under the first policy both pairs open flows.
    syn(&mut guest, 0, 1001, 1);
    syn(&mut guest, 1, 1002, 2);
    eventually("flows on both pairs reach the proxy", || {
        requested(1) && requested(2)
    });

    std::fs::write(m.path("vm.toml"), policy("")).unwrap();
    let (code, out, took) = moat_prompt(&["reload"], &control);
    assert_eq!(code, 0, "reload: {out}");
    eprintln!(
        "reload with pair 0 stalled answered in {took:?}: {}",
        out.trim()
    );

    let not_allowed = counter(&stats(&control), "drop.not_allowed");
    syn(&mut guest, 0, 1003, 3);
    syn(&mut guest, 1, 1004, 4);
    syn(&mut guest, 1, 1005, 5);
    tx_served(&guest, "SYNs after the reload");
    eventually("the SYNs after the reload are refused", || {
        counter(&stats(&control), "drop.not_allowed") >= not_allowed + 3
    });
    std::thread::sleep(QUIET);
    for host in 3..=5 {
        assert!(
            !requested(host),
            "a flow opened under the revoked policy: {:?}",
            proxy.requests()
        );
    }
    let s = stats(&control);
    assert_eq!(s["policy_generation"], 2, "{s}");
}

/// Resident memory of `pid`, in bytes (VmRSS of /proc/PID/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// How much moat's RSS may grow while one guest connection pipelines DNS queries over TCP
/// and never reads an answer: that connection's worst case (README, limits: about 200 KiB)
/// plus room for the allocator's own bookkeeping. Before the bound it grew by more than
/// the queries sent.
const DNS_TCP_RSS_BOUND: u64 = 8 << 20;

/// DNS over TCP without reading: 100 MB of pipelined queries (or as many as the guest can
/// send), answers never read. moat stops reading once its answers back up, so the guest's
/// window closes, and its memory stays bounded.
#[test]
fn dns_over_tcp_without_reading_keeps_moat_bounded() {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let m = MoatProcess::start(
        &policy("[dns]\nallow = [\"ok.example\"]\n"),
        &[],
        Stdio::null(),
    );
    let pid = m.child.id();
    let guest = SimGuest::connect(&m.path("moat.sock"), GuestOptions::default()).unwrap();
    let mut net = vm_net(guest);
    let h = established(&mut net, GW, 53);
    // One query, framed (two-byte length), repeated into a 64 KiB chunk.
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("nope.example.").unwrap(),
        RecordType::A,
    ));
    let q = q.to_vec().unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let chunk: Vec<u8> = framed
        .iter()
        .copied()
        .cycle()
        .take(framed.len() * (65536 / framed.len()))
        .collect();
    let before = rss(pid);
    let (goal, mut sent) = (100u64 << 20, 0u64);
    let started = Instant::now();
    let mut stalled_since = Instant::now();
    while sent < goal && started.elapsed() < Duration::from_secs(120) {
        let mut off = 0;
        net.run_until(Duration::from_millis(50), |n| {
            if let Ok(k) = n.tcp(h).send_slice(&chunk[off..]) {
                off += k;
            }
            off == chunk.len()
        })
        .unwrap();
        sent += off as u64;
        if off > 0 {
            stalled_since = Instant::now();
        } else if stalled_since.elapsed() > Duration::from_secs(3) {
            break; // the window stays closed: moat stopped reading
        }
    }
    // Let moat work through what it has taken in.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss(pid);
    let grew = after.saturating_sub(before);
    eprintln!(
        "dns over tcp: guest sent {} KiB of queries in {:?}; moat RSS {} KiB -> {} KiB (+{} KiB, bound {} KiB)",
        sent >> 10,
        started.elapsed(),
        before >> 10,
        after >> 10,
        grew >> 10,
        DNS_TCP_RSS_BOUND >> 10
    );
    assert!(
        grew < DNS_TCP_RSS_BOUND,
        "moat RSS grew by {} KiB (bound {} KiB) after {} KiB of unread DNS-over-TCP answers",
        grew >> 10,
        DNS_TCP_RSS_BOUND >> 10,
        sent >> 10
    );
    // moat still answers the operator and a well-behaved query on UDP.
    stats(&m.path("control.sock"));
}

/// TCP flags of a frame from the gateway side to the guest's `port`, if it is TCP.
fn tcp_flags_to(frame: &[u8]) -> Option<(u16, u8)> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let tcp = frame.get(14 + ihl..14 + ihl + 20)?;
    Some((u16::from_be_bytes([tcp[2], tcp[3]]), tcp[13]))
}

/// `moat serve` of the policy `text` under `prlimit --nofile=256`, once its control socket
/// is up: (its directory, the control socket, the process).
fn serve_with_256_descriptors(
    text: &str,
    stderr: Stdio,
) -> (tempfile::TempDir, std::path::PathBuf, Reaped) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vm.toml"), text).unwrap();
    let control = dir.path().join("control.sock");
    let child =
        Reaped::spawn(serve_in(dir.path(), &["prlimit", "--nofile=256", "--"]).stderr(stderr));
    eventually("control socket", || control.exists());
    (dir, control, child)
}

/// moat under `prlimit --nofile=256` with the default max_flows (4096, far more than 256
/// descriptors hold), a guest opening more connections than fit: every SYN is answered
/// (SYN-ACK, or a RST for those past the budget: never silence), `moat stats` answers
/// throughout, and a reconnecting frontend is accepted. TCP flows, one descriptor each,
/// open up to the budget: max_flows is clamped to that, not to the all-UDP worst case.
#[test]
fn descriptor_budget_refuses_flows_with_rst_and_keeps_the_operator_in() {
    const SYNS: u16 = 300;
    let proxy = TestProxy::start(ProxyMode::Accept, origin());
    let text = policy(&format!(
        "[proxy]\nhttp = \"{}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"example.com\"]\n[dns]\nallow = [\"example.com\"]\n",
        proxy.addr
    ));
    let (dir, control, mut child) = serve_with_256_descriptors(&text, Stdio::piped());
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    let socket = dir.path().join("moat.sock");
    let guest = SimGuest::connect(&socket, GuestOptions::default()).unwrap();
    let mut net = vm_net(guest);
    let site = net
        .resolve_a("example.com", Duration::from_secs(10))
        .expect("example.com resolves");
    let guest = net.sim();
    let mut answered = std::collections::HashMap::new();
    for i in 0..SYNS {
        let sport = 20_000 + i;
        guest
            .send_frame(&craft::tcp_syn(
                GUEST_MAC,
                GW_MAC,
                (GUEST, sport),
                (site, 443),
            ))
            .unwrap();
        if i % 50 == 49 {
            // The operator is never locked out while the flows pile up.
            stats(&control);
        }
        while let Some(frame) = guest.recv_frame(Duration::ZERO).unwrap() {
            if let Some((port, flags)) = tcp_flags_to(&frame) {
                answered.entry(port).or_insert(flags);
            }
        }
    }
    if answered.len() < usize::from(SYNS) {
        guest
            .recv_until(Duration::from_secs(20), |frame| {
                if let Some((port, flags)) = tcp_flags_to(frame) {
                    answered.entry(port).or_insert(flags);
                }
                answered.len() >= usize::from(SYNS)
            })
            .unwrap();
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    eprintln!("moat holds {fds} descriptors of 256");
    assert!(
        fds + 32 <= 256,
        "the operator's reserve is left free: moat holds {fds} of 256"
    );
    let rst = answered.values().filter(|f| *f & 0x04 != 0).count();
    let synack = answered.values().filter(|f| *f & 0x12 == 0x12).count();
    eprintln!(
        "{SYNS} SYNs under nofile=256: {synack} SYN-ACKs, {rst} RSTs, {} unanswered",
        usize::from(SYNS) - answered.len()
    );
    assert_eq!(
        answered.len(),
        usize::from(SYNS),
        "every SYN is answered ({synack} SYN-ACKs, {rst} RSTs)"
    );
    assert!(rst > 0, "the flows past the budget are refused with a RST");
    // 256 descriptors leave about 157 for flows: TCP flows (1 descriptor each) open up to
    // that, not up to half of it (the all-UDP worst case the clamp once used: 70 opened).
    assert!(
        synack > 100,
        "TCP flows open up to the descriptor budget, not half of it: {synack} SYN-ACKs"
    );
    let s = stats(&control);
    eprintln!(
        "stats: flow_limit {}, fd_budget {}",
        counter(&s, "drop.flow_limit"),
        counter(&s, "drop.fd_budget")
    );

    // A reconnecting frontend is accepted, and served.
    drop(net);
    let mut guest = SimGuest::connect(&socket, GuestOptions::default()).unwrap();
    ping(&mut guest, 1, b"reconnected");
    recv_matching(&mut guest, "echo reply after reconnecting", |_| true);
    stats(&control);
    drop(child);
    let log = log.join().unwrap();
    assert!(
        log.contains("max_flows"),
        "a warning line says max_flows was clamped:\n{log}"
    );
}

/// The control socket is owner-only from the moment it exists: moat binds it under umask
/// 0177 (it was bound, then chmod-ed: in between, anyone the umask let in could connect).
/// Observed with strace, since the window was microseconds wide; skipped without strace
/// (fails under CI).
#[test]
fn control_socket_is_bound_owner_only() {
    let have_strace = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_strace {
        assert!(
            std::env::var("CI").map_or(true, |v| v.is_empty()),
            "CI must run this test: strace missing"
        );
        eprintln!("skipped: strace missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vm.toml"), policy("")).unwrap();
    let control = dir.path().join("control.sock");
    let trace = dir.path().join("trace");
    let trace_arg = trace.to_string_lossy().into_owned();
    let strace = ["strace", "-f", "-e", "trace=umask,bind", "-o", &trace_arg];
    let mut child = serve_in(dir.path(), &strace)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("control socket", || control.exists());
    // moat is strace's child: stop it (its pid opens every trace line), then strace ends.
    let traced: Option<i32> = std::fs::read_to_string(&trace)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok());
    if let Some(pid) = traced {
        // SAFETY: kill(2) on the pid of the moat this test started (under strace).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&trace).unwrap();
    // moat binds under a staging name beside it (`.control.sock.PID.tmp`), then renames it
    // into place once listening: the bind to look at is the one whose path names it.
    let control = control.file_name().unwrap().to_string_lossy().into_owned();
    let mut umask = None;
    let mut at_bind = None;
    for line in text.lines() {
        if let Some(rest) = line.split_once("umask(").map(|(_, r)| r) {
            umask = rest.split(')').next().map(str::to_string);
        }
        if line.contains("bind(") && line.contains(&control) {
            at_bind = Some(umask.clone());
        }
    }
    assert_eq!(
        at_bind,
        Some(Some("0177".to_string())),
        "the umask when the control socket was bound:\n{text}"
    );
}

/// UDP associations cost two descriptors each (dante's control connection and the relay
/// socket), TCP flows one. max_flows is clamped to what the budget holds at one descriptor
/// a flow, so a guest that opens only associations reaches the descriptor budget before
/// max_flows (130 here, which a warning says fits only as TCP flows): under
/// `prlimit --nofile=256` (141 descriptors for flows), 120 associations
/// from 120 source ports: those within the budget carry their datagram, the rest are
/// refused as `fd_budget` (not `flow_limit`), moat keeps the operator's reserve free, and
/// `moat stats` answers throughout.
#[test]
fn udp_associations_past_the_descriptor_budget_are_refused_and_the_operator_stays_in() {
    use support::peers::{available, dante};
    if !available("danted", "dante-server") {
        return;
    }
    const ASSOCIATIONS: u16 = 120;
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let socks = dante();
    let text = policy(&format!(
        "[proxy]\nsocks5 = \"{}\"\n[[outbound]]\nprotocol = \"udp\"\nports = [{echo_port}]\nto = [\"127.0.0.1/32\"]\n\
         [limits]\nmax_flows = 130\n",
        socks.addr
    ));
    // 130 flows fit in 141 descriptors as TCP, not as UDP associations: no clamp, a warning.
    let (dir, control, mut child) = serve_with_256_descriptors(&text, Stdio::piped());
    let log = LineLog::collect(child.stderr.take().unwrap());
    let guest = SimGuest::connect(&dir.path().join("moat.sock"), GuestOptions::default()).unwrap();
    let mut net = vm_net(guest);
    let to = smoltcp::wire::IpEndpoint::new(
        smoltcp::wire::IpAddress::Ipv4(std::net::Ipv4Addr::LOCALHOST),
        echo_port,
    );
    let sockets: Vec<_> = (0..ASSOCIATIONS)
        .map(|i| {
            let h = net.udp_bind(41_000 + i);
            net.udp(h)
                .send_slice(format!("a{i}").as_bytes(), to)
                .unwrap();
            // A few at a time, so that each association is asked for while moat keeps up.
            net.run_until(Duration::from_millis(20), |_| false).unwrap();
            if i % 40 == 39 {
                stats(&control); // the operator is never locked out meanwhile
            }
            h
        })
        .collect();
    let mut echoed = std::collections::HashSet::new();
    net.run_until(Duration::from_secs(5), |n| {
        for (i, &h) in sockets.iter().enumerate() {
            while let Ok((d, _)) = n.udp(h).recv() {
                assert_eq!(
                    d,
                    format!("a{i}").as_bytes(),
                    "each datagram comes back to its own port"
                );
                echoed.insert(i);
            }
        }
        false
    })
    .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    let s = stats(&control);
    let (fd_budget, flow_limit) = (
        counter(&s, "drop.fd_budget"),
        counter(&s, "drop.flow_limit"),
    );
    eprintln!(
        "{ASSOCIATIONS} associations under nofile=256: {} echoed; moat holds {fds} descriptors; drops fd_budget {fd_budget}, flow_limit {flow_limit}",
        echoed.len()
    );
    assert!(
        echoed.len() >= 50,
        "associations within the budget work: {} echoed",
        echoed.len()
    );
    assert!(
        echoed.len() < usize::from(ASSOCIATIONS),
        "not every association fits 141 descriptors at 2 each"
    );
    assert!(
        fd_budget > 0,
        "the ones past the budget are refused as fd_budget"
    );
    assert_eq!(
        flow_limit, 0,
        "max_flows (clamped at one descriptor a flow) is not what stops them"
    );
    assert!(
        fds + 32 <= 256,
        "the operator's reserve is left free: moat holds {fds} of 256"
    );
    drop(child);
    let log = log.finish();
    assert!(
        log.contains("not as many UDP associations"),
        "a warning says max_flows fits only as TCP flows:\n{log}"
    );
}
