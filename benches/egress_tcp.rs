//! TCP through moat, guest <-> proxy: bulk throughput both ways, connection setup rate, and
//! CPU per gigabit. The load generator is the simulated guest with a smoltcp stack (in this
//! process); moat is the real binary (its own process, so its CPU is its own); the proxy is a
//! minimal CONNECT endpoint (moat-sim/src/proxy.rs) run as a separate process (this bench
//! binary re-run with MOAT_BENCH_PROXY_TO=origin) in front of a loopback sink/source that
//! stays in this process.
//!
//! CPU is reported twice: moat alone, and the whole path moat adds (moat + the proxy
//! process), because moat's path has one more hop than passt's, which does all its socket
//! work itself and is counted alone. moat's CPU is the sum of /proc/PID/task/*/schedstat; the
//! proxy's is its process CPU clock (the same scheduler runtime, but including the
//! per-connection threads that already exited, which /proc/PID/task no longer lists). The
//! origin and the simulated guest are counted for neither side.
//!
//! Run: `cargo bench --bench egress_tcp` (MOAT_BENCH_MB=256 by default; MOAT_RR_RUNS=5 and
//! MOAT_CONN_RUNS=5 runs of the latency and connection loops, each against its host floor;
//! MOAT_BENCH_ONLY=bulk|rr|conn for one part; MOAT_BENCH_VERIFY=1 checks every download
//! against the origin's pattern, at the first and last byte of each chunk). Prints a table and
//! writes the raw numbers to target/bench/egress_tcp.txt.

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use moat_sim::bench::*;
use moat_sim::guest::{tcp_drain, GuestNet, GuestOptions, SimGuest};
use moat_sim::proxy;
use smoltcp::iface::SocketHandle;

const T: Duration = Duration::from_secs(120);

/// The proxy process's side: serve CONNECT to `origin` until stdin closes (the bench ended
/// or died).
fn proxy_process_main(origin: &str) {
    let origin: SocketAddr = origin.parse().expect("MOAT_BENCH_PROXY_TO=ip:port");
    let tp = proxy::TestProxy::start(proxy::ProxyMode::Accept, origin);
    println!("{}", tp.addr);
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// CPU readings of one backend and, for moat, the proxy hop it adds (ns).
#[derive(Clone, Copy)]
struct Cpu {
    backend: u64,
    proxy: u64,
}

/// Who is counted: the backend's process (schedstat) and the proxy process, if the path has
/// one (moat's does, passt's does not).
#[derive(Clone, Copy)]
struct Meter<'a> {
    backend: u32,
    proxy: Option<&'a ProxyProcess>,
}

impl Meter<'_> {
    fn read(&self) -> Cpu {
        Cpu {
            backend: cpu_ns(self.backend),
            proxy: self.proxy.map_or(0, ProxyProcess::cpu_ns),
        }
    }

    /// (backend, whole path) CPU seconds since `before`.
    fn since(&self, before: Cpu, now: Cpu) -> (f64, f64) {
        // Saturating: a sum over live threads can shrink when one exits.
        let b = now.backend.saturating_sub(before.backend) as f64 / 1e9;
        (b, b + now.proxy.saturating_sub(before.proxy) as f64 / 1e9)
    }
}

fn guest(socket: &Path, offloads: bool) -> GuestNet {
    let opts = GuestOptions {
        offloads,
        queue_size: 1024,
        mem_size: 64 << 20,
        rx_buffer_size: env_or("MOAT_BENCH_RXBUF", 2048),
        ..GuestOptions::default()
    };
    let sim = SimGuest::connect(socket, opts).expect("attach the simulated guest");
    vm_net(sim)
}

fn connect(net: &mut GuestNet, addr: (Ipv4Addr, u16)) -> SocketHandle {
    net.tcp_established(addr.0, addr.1, T)
        .unwrap()
        .expect("connect")
}

/// Wait until the echo of what was just sent arrives (any bytes), and consume it.
fn await_echo(net: &mut GuestNet, h: SocketHandle) {
    let mut echoed = false;
    net.tcp_recv(h, T, |_| {
        echoed = true;
        true
    })
    .unwrap();
    assert!(echoed, "no echo");
}

fn send(net: &mut GuestNet, h: SocketHandle, data: &[u8]) {
    assert!(net.tcp_send_all(h, data, T).unwrap());
}

struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    /// The backend's own CPU (moat, or passt).
    moat_cpu_s: f64,
    /// The whole path's CPU: the backend plus the proxy process (moat), the backend alone
    /// (passt, which has no proxy hop).
    path_cpu_s: f64,
    per: String,
}

/// "X CPU-s/Gbit" for the backend alone and for the whole path.
fn per_gbit(cpu: (f64, f64), bytes: u64) -> String {
    let gbit = bytes as f64 * 8.0 / 1e9;
    format!(
        "{:.2} CPU-s/Gbit backend, {:.2} whole path",
        cpu.0 / gbit,
        cpu.1 / gbit
    )
}

/// Bulk TCP both ways through one backend: guest -> proxy, then proxy -> guest.
fn bulk(
    net: &mut GuestNet,
    addr: (Ipv4Addr, u16),
    meter: Meter,
    bytes: u64,
    label: &str,
) -> Vec<Row> {
    let net = &mut *net;
    let mut out = Vec::new();
    // Guest -> proxy bulk.
    let h = connect(net, addr);
    send(net, h, b"U");
    let chunk = proxy::pattern(0, 256 * 1024);
    let (cpu0, t0) = (meter.read(), Instant::now());
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        send(net, h, &chunk[..n]);
        sent += n as u64;
    }
    net.tcp(h).close();
    let mut reply = Vec::new();
    net.run_until(T, |n| {
        let s = n.tcp(h);
        tcp_drain(s, |d| {
            reply.extend_from_slice(d);
        });
        reply.len() >= 16
    })
    .unwrap();
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), meter.since(cpu0, meter.read()));
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        bytes,
        "the sink got every byte"
    );
    let gbit = bytes as f64 * 8.0 / secs / 1e9;
    out.push(Row {
        name: format!("tcp guest->proxy, {label}"),
        value: gbit,
        unit: "Gbit/s",
        moat_cpu_s: cpu.0,
        path_cpu_s: cpu.1,
        per: per_gbit(cpu, bytes),
    });

    // Proxy -> guest bulk.
    let h = connect(net, addr);
    let mut req = b"B".to_vec();
    req.extend_from_slice(&bytes.to_be_bytes());
    send(net, h, &req);
    let (cpu0, t0) = (meter.read(), Instant::now());
    let (mut got, mut last) = (0u64, (t0, cpu0));
    // MOAT_BENCH_VERIFY=1 (off by default: it costs the guest time): check the stream
    // against the origin's pattern, and count the frames the guest took off its RX ring
    // at the last progress, to tell after a stall whether frames still arrived (dropped by
    // the guest's stack) or none did (the backend stopped sending).
    let verify = std::env::var("MOAT_BENCH_VERIFY").is_ok();
    let mut frames_at_last = 0u64;
    let block = proxy::pattern(0, 65536);
    let mut first_bad: Option<u64> = None;
    // Stop when everything arrived, or after 5 s without progress (a stalled peer is
    // reported as such, its rate taken up to its last byte).
    net.run_until(T, |n| {
        let s = n.tcp(h);
        let before = got;
        tcp_drain(s, |d| {
            // MOAT_BENCH_VERIFY=1: where the stream first differs from what the origin
            // sent (its 64 KiB pattern block, repeated), to tell bytes lost in the middle
            // from a stream cut short.
            // Only each chunk's first and last byte: checking every byte slows the guest
            // enough to hide the stall.
            if verify && first_bad.is_none() && !d.is_empty() {
                let expect = |i: usize| block[((got + i as u64) % 65536) as usize];
                let last = d.len() - 1;
                if d[0] != expect(0) {
                    first_bad = Some(got);
                } else if d[last] != expect(last) {
                    first_bad = Some(got + last as u64);
                }
            }
            got += d.len() as u64;
        });
        if got > before {
            last = (Instant::now(), meter.read());
            if verify {
                frames_at_last = n.sim().rx_frames_per_pair().iter().sum();
            }
        }
        got >= bytes || last.0.elapsed() > Duration::from_secs(5)
    })
    .unwrap();
    let (secs, cpu) = (
        last.0.duration_since(t0).as_secs_f64(),
        meter.since(cpu0, last.1),
    );
    let frames_after: u64 = net.sim().rx_frames_per_pair().iter().sum();
    let state = net.tcp(h).state();
    net.tcp(h).abort();
    let gbit = got as f64 * 8.0 / secs / 1e9;
    let mut name = format!("tcp proxy->guest, {label}");
    if verify {
        eprintln!(
            "{label}: proxy -> guest, {got} of {bytes} bytes, {}",
            first_bad.map_or(
                "the first and last byte of every chunk match".into(),
                |at| { format!("a wrong byte at offset {at} (chunk ends)") }
            )
        );
    }
    if got < bytes {
        eprintln!(
            "{label}: proxy -> guest stalled {} bytes short (guest socket {state}{})",
            bytes - got,
            if verify {
                format!(
                    "; {} frames arrived in the 5 s after the last byte",
                    frames_after - frames_at_last
                )
            } else {
                String::new()
            }
        );
        name.push_str(" (stalled)");
    }
    out.push(Row {
        name,
        value: gbit,
        unit: "Gbit/s",
        moat_cpu_s: cpu.0,
        path_cpu_s: cpu.1,
        per: per_gbit(cpu, got),
    });

    out
}

/// Request/response latency on one established connection: `n` one-byte round trips to an
/// echoing origin; (p50, p99) in microseconds.
fn rr(net: &mut GuestNet, addr: (Ipv4Addr, u16), n: usize) -> (f64, f64) {
    let h = connect(net, addr);
    send(net, h, b"E");
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        send(net, h, b"x");
        await_echo(net, h);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    net.tcp(h).abort();
    percentiles(lat)
}

/// A connection from the host through the CONNECT proxy at `proxy`, its 200 read: the
/// stream, and the reader its answer came through.
fn through_proxy(
    proxy: SocketAddr,
) -> (std::net::TcpStream, std::io::BufReader<std::net::TcpStream>) {
    let mut c = std::net::TcpStream::connect(proxy).unwrap();
    c.set_nodelay(true).unwrap();
    c.write_all(b"CONNECT bench.example:80 HTTP/1.1\r\nHost: bench.example:80\r\n\r\n")
        .unwrap();
    let mut reply = std::io::BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        assert!(reply.read_line(&mut line).unwrap() > 0, "the proxy hung up");
    }
    (c, reply)
}

/// The same round trips from the host over loopback, without moat or passt: straight to the
/// origin (passt's floor), or through the same CONNECT proxy moat uses (moat's floor).
fn rr_host(origin: SocketAddr, via_proxy: bool, n: usize) -> (f64, f64) {
    let mut c = if via_proxy {
        through_proxy(origin).0
    } else {
        let c = std::net::TcpStream::connect(origin).unwrap();
        c.set_nodelay(true).unwrap();
        c
    };
    c.write_all(b"E").unwrap();
    let mut b = [0u8; 1];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(b"x").unwrap();
        c.read_exact(&mut b).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    percentiles(lat)
}

/// One connection from the host through the proxy: connect, CONNECT, one echo, close (the
/// floor of the connection loop).
fn conn_host(proxy: SocketAddr) {
    let (mut c, mut reply) = through_proxy(proxy);
    c.write_all(b"Ex").unwrap();
    let mut b = [0u8; 1];
    reply.read_exact(&mut b).unwrap();
}

/// (p50, p99) of one run, in microseconds.
type Pcts = (f64, f64);

fn percentiles(mut lat: Vec<f64>) -> (f64, f64) {
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

fn main() {
    if let Ok(origin) = std::env::var(PROXY_TO_ENV) {
        return proxy_process_main(&origin);
    }
    let mb: u64 = env_or("MOAT_BENCH_MB", 256);
    let conns: usize = env_or("MOAT_BENCH_CONNS", 500);
    let bytes = mb << 20;
    let origin = proxy::origin();
    let tp = ProxyProcess::start(origin);
    let moat = start_moat(tp.addr, 8192);
    let mut net = guest(&moat.socket, true);
    let addr = net.resolve_a("bench.example", T).expect("resolves");
    let pid = moat.child.id();
    let mut rows = Vec::new();
    // MOAT_BENCH_ONLY=bulk|rr|conn: one part only (to profile it, or for a quicker run).
    let only = std::env::var("MOAT_BENCH_ONLY").ok();
    let only = only.as_deref();

    if only.is_none_or(|o| o == "bulk") {
        for (offloads, label) in [(false, "1500 B frames"), (true, "TSO/CSUM")] {
            let m = start_moat(tp.addr, 8192);
            let mut g = guest(&m.socket, offloads);
            let a = g.resolve_a("bench.example", T).expect("resolves");
            let meter = Meter {
                backend: m.pid(),
                proxy: Some(&tp),
            };
            rows.extend(bulk(&mut g, (a, 80), meter, bytes, label));
        }
        // The peer: passt in vhost-user mode (PASST=/path/to/passt, built from its public
        // source), the same simulated guest connecting straight to the origin through passt's
        // NAT (the gateway address maps to the host's loopback) - no proxy hop.
        if let Some(passt) = std::env::var_os("PASST") {
            for (offloads, label) in [
                (false, "passt, 1500 B frames"),
                (true, "passt, its offloads"),
            ] {
                let p = start_passt(Path::new(&passt));
                let mut g = guest(&p.socket, offloads);
                let meter = Meter {
                    backend: p.pid(),
                    proxy: None,
                };
                rows.extend(bulk(&mut g, (GW, origin.port()), meter, bytes, label));
            }
        } else {
            println!(
                "(passt: set PASST=/path/to/passt built from its source to measure it as the peer)"
            );
        }
    }

    // Request/response latency. Each path against the same path from the host without the
    // backend: guest -> moat -> proxy -> origin against host -> proxy -> origin; guest ->
    // passt -> origin against host -> origin. "added" is what the backend (and the simulated
    // guest, the same for both) adds. MOAT_RR_RUNS runs (5), every path once per run in turn,
    // so a run's paths share that moment's noise: "added" is taken run by run, then its min /
    // median / max over the runs.
    if only.is_none_or(|o| o == "rr") {
        let rounds: usize = env_or("MOAT_RR_ROUNDS", 2000);
        let runs: usize = env_or("MOAT_RR_RUNS", 5).max(1);
        // The same with busy polling: moat's thread stays awake 200 us after each event.
        let busy = start_moat_with(tp.addr, 64, &["--busy-poll-us", "200"]);
        let mut gbusy = guest(&busy.socket, false);
        let abusy = gbusy.resolve_a("bench.example", T).expect("resolves");
        let mut passt = std::env::var_os("PASST").map(|p| {
            let p = start_passt(Path::new(&p));
            let g = guest(&p.socket, false);
            (p, g)
        });
        // Per path: (name, floor index, per-run (p50, p99)); floors first.
        let mut paths: Vec<(&str, usize, Vec<Pcts>)> = vec![
            ("host -> origin, loopback", 0, Vec::new()),
            ("host -> proxy -> origin, loopback", 1, Vec::new()),
            ("guest -> moat -> proxy -> origin", 1, Vec::new()),
            ("guest -> moat, busy poll -> proxy -> origin", 1, Vec::new()),
        ];
        if passt.is_some() {
            paths.push(("guest -> passt -> origin", 0, Vec::new()));
        }
        for _ in 0..runs {
            paths[0].2.push(rr_host(origin, false, rounds));
            paths[1].2.push(rr_host(tp.addr, true, rounds));
            paths[2].2.push(rr(&mut net, (addr, 80), rounds));
            paths[3].2.push(rr(&mut gbusy, (abusy, 80), rounds));
            if let Some((_, g)) = passt.as_mut() {
                paths[4].2.push(rr(g, (GW, origin.port()), rounds));
            }
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2], v[v.len() - 1])
        };
        for (name, floor, samples) in &paths {
            let floor = &paths[*floor].2;
            let p50 = med(samples.iter().map(|s| s.0).collect());
            let p99 = med(samples.iter().map(|s| s.1).collect());
            let add50 = med(samples.iter().zip(floor).map(|(s, f)| s.0 - f.0).collect());
            let add99 = med(samples.iter().zip(floor).map(|(s, f)| s.1 - f.1).collect());
            rows.push(Row {
                name: format!("rr p50/p99, {name}"),
                value: p50.1,
                unit: "us p50",
                moat_cpu_s: 0.0,
                path_cpu_s: 0.0,
                per: format!(
                    "p99 {:.1} us, added over the host path: p50 {:.1} p99 {:.1} us (medians of \
                     {runs} runs); added p50 min/median/max {:.1} / {:.1} / {:.1} us, p50 \
                     {:.1} / {:.1} / {:.1} us",
                    p99.1, add50.1, add99.1, add50.0, add50.1, add50.2, p50.0, p50.1, p50.2
                ),
            });
        }
    }

    // Connection setup: SYN -> CONNECT -> 200 -> SYN-ACK -> one echo -> close, against the
    // same loop from the host through the same proxy (connect, CONNECT, one echo, close): the
    // floor. MOAT_CONN_RUNS runs (5) of `conns` connections each, host then moat in each.
    if only.is_none_or(|o| o == "conn") {
        let runs: usize = env_or("MOAT_CONN_RUNS", 5).max(1);
        let meter = Meter {
            backend: pid,
            proxy: Some(&tp),
        };
        eprintln!("moat pid {pid}: connection loop");
        let (mut host_rate, mut moat_rate, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        let (mut cpu_moat, mut cpu_path) = (0.0, 0.0);
        let (mut t_connect, mut t_echo) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..runs {
            let t0 = Instant::now();
            for _ in 0..conns {
                conn_host(tp.addr);
            }
            let host = conns as f64 / t0.elapsed().as_secs_f64();
            let (cpu0, t0) = (meter.read(), Instant::now());
            for _ in 0..conns {
                let c0 = Instant::now();
                let h = connect(&mut net, (addr, 80));
                t_connect += c0.elapsed();
                let c1 = Instant::now();
                send(&mut net, h, b"Ex");
                await_echo(&mut net, h);
                t_echo += c1.elapsed();
                net.tcp(h).abort();
                net.poll(Duration::ZERO).unwrap();
                net.remove(h);
            }
            let (secs, cpu) = (t0.elapsed().as_secs_f64(), meter.since(cpu0, meter.read()));
            cpu_moat += cpu.0;
            cpu_path += cpu.1;
            let m = conns as f64 / secs;
            host_rate.push(host);
            moat_rate.push(m);
            ratio.push(m / host);
        }
        let total = (conns * runs) as f64;
        if std::env::var("MOAT_BENCH_DEBUG").is_ok() {
            eprintln!(
                "connect {:?} echo {:?} per conn",
                t_connect / total as u32,
                t_echo / total as u32
            );
        }
        let mmr = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2], v[v.len() - 1])
        };
        let (h, m, r) = (mmr(host_rate), mmr(moat_rate), mmr(ratio));
        rows.push(Row {
            name: "tcp connect+echo+close".into(),
            value: m.1,
            unit: "conn/s",
            moat_cpu_s: cpu_moat,
            path_cpu_s: cpu_path,
            per: format!(
                "{:.0} us CPU/conn moat, {:.0} whole path; host floor {:.0} conn/s; moat/host \
                 min/median/max {:.2} / {:.2} / {:.2} ({runs} runs)",
                cpu_moat / total * 1e6,
                cpu_path / total * 1e6,
                h.1,
                r.0,
                r.1,
                r.2
            ),
        });
    }

    let mut table = format!(
        "{:<58} {:>10} {:<8} {:>12} {:>12} {}\n",
        "figure", "value", "unit", "backend CPU", "path CPU s", "cost"
    );
    for r in &rows {
        table.push_str(&format!(
            "{:<58} {:>10.3} {:<8} {:>12.3} {:>12.3} {}\n",
            r.name, r.value, r.unit, r.moat_cpu_s, r.path_cpu_s, r.per
        ));
    }
    print!("{table}");
    println!("({mb} MiB each way, {conns} connections; load generator = simulated guest with smoltcp in the bench process)");
    println!(
        "(backend CPU = moat's or passt's own (schedstat); path CPU = moat + the CONNECT proxy \
         process (its process CPU clock, exited per-connection threads included) for moat \
         rows, passt alone for passt rows (no proxy hop); the origin and the guest are in \
         neither)"
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("egress_tcp.txt"), &table);
}
