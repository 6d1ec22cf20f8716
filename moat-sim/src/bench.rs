//! What the benchmarks share: the simulated guest's addresses, the moat child process, and
//! CPU time read from schedstat.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::fixtures::{vm_net, GUEST, GW};
/// The benchmark VM's MAC (the test VM's).
pub const MAC: crate::Mac = crate::fixtures::GUEST_MAC;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds on CPU of every thread of `pid` (/proc/PID/task/*/schedstat: top and
/// /proc/PID/stat read wrong in these VMs).
pub fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Nanoseconds on CPU of the whole process `pid`, threads that already exited included: its
/// process CPU clock (`clock_getcpuclockid`), the same scheduler runtime schedstat reports.
/// `cpu_ns` reads only live threads, so it misses a thread-per-connection process's
/// finished connections (the bench's CONNECT proxy); moat's threads live as long as it does.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes one clockid_t into the variable we own; an unknown
    // pid is an error code, handled below.
    if unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) } != 0 {
        return 0;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the variable we own.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A child process (moat, or a peer) serving a vhost-user socket; killed when dropped.
pub struct Moat {
    pub child: Child,
    pub _dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Drop for Moat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moat {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The release moat serving a policy that allows TCP to bench.example:80 through `proxy`.
pub fn start_moat(proxy: SocketAddr, max_flows: usize) -> Moat {
    start_moat_with(proxy, max_flows, &[])
}

/// `start_moat` with more `moat serve` options (`--busy-poll-us 200`, `--queues 2`).
pub fn start_moat_with(proxy: SocketAddr, max_flows: usize, options: &[&str]) -> Moat {
    start_moat_policy(
        &format!(
            "[vm]\nname = \"bench\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n\
             [proxy]\nhttp = \"{proxy}\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80]\nto = [\"bench.example\"]\n\
             [dns]\nallow = [\"bench.example\"]\n[limits]\nmax_flows = {max_flows}\n"
        ),
        options,
    )
}

/// The release moat serving `policy` (text), with more `moat serve` options.
pub fn start_moat_policy(policy_text: &str, options: &[&str]) -> Moat {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("moat.sock");
    let policy = dir.path().join("bench.toml");
    std::fs::write(&policy, policy_text).unwrap();
    // MOAT_BENCH_BIN: another moat binary (an older build, for a before/after run).
    let bin = std::env::var("MOAT_BENCH_BIN").unwrap_or_else(|_| crate::process::moat_bin().into());
    let child = Command::new(bin)
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--policy")
        .arg(&policy)
        .args(options)
        .env(
            "MOAT_LOG",
            std::env::var("MOAT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
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

/// Raise RLIMIT_NOFILE (soft and, as root, hard) so this process and the moat children it
/// starts can hold many sockets. Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let both = libc::rlimit {
        rlim_cur: want.max(lim.rlim_cur),
        rlim_max: want.max(lim.rlim_max),
    };
    // SAFETY: setrlimit reads the rlimit we own; a refusal is an error code, handled below.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &both) } != 0 {
        // Not allowed to raise the hard limit: take what it allows.
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    }
    // SAFETY: as the first call.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

/// The env variable under which a bench binary re-run by [`ProxyProcess::start`] finds its
/// origin: the bench's `main` serves as the proxy when it is set.
pub const PROXY_TO_ENV: &str = "MOAT_BENCH_PROXY_TO";

/// The CONNECT proxy in a process of its own (this bench binary, re-run with
/// [`PROXY_TO_ENV`] set), so that its CPU can be read apart from the load generator's.
/// Killed when dropped.
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl ProxyProcess {
    /// Re-run this bench binary as the proxy for `origin`; it prints its address and serves
    /// until its stdin closes.
    pub fn start(origin: SocketAddr) -> ProxyProcess {
        let mut child = Command::new(std::env::current_exe().expect("the bench binary"))
            .env(PROXY_TO_ENV, origin.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the proxy process");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the proxy's address");
        let addr = line.trim().parse().expect("the proxy prints its address");
        ProxyProcess { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU of the proxy process so far, every thread it ever ran included.
    pub fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.pid())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// passt in vhost-user mode, foreground, the guest's address and gateway given (nothing to
/// copy from a host without a default route), the gateway mapped to the host's loopback: the
/// guest reaches a loopback origin at (GW, its port) with no proxy hop.
pub fn start_passt(passt: &Path) -> Moat {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("passt.sock");
    let child = Command::new(passt)
        .args(["--vhost-user", "-f", "-q", "-s"])
        .arg(&socket)
        .args(["-a", "10.0.0.2", "-n", "24", "-g", "10.0.0.1"])
        .args([
            "--map-host-loopback",
            "10.0.0.1",
            "-t",
            "none",
            "-u",
            "none",
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("start passt");
    let end = Instant::now() + Duration::from_secs(30);
    while !socket.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    Moat {
        child,
        _dir: dir,
        socket,
    }
}
