//! TCP through moat, guest <-> proxy: bulk throughput both ways, connection setup rate, and
//! moat's CPU per gigabit. The load generator is the simulated guest with a smoltcp stack
//! (in this process); moat is the real binary (its own process, so its CPU is its own); the
//! proxy is a minimal CONNECT endpoint on loopback in front of a loopback sink/source.
//!
//! Run: `cargo bench --bench egress_tcp` (MOAT_BENCH_MB=256 by default). Prints a table and
//! writes the raw numbers to target/bench/egress_tcp.txt.

#[path = "../tests/support/proxy.rs"]
#[allow(dead_code)]
mod proxy;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat::guest::{GuestNet, GuestOptions, SimGuest};
use smoltcp::iface::SocketHandle;

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const T: Duration = Duration::from_secs(120);

/// Nanoseconds on CPU of every thread of `pid` (/proc/PID/task/*/schedstat: top and
/// /proc/PID/stat read wrong in these VMs).
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

struct Moat {
    child: Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Drop for Moat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moat(proxy: std::net::SocketAddr) -> Moat {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let policy = dir.path().join("bench.toml");
    std::fs::write(
        &policy,
        format!(
            "[vm]\nname = \"bench\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
             [proxy]\nhttp = \"{proxy}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"bench.example\"]\n\
             [dns]\nallow = [\"bench.example\"]\n[limits]\nmax_flows = 8192\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--policy")
        .arg(&policy)
        .env(
            "MOAT_LOG",
            std::env::var("MOAT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(if std::env::var("MOAT_BENCH_DEBUG").is_ok() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start moat");
    Moat {
        child,
        _dir: dir,
        socket,
    }
}

fn guest(socket: &Path, offloads: bool) -> GuestNet {
    let opts = GuestOptions {
        offloads,
        queue_size: 1024,
        mem_size: 64 << 20,
        ..GuestOptions::default()
    };
    let sim = SimGuest::connect(socket, opts).expect("attach the simulated guest");
    GuestNet::new(sim, MAC, GUEST, 24, GW, 1500)
}

fn connect(net: &mut GuestNet, addr: Ipv4Addr) -> SocketHandle {
    net.tcp_established(addr, 80, T).unwrap().expect("connect")
}

fn send(net: &mut GuestNet, h: SocketHandle, data: &[u8]) {
    assert!(net.tcp_send_all(h, data, T).unwrap());
}

struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    moat_cpu_s: f64,
    per: String,
}

/// Bulk TCP both ways through one moat: guest -> proxy, then proxy -> guest.
fn bulk(net: &mut GuestNet, addr: Ipv4Addr, pid: u32, bytes: u64, label: &str) -> Vec<Row> {
    let net = &mut *net;
    let mut out = Vec::new();
    // Guest -> proxy bulk.
    let h = connect(net, addr);
    send(net, h, b"U");
    let chunk = proxy::pattern(0, 256 * 1024);
    let (cpu0, t0) = (cpu_ns(pid), Instant::now());
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
        while s.can_recv() {
            let _ = s.recv(|d| {
                reply.extend_from_slice(d);
                (d.len(), ())
            });
        }
        reply.len() >= 16
    })
    .unwrap();
    let (secs, cpu) = (
        t0.elapsed().as_secs_f64(),
        (cpu_ns(pid) - cpu0) as f64 / 1e9,
    );
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
        moat_cpu_s: cpu,
        per: format!("{:.2} CPU-s/Gbit", cpu / (bytes as f64 * 8.0 / 1e9)),
    });

    // Proxy -> guest bulk.
    let h = connect(net, addr);
    let mut req = b"B".to_vec();
    req.extend_from_slice(&bytes.to_be_bytes());
    send(net, h, &req);
    let (cpu0, t0) = (cpu_ns(pid), Instant::now());
    let mut got = 0u64;
    net.run_until(T, |n| {
        let s = n.tcp(h);
        while s.can_recv() {
            let _ = s.recv(|d| {
                got += d.len() as u64;
                (d.len(), ())
            });
        }
        got >= bytes
    })
    .unwrap();
    let (secs, cpu) = (
        t0.elapsed().as_secs_f64(),
        (cpu_ns(pid) - cpu0) as f64 / 1e9,
    );
    assert_eq!(got, bytes);
    net.tcp(h).abort();
    let gbit = bytes as f64 * 8.0 / secs / 1e9;
    out.push(Row {
        name: format!("tcp proxy->guest, {label}"),
        value: gbit,
        unit: "Gbit/s",
        moat_cpu_s: cpu,
        per: format!("{:.2} CPU-s/Gbit", cpu / (bytes as f64 * 8.0 / 1e9)),
    });

    out
}

fn main() {
    let mb: u64 = std::env::var("MOAT_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let conns: usize = std::env::var("MOAT_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let bytes = mb << 20;
    let origin = proxy::origin();
    let tp = proxy::TestProxy::start(proxy::ProxyMode::Accept, origin);
    let moat = start_moat(tp.addr);
    let mut net = guest(&moat.socket, true);
    let addr = net.resolve("bench.example", T).unwrap().expect("resolves");
    let pid = moat.child.id();
    let mut rows = Vec::new();

    for (offloads, label) in [(false, "1500 B frames"), (true, "TSO/CSUM")] {
        let m = start_moat(tp.addr);
        let mut g = guest(&m.socket, offloads);
        let a = g.resolve("bench.example", T).unwrap().expect("resolves");
        rows.extend(bulk(&mut g, a, m.child.id(), bytes, label));
    }

    // Connection setup: SYN -> CONNECT -> 200 -> SYN-ACK -> one echo -> close.
    let (cpu0, t0) = (cpu_ns(pid), Instant::now());
    let (mut t_connect, mut t_echo) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..conns {
        let c0 = Instant::now();
        let h = connect(&mut net, addr);
        t_connect += c0.elapsed();
        let c1 = Instant::now();
        send(&mut net, h, b"Ex");
        let mut echoed = false;
        net.run_until(T, |n| {
            let s = n.tcp(h);
            if s.can_recv() {
                let _ = s.recv(|d| (d.len(), ()));
                echoed = true;
            }
            echoed
        })
        .unwrap();
        t_echo += c1.elapsed();
        net.tcp(h).abort();
        net.poll(Duration::ZERO).unwrap();
        net.remove(h);
    }
    if std::env::var("MOAT_BENCH_DEBUG").is_ok() {
        eprintln!(
            "connect {:?} echo {:?} per conn",
            t_connect / conns as u32,
            t_echo / conns as u32
        );
    }
    let (secs, cpu) = (
        t0.elapsed().as_secs_f64(),
        (cpu_ns(pid) - cpu0) as f64 / 1e9,
    );
    rows.push(Row {
        name: "tcp connect+echo+close".into(),
        value: conns as f64 / secs,
        unit: "conn/s",
        moat_cpu_s: cpu,
        per: format!("{:.0} us CPU/conn", cpu / conns as f64 * 1e6),
    });

    let mut table = format!(
        "{:<34} {:>10} {:<8} {:>12} {}\n",
        "figure", "value", "unit", "moat CPU s", "moat cost"
    );
    for r in &rows {
        table.push_str(&format!(
            "{:<34} {:>10.3} {:<8} {:>12.3} {}\n",
            r.name, r.value, r.unit, r.moat_cpu_s, r.per
        ));
    }
    print!("{table}");
    println!("({mb} MiB each way, {conns} connections; load generator = simulated guest with smoltcp in the bench process)");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("egress_tcp.txt"), &table);
}
