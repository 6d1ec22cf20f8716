//! A sandbox-shaped job (issue 14): what `pip install` or `npm ci` does to the network, run
//! through moat and, as its peer, from the host through the same proxy, interleaved so that
//! both see the same noise of this shared machine.
//!
//! The job: 8 parallel keep-alive HTTP/1.1 clients fetch 400 objects of 2 - 200 KB (sizes
//! log-uniform, the same every run) from a loopback origin behind a CONNECT proxy, then a
//! burst of 200 short connections opened at once (one 2 KB object each, `Connection:
//! close`). Each run times both phases and the whole job.
//!
//! moat's side: the release moat (its own process), the simulated guest with a smoltcp stack
//! (this process) running the 8 clients, then the 200, as sockets of one stack; moat makes
//! the CONNECT. The host's side: the same clients as threads with kernel sockets (8, then
//! 200), each sending the CONNECT itself. The CONNECT proxy (a thread per connection, TCP_NODELAY,
//! a deep backlog: see `proxy_process_main`) runs in a process of its own (this bench binary re-run with
//! MOAT_BENCH_PROXY_TO=origin) and serves both sides; the origin is in this process.
//!
//! Run: `cargo bench --bench sandbox_job` (MOAT_JOB_RUNS=11 pairs of runs, host then moat).
//! Prints min / median / max of each side and of the per-run ratio, and writes the table to
//! target/bench/sandbox_job.txt. Target: moat / host <= 1.2 (completion time).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use moat_sim::bench::*;
use moat_sim::guest::{GuestNet, GuestOptions, SimGuest};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

const T: Duration = Duration::from_secs(300);
const CLIENTS: usize = 8;
const MIN_OBJ: usize = 2 * 1024;
const MAX_OBJ: usize = 200 * 1024;
const SHORT_OBJ: usize = 2 * 1024;

/// A loopback listener with a backlog deep enough for the burst: std's default of 128 drops
/// SYNs of 200 connections opened at once, and each dropped SYN costs a 1 s retransmit,
/// which would time the kernel's timer rather than the path.
fn listener() -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    s.listen(4096).unwrap();
    s.into()
}

/// The proxy process's side: a CONNECT proxy (thread per connection, like tinyproxy or
/// squid's per-connection work) that sends every name to `origin`. Unlike
/// tests/support/proxy.rs it sets TCP_NODELAY on both of its sockets, as real proxies do:
/// without it, the tail of each response waits on Nagle for the client's delayed ACK (~40
/// ms), and a keep-alive fetch would time that, on both sides alike. Serves until stdin
/// closes (the bench ended or died).
fn proxy_process_main(origin: &str) {
    let origin: SocketAddr = origin.parse().expect("MOAT_BENCH_PROXY_TO=ip:port");
    let l = listener();
    println!("{}", l.local_addr().unwrap());
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || proxy_conn(conn, origin));
        }
    });
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Read header lines up to the blank one: whether one was `Connection: close`; None if the
/// peer went before the end of the head.
fn skip_head(rd: &mut BufReader<TcpStream>) -> Option<bool> {
    let mut close = false;
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        if h == "\r\n" {
            return Some(close);
        }
        close |= h.eq_ignore_ascii_case("connection: close\r\n");
    }
}

fn proxy_conn(client: TcpStream, origin: SocketAddr) {
    let _ = client.set_nodelay(true);
    let mut rd = BufReader::new(client.try_clone().unwrap());
    if skip_head(&mut rd).is_none() {
        return;
    }
    let mut client = client;
    let Ok(up) = TcpStream::connect(origin) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    let mut up_w = up.try_clone().unwrap();
    let early = rd.buffer().to_vec();
    if !early.is_empty() && up_w.write_all(&early).is_err() {
        return;
    }
    let mut client_r = client.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        pump(&mut client_r, &mut up_w);
    });
    let mut up_r = up;
    pump(&mut up_r, &mut client);
    let _ = t.join();
}

/// Copy until end of stream, then pass the end on (FIN).
fn pump(from: &mut TcpStream, to: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A keep-alive HTTP/1.1 origin: `GET /N` answers N bytes (Content-Length), and closes after
/// the answer when the request says `Connection: close`. A thread per connection.
fn http_origin() -> SocketAddr {
    let listener = listener();
    let addr = listener.local_addr().unwrap();
    let body: Arc<[u8]> = (0..MAX_OBJ).map(|i| (i * 7 + i / 251) as u8).collect();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let body = Arc::clone(&body);
            std::thread::spawn(move || serve_http(conn, &body));
        }
    });
    addr
}

fn serve_http(conn: TcpStream, body: &[u8]) {
    let _ = conn.set_nodelay(true);
    let mut rd = BufReader::new(conn.try_clone().unwrap());
    let mut wr = conn;
    loop {
        let mut line = String::new();
        match rd.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Some(close) = skip_head(&mut rd) else {
            return;
        };
        let n = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.trim_start_matches('/').parse::<usize>().ok())
            .unwrap_or(0)
            .min(body.len());
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        reply.extend_from_slice(&body[..n]);
        if wr.write_all(&reply).is_err() || close {
            return;
        }
    }
}

/// The 400 object sizes, log-uniform in [2 KB, 200 KB], the same in every run (an LCG).
fn object_sizes(n: usize) -> Vec<usize> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            let (lo, hi) = ((MIN_OBJ as f64).ln(), (MAX_OBJ as f64).ln());
            (lo + u * (hi - lo)).exp() as usize
        })
        .collect()
}

fn request(size: usize, close: bool) -> Vec<u8> {
    format!(
        "GET /{size} HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: moat-bench\r\nAccept: */*\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Incremental parse of one response: head, then Content-Length bytes of body.
#[derive(Default)]
struct Response {
    head: Vec<u8>,
    body_len: Option<usize>,
    body_got: usize,
}

impl Response {
    /// Feed bytes; returns how many were consumed (a response ends at its last body byte).
    fn feed(&mut self, mut d: &[u8]) -> usize {
        let mut used = 0;
        if self.body_len.is_none() {
            for (i, b) in d.iter().enumerate() {
                self.head.push(*b);
                if self.head.ends_with(b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&self.head);
                    assert!(head.starts_with("HTTP/1.1 200"), "bad reply: {head}");
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .expect("Content-Length");
                    self.body_len = Some(len);
                    used = i + 1;
                    d = &d[i + 1..];
                    break;
                }
            }
            if self.body_len.is_none() {
                return d.len();
            }
        }
        let want = self.body_len.unwrap_or(0) - self.body_got;
        let k = want.min(d.len());
        self.body_got += k;
        used + k
    }

    fn done(&self) -> bool {
        self.body_len == Some(self.body_got)
    }
}

/// Timings of one run of the job (seconds).
#[derive(Clone, Copy, Default)]
struct Job {
    keepalive: f64,
    burst: f64,
}

impl Job {
    fn total(&self) -> f64 {
        self.keepalive + self.burst
    }
}

// ---- The host's side: kernel sockets through the proxy -------------------------------------

/// A connection from the host: through the proxy (CONNECT first) or straight to the origin.
fn host_connect(to: SocketAddr, via_proxy: bool) -> (BufReader<TcpStream>, TcpStream) {
    let c = TcpStream::connect(to).unwrap();
    c.set_nodelay(true).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    if !via_proxy {
        return (r, w);
    }
    w.write_all(b"CONNECT bench.example:80 HTTP/1.1\r\nHost: bench.example:80\r\n\r\n")
        .unwrap();
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "the proxy hung up");
    }
    (r, w)
}

fn host_fetch(r: &mut BufReader<TcpStream>, w: &mut TcpStream, size: usize, close: bool) {
    w.write_all(&request(size, close)).unwrap();
    let mut resp = Response::default();
    while !resp.done() {
        let buf = r.fill_buf().unwrap();
        assert!(!buf.is_empty(), "the stream ended early");
        let n = resp.feed(buf);
        r.consume(n);
    }
    assert_eq!(resp.body_got, size);
}

fn host_job(to: SocketAddr, via_proxy: bool, sizes: &[usize], burst: usize) -> Job {
    let t0 = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mine: Vec<usize> = sizes.iter().skip(i).step_by(CLIENTS).copied().collect();
            std::thread::spawn(move || {
                let (mut r, mut w) = host_connect(to, via_proxy);
                for s in mine {
                    host_fetch(&mut r, &mut w, s, false);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a keep-alive client failed");
    }
    let keepalive = t0.elapsed().as_secs_f64();
    // The burst: every connection's thread is ready before the clock starts.
    let go = Arc::new(Barrier::new(burst + 1));
    let threads: Vec<_> = (0..burst)
        .map(|_| {
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                go.wait();
                let (mut r, mut w) = host_connect(to, via_proxy);
                host_fetch(&mut r, &mut w, SHORT_OBJ, true);
                // The server closes after the answer: read to its FIN, then close.
                let mut rest = Vec::new();
                let _ = r.read_to_end(&mut rest);
            })
        })
        .collect();
    go.wait();
    let t1 = Instant::now();
    for t in threads {
        t.join().expect("a short connection failed");
    }
    Job {
        keepalive,
        burst: t1.elapsed().as_secs_f64(),
    }
}

// ---- moat's side: the simulated guest's sockets --------------------------------------------

enum Phase {
    /// Waiting for the handshake (moat's CONNECT to the proxy included).
    Connecting,
    /// Sending the request `req[off..]`.
    Sending {
        req: Vec<u8>,
        off: usize,
    },
    /// Reading the response.
    Reading(Response),
    /// Short connection: the response is in, waiting for the server's FIN.
    Draining,
    /// Closed on our side (FIN sent), waiting for the socket to finish.
    Closing,
    Done,
}

struct Client {
    h: SocketHandle,
    todo: std::vec::IntoIter<usize>,
    close: bool,
    phase: Phase,
}

impl Client {
    fn next_request(&mut self) -> Phase {
        match self.todo.next() {
            Some(s) => Phase::Sending {
                req: request(s, self.close),
                off: 0,
            },
            None => Phase::Closing,
        }
    }

    /// Advance as far as the socket allows; true once finished.
    fn step(&mut self, net: &mut GuestNet) -> bool {
        loop {
            let s = net.tcp(self.h);
            let next = match &mut self.phase {
                Phase::Connecting => {
                    if s.state() != State::Established {
                        assert!(
                            matches!(s.state(), State::SynSent | State::SynReceived),
                            "connection refused ({})",
                            s.state()
                        );
                        return false;
                    }
                    self.next_request()
                }
                Phase::Sending { req, off } => {
                    if let Ok(k) = s.send_slice(&req[*off..]) {
                        *off += k;
                    }
                    if *off < req.len() {
                        return false;
                    }
                    Phase::Reading(Response::default())
                }
                Phase::Reading(resp) => {
                    while !resp.done() && s.can_recv() {
                        let _ = s.recv(|d| {
                            let n = resp.feed(d);
                            (n, ())
                        });
                    }
                    if !resp.done() {
                        assert!(s.may_recv(), "the stream ended early");
                        return false;
                    }
                    if self.close {
                        Phase::Draining
                    } else {
                        self.next_request()
                    }
                }
                Phase::Draining => {
                    while s.can_recv() {
                        let _ = s.recv(|d| (d.len(), ()));
                    }
                    if s.may_recv() {
                        return false;
                    }
                    Phase::Closing
                }
                Phase::Closing => {
                    s.close();
                    if !matches!(s.state(), State::Closed | State::TimeWait) {
                        return false;
                    }
                    Phase::Done
                }
                Phase::Done => return true,
            };
            self.phase = next;
        }
    }
}

/// Run clients (one socket each, all in one stack) until all are done.
fn run_clients(net: &mut GuestNet, to: (Ipv4Addr, u16), work: Vec<(Vec<usize>, bool)>) {
    let mut clients: Vec<Client> = work
        .into_iter()
        .map(|(sizes, close)| Client {
            h: net.tcp_connect(to.0, to.1),
            todo: sizes.into_iter(),
            close,
            phase: Phase::Connecting,
        })
        .collect();
    let done = net
        .run_until(T, |n| {
            let mut all = true;
            for c in clients.iter_mut() {
                all &= c.step(n);
            }
            all
        })
        .unwrap();
    assert!(done, "the job did not finish in {T:?}");
    for c in clients {
        net.remove(c.h);
    }
}

fn guest_job(net: &mut GuestNet, to: (Ipv4Addr, u16), sizes: &[usize], burst: usize) -> Job {
    let t0 = Instant::now();
    let work = (0..CLIENTS)
        .map(|i| {
            let mine = sizes.iter().skip(i).step_by(CLIENTS).copied().collect();
            (mine, false)
        })
        .collect();
    run_clients(net, to, work);
    let keepalive = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    run_clients(net, to, vec![(vec![SHORT_OBJ], true); burst]);
    Job {
        keepalive,
        burst: t1.elapsed().as_secs_f64(),
    }
}

/// CPU time of the calling thread (ns): the simulated guest's stack runs on this thread, the
/// origin's connections on others.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the variable we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn attach(socket: &Path) -> GuestNet {
    let opts = GuestOptions {
        offloads: true,
        queue_size: 1024,
        mem_size: 64 << 20,
        ..GuestOptions::default()
    };
    let sim = SimGuest::connect(socket, opts).expect("attach the simulated guest");
    GuestNet::new(sim, MAC, GUEST, 24, GW, 1500)
}

/// One way of running the job and its timings over the runs.
struct Side {
    name: &'static str,
    jobs: Vec<Job>,
    /// The backend's CPU per job (s), and the simulated guest's stack's (this thread).
    cpu: Vec<f64>,
    guest_cpu: Vec<f64>,
}

impl Side {
    fn new(name: &'static str) -> Side {
        Side {
            name,
            jobs: Vec::new(),
            cpu: Vec::new(),
            guest_cpu: Vec::new(),
        }
    }
}

/// A guest-side run: the job through `backend` (pid), its CPU and the guest stack's.
fn guest_run(
    side: &mut Side,
    net: &mut GuestNet,
    to: (Ipv4Addr, u16),
    pid: u32,
    work: (&[usize], usize),
) {
    let (c0, g0) = (cpu_ns(pid), thread_cpu_ns());
    let j = guest_job(net, to, work.0, work.1);
    side.cpu.push(cpu_ns(pid).saturating_sub(c0) as f64 / 1e9);
    side.guest_cpu
        .push(thread_cpu_ns().saturating_sub(g0) as f64 / 1e9);
    side.jobs.push(j);
}

/// One timed part of the job.
type Part = fn(&Job) -> f64;

fn fmt3(s: (f64, f64, f64)) -> String {
    format!("{:.3} / {:.3} / {:.3}", s.0, s.1, s.2)
}

fn main() {
    if let Ok(origin) = std::env::var(PROXY_TO_ENV) {
        return proxy_process_main(&origin);
    }
    let runs: usize = env_or("MOAT_JOB_RUNS", 11).max(1);
    let objects: usize = env_or("MOAT_JOB_OBJECTS", 400);
    let burst: usize = env_or("MOAT_JOB_BURST", 200);
    raise_nofile(8192);
    let sizes = object_sizes(objects);
    let total_bytes: usize = sizes.iter().sum::<usize>() + burst * SHORT_OBJ;
    let warm = (&sizes[..sizes.len().min(40)], burst.min(20));
    let work = (&sizes[..], burst);

    let origin = http_origin();
    let tp = ProxyProcess::start(origin);
    let moat = start_moat(tp.addr, 8192);
    let mut net = attach(&moat.socket);
    let addr = net.resolve_a("bench.example", T).expect("resolves");
    // The reference: passt (PASST=/path/to/passt, built from its public source), the same
    // simulated guest straight to the origin through passt's NAT, against the host straight
    // to the origin.
    let passt = std::env::var_os("PASST").map(|p| start_passt(Path::new(&p)));
    let mut pnet = passt.as_ref().map(|p| attach(&p.socket));

    // One warm-up job each (page cache, proxy threads, allocations), not counted.
    host_job(tp.addr, true, warm.0, warm.1);
    guest_job(&mut net, (addr, 80), warm.0, warm.1);
    if let Some(pn) = pnet.as_mut() {
        host_job(origin, false, warm.0, warm.1);
        guest_job(pn, (GW, origin.port()), warm.0, warm.1);
    }

    let mut host = Side::new("host -> proxy -> origin");
    let mut through = Side::new("guest -> moat -> proxy -> origin");
    let mut direct = Side::new("host -> origin");
    let mut via_passt = Side::new("guest -> passt -> origin");
    for run in 0..runs {
        host.jobs.push(host_job(tp.addr, true, work.0, work.1));
        guest_run(&mut through, &mut net, (addr, 80), moat.pid(), work);
        if let (Some(pn), Some(p)) = (pnet.as_mut(), passt.as_ref()) {
            direct.jobs.push(host_job(origin, false, work.0, work.1));
            guest_run(&mut via_passt, pn, (GW, origin.port()), p.pid(), work);
        }
        let last = |s: &Side| s.jobs.last().map_or(0.0, Job::total);
        eprintln!(
            "run {run}: host via proxy {:.3} s, moat {:.3} s (its CPU {:.3} s, guest stack {:.3} s){}",
            last(&host),
            last(&through),
            through.cpu.last().copied().unwrap_or(0.0),
            through.guest_cpu.last().copied().unwrap_or(0.0),
            if passt.is_some() {
                format!(", host direct {:.3} s, passt {:.3} s", last(&direct), last(&via_passt))
            } else {
                String::new()
            }
        );
    }

    // "figure | path | s | peer path | peer s | ratio", each "min / median / max" over the
    // runs, the ratio taken run by run (both sides of a run saw the same moment's noise).
    let mut table = String::from(
        "figure | path | s, min / median / max | peer | peer s | ratio per run, min / median / max\n",
    );
    let parts: [(&str, Part); 3] = [
        ("job total", Job::total),
        ("8 keep-alive clients, 400 objects", |j| j.keepalive),
        ("200 short connections at once", |j| j.burst),
    ];
    // moat against passt too: the same simulated guest on both, so its stack's cost (which
    // the host paths do not carry) is on both sides; passt's path has no proxy hop.
    let mut pairs = vec![(&through, &host, true)];
    if passt.is_some() {
        pairs.push((&via_passt, &direct, true));
        pairs.push((&through, &via_passt, false));
    }
    for (side, peer, cpu_rows) in pairs {
        for (name, f) in parts {
            let r = stats(
                side.jobs
                    .iter()
                    .zip(&peer.jobs)
                    .map(|(a, b)| f(a) / f(b))
                    .collect(),
            );
            table.push_str(&format!(
                "{name} | {} | {} | {} | {} | {}\n",
                side.name,
                fmt3(stats(side.jobs.iter().map(f).collect())),
                peer.name,
                fmt3(stats(peer.jobs.iter().map(f).collect())),
                fmt3(r)
            ));
        }
        if !cpu_rows {
            continue;
        }
        table.push_str(&format!(
            "backend CPU per job | {} | {} | - | - | -\n",
            side.name,
            fmt3(stats(side.cpu.clone()))
        ));
        table.push_str(&format!(
            "simulated guest stack CPU per job | {} | {} | - | - | -\n",
            side.name,
            fmt3(stats(side.guest_cpu.clone()))
        ));
    }
    print!("{table}");
    println!(
        "({runs} runs, the paths interleaved in each; {objects} objects {:.1} MiB + {burst} x \
         {SHORT_OBJ} B; guest = the simulated guest (smoltcp, this process's main thread); the \
         proxy is a process of its own; passt: {})",
        total_bytes as f64 / (1 << 20) as f64,
        if passt.is_some() {
            "PASST"
        } else {
            "not run (set PASST=/path/to/passt)"
        }
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("sandbox_job.txt"), &table);
}
