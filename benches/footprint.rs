//! moat's footprint: memory and CPU of idle moat processes, and memory with many open flows.
//!
//! moat is the real release binary (a child process, so its RSS and CPU are its own); the
//! guest is the simulated guest (`moat_sim::guest::GuestNet`, smoltcp, in this process). Figures:
//! - RSS of one idle moat with a guest attached (VmRSS; also anonymous/shared split and Pss);
//! - CPU of that idle moat over MOAT_IDLE_SECS (default 30 s; schedstat, all threads);
//! - RSS with MOAT_FLOWS (default 10000) open TCP flows guest -> moat -> proxy;
//! - RSS sum and CPU of MOAT_MOATS (default 50) idle moat processes, each with a guest.
//!
//! The peer is the targets (idle RSS < 16 MiB, 10k flows < 128 MiB, idle CPU ~0): each
//! row prints target, measured and measured/target. Raw numbers go to
//! target/bench/footprint.txt. Run: `cargo bench --bench footprint` (MOAT_BENCH_QUICK=1:
//! 3 s idle, 1000 flows, 10 moats).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_sim::bench::*;
use moat_sim::guest::{tcp_drain, GuestNet, GuestOptions, SimGuest};
use moat_sim::proxy;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

const T: Duration = Duration::from_secs(60);
const MIB: f64 = 1024.0 * 1024.0;

/// Memory of `pid` in bytes: VmRSS, RssAnon, RssShmem (from status) and Pss (smaps_rollup).
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss: u64,
    anon: u64,
    shmem: u64,
    pss: u64,
}

fn kb_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| {
            l[key.len()..]
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

fn mem(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Mem {
        rss: kb_field(&status, "VmRSS:"),
        anon: kb_field(&status, "RssAnon:"),
        shmem: kb_field(&status, "RssShmem:"),
        pss: kb_field(&rollup, "Pss:"),
    }
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn guest(socket: &Path) -> GuestNet {
    let sim =
        SimGuest::connect(socket, GuestOptions::default()).expect("attach the simulated guest");
    vm_net(sim)
}

/// A CONNECT proxy that answers 200 and then only holds the connection: one thread and one
/// socket per flow here, so the flow count is bounded by moat, not by this process. (The
/// test proxy of moat-sim spends two threads and about five descriptors per flow on
/// its origin splice: fine for one flow, too much for ten thousand.)
fn holding_proxy() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&held);
    std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = Vec::new();
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if conn
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .is_ok()
            {
                conns.push(conn);
                count.store(conns.len(), Ordering::SeqCst);
            }
        }
    });
    (addr, held)
}

/// Open up to `n` TCP flows from the guest to `addr:80`, in batches; returns the handles
/// established and, if it stopped short, why.
fn open_flows(net: &mut GuestNet, addr: Ipv4Addr, n: usize) -> (Vec<SocketHandle>, Option<String>) {
    let batch = 200;
    let mut open = Vec::with_capacity(n);
    while open.len() < n {
        let want = batch.min(n - open.len());
        let pending: Vec<_> = (0..want).map(|_| net.tcp_connect(addr, 80)).collect();
        let done = net.run_until(Duration::from_secs(30), |net| {
            pending
                .iter()
                .all(|&h| net.tcp(h).state() != State::SynSent)
        });
        if let Err(e) = done {
            return (open, Some(format!("guest error: {e}")));
        }
        let mut failed = 0;
        for h in pending {
            if net.tcp(h).state() == State::Established {
                open.push(h);
            } else {
                failed += 1;
                net.tcp(h).abort();
            }
        }
        if failed > 0 {
            return (
                open,
                Some(format!("{failed} of a batch of {want} did not establish")),
            );
        }
    }
    (open, None)
}

struct Row {
    figure: String,
    target: String,
    measured: String,
    ratio: String,
}

fn main() {
    let quick = std::env::var("MOAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let idle_secs: f64 = env_or("MOAT_IDLE_SECS", if quick { 3.0 } else { 30.0 });
    let flows: usize = env_or("MOAT_FLOWS", if quick { 1000 } else { 10_000 });
    let moats: usize = env_or("MOAT_MOATS", if quick { 10 } else { 50 });
    let nofile = raise_nofile((flows as u64 + moats as u64 * 64 + 1024).max(65_536));
    let idle = Duration::from_secs_f64(idle_secs);
    let mut rows = Vec::new();
    let mut raw = Vec::new();

    // 1. One idle moat with a guest attached, one flow through the test proxy to show the
    //    path works, then nothing.
    let origin = proxy::origin();
    let tp = proxy::TestProxy::start(proxy::ProxyMode::Accept, origin);
    let moat = start_moat(tp.addr, 4096);
    let mut net = guest(&moat.socket);
    let addr = net.resolve_a("bench.example", T).expect("resolves");
    let h = net.tcp_established(addr, 80, T).unwrap().expect("connect");
    assert!(net.tcp_send_all(h, b"Eping", T).unwrap());
    let mut echoed = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(h);
        tcp_drain(s, |d| {
            echoed.extend_from_slice(d);
        });
        echoed.len() >= 4
    })
    .unwrap();
    assert_eq!(echoed, b"ping", "echo through moat and the test proxy");
    net.tcp(h).close();
    net.run_until(Duration::from_secs(2), |n| {
        n.tcp(h).state() == State::Closed
    })
    .unwrap();
    net.remove(h);
    std::thread::sleep(Duration::from_millis(500));
    let pid = moat.pid();
    let (cpu0, t0) = (cpu_ns(pid), Instant::now());
    std::thread::sleep(idle);
    let (cpu1, secs) = (cpu_ns(pid), t0.elapsed().as_secs_f64());
    let m = mem(pid);
    let cpu_s = (cpu1 - cpu0) as f64 / 1e9;
    let cpu_pct = cpu_s / secs * 100.0;
    raw.push(format!(
        "idle_one rss={} anon={} shmem={} pss={} threads={} cpu_ns={} cpu_since_start_ns={cpu1} secs={secs:.3}",
        m.rss,
        m.anon,
        m.shmem,
        m.pss,
        threads(pid),
        cpu1 - cpu0
    ));
    rows.push(Row {
        figure: "idle RSS, 1 moat + guest".into(),
        target: "< 16 MiB".into(),
        measured: format!(
            "{:.2} MiB (anon {:.2}, shmem {:.2}, Pss {:.2})",
            m.rss as f64 / MIB,
            m.anon as f64 / MIB,
            m.shmem as f64 / MIB,
            m.pss as f64 / MIB
        ),
        ratio: format!("{:.3}", m.rss as f64 / MIB / 16.0),
    });
    // "~0": taken as at most 0.1% of one core.
    rows.push(Row {
        figure: format!("idle CPU, 1 moat, {secs:.0} s"),
        target: "~0 (<= 0.1% core)".into(),
        measured: format!("{:.4}% core ({:.1} ms CPU)", cpu_pct, cpu_s * 1e3),
        ratio: format!("{:.3}", cpu_pct / 0.1),
    });
    drop(net);
    drop(moat);

    // 2. Many open flows: guest -> moat -> holding proxy.
    let (hp, held) = holding_proxy();
    let moat = start_moat(hp, flows.max(1));
    let mut net = guest(&moat.socket);
    let addr = net.resolve_a("bench.example", T).expect("resolves");
    let pid = moat.pid();
    std::thread::sleep(Duration::from_millis(300));
    let base = mem(pid);
    let t0 = Instant::now();
    let (open, short) = open_flows(&mut net, addr, flows);
    let open_secs = t0.elapsed().as_secs_f64();
    // Let moat settle (and the guest ack everything), then measure.
    net.run_until(Duration::from_millis(500), |_| false)
        .unwrap();
    let m = mem(pid);
    let fds = open_fds(pid);
    let n = open.len();
    let per_flow = (m.rss.saturating_sub(base.rss)) as f64 / n.max(1) as f64;
    raw.push(format!(
        "flows requested={flows} open={n} held_by_proxy={} moat_fds={fds} nofile={nofile} \
         rss_before={} rss={} anon={} shmem={} pss={} per_flow_bytes={per_flow:.0} open_secs={open_secs:.2}{}",
        held.load(Ordering::SeqCst),
        base.rss,
        m.rss,
        m.anon,
        m.shmem,
        m.pss,
        short.as_ref().map(|s| format!(" stopped=\"{s}\"")).unwrap_or_default()
    ));
    let target_mib = 128.0 * n as f64 / 10_000.0;
    rows.push(Row {
        figure: format!("RSS, {n} open flows"),
        target: if n == 10_000 {
            "< 128 MiB".into()
        } else {
            format!("< {target_mib:.1} MiB (128 MiB x {n}/10k)")
        },
        measured: format!(
            "{:.2} MiB ({:.0} B/flow above idle {:.2} MiB)",
            m.rss as f64 / MIB,
            per_flow,
            base.rss as f64 / MIB
        ),
        ratio: format!(
            "{:.3}",
            m.rss as f64 / MIB / target_mib.max(f64::MIN_POSITIVE)
        ),
    });
    if let Some(why) = &short {
        println!("flows: stopped at {n} of {flows}: {why} (RLIMIT_NOFILE {nofile})");
    }
    drop(open);
    drop(net);
    drop(moat);

    // 3. Many idle moats at once, each with its own socket and a guest attached.
    let (hp, _held) = holding_proxy();
    let mut fleet = Vec::with_capacity(moats);
    for _ in 0..moats {
        fleet.push(start_moat(hp, 64));
    }
    let mut guests = Vec::with_capacity(moats);
    let mut attach_failed = 0;
    for m in &fleet {
        match SimGuest::connect(&m.socket, GuestOptions::default()) {
            Ok(sim) => guests.push(sim),
            Err(e) => {
                attach_failed += 1;
                eprintln!("attach to moat {}: {e}", m.pid());
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<u32> = fleet.iter().map(Moat::pid).collect();
    let cpu0: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
    let t0 = Instant::now();
    std::thread::sleep(idle);
    let cpu1: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
    let secs = t0.elapsed().as_secs_f64();
    let mems: Vec<Mem> = pids.iter().map(|&p| mem(p)).collect();
    let rss: u64 = mems.iter().map(|m| m.rss).sum();
    let anon: u64 = mems.iter().map(|m| m.anon).sum();
    let pss: u64 = mems.iter().map(|m| m.pss).sum();
    let cpu_s = (cpu1 - cpu0) as f64 / 1e9;
    let cpu_pct = cpu_s / secs * 100.0;
    raw.push(format!(
        "fleet moats={moats} guests={} rss_sum={rss} anon_sum={anon} pss_sum={pss} cpu_ns={} cpu_since_start_ns={cpu1} secs={secs:.3}",
        guests.len(),
        cpu1 - cpu0
    ));
    rows.push(Row {
        figure: format!("RSS sum, {moats} idle moats + guests"),
        target: format!("< {} MiB ({moats} x 16)", moats * 16),
        measured: format!(
            "{:.1} MiB ({:.2}/moat; anon {:.1}, Pss {:.1})",
            rss as f64 / MIB,
            rss as f64 / MIB / moats as f64,
            anon as f64 / MIB,
            pss as f64 / MIB
        ),
        ratio: format!("{:.3}", rss as f64 / MIB / (moats as f64 * 16.0)),
    });
    rows.push(Row {
        figure: format!("idle CPU, {moats} moats, {secs:.0} s"),
        target: format!("~0 (<= {:.1}% core)", 0.1 * moats as f64),
        measured: format!("{:.4}% core ({:.1} ms CPU total)", cpu_pct, cpu_s * 1e3),
        ratio: format!("{:.3}", cpu_pct / (0.1 * moats as f64)),
    });
    if attach_failed > 0 {
        println!("fleet: {attach_failed} of {moats} guests failed to attach");
    }
    drop(guests);
    drop(fleet);

    let mut table = format!(
        "{:<36} | {:<31} | {:<52} | {}\n",
        "figure", "target (peer)", "measured", "measured/target"
    );
    for r in &rows {
        table.push_str(&format!(
            "{:<36} | {:<31} | {:<52} | {}\n",
            r.figure, r.target, r.measured, r.ratio
        ));
    }
    print!("{table}");
    println!(
        "(RSS = VmRSS; shmem is guest memory moat has touched, shared with the guest. \
         The idle CPU target ~0 is taken as 0.1% of a core per moat.)"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let mut text = table;
    for line in raw {
        text.push_str("raw ");
        text.push_str(&line);
        text.push('\n');
    }
    let _ = std::fs::write(dir.join("footprint.txt"), text);
}
