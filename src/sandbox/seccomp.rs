//! seccomp: the system calls `moat serve` makes once set up, and nothing else.
//!
//! The list was taken from `strace -f` of moat under its whole test suite (QEMU and
//! dpdk-testpmd frontends, egress through tinyproxy and dante, reloads, forwards, metrics
//! scrapes, floods) and each entry says why moat needs it. A call outside the list kills
//! the process (SIGSYS): a compromised moat cannot exec a shell, ptrace, mount, open raw or
//! netlink sockets, load modules or change credentials. `--no-sandbox` turns it off.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::SandboxError;

/// Allowed without conditions, with the reason.
const ALLOWED: &[(libc::c_long, &str, &str)] = &[
    // Memory: the allocator, thread stacks, and the guest memory regions the VMM hands
    // over as file descriptors (mapped on SET_MEM_TABLE, unmapped on reset).
    (libc::SYS_brk, "brk", "allocator"),
    (
        libc::SYS_mmap,
        "mmap",
        "allocator, thread stacks, guest memory regions",
    ),
    (
        libc::SYS_munmap,
        "munmap",
        "allocator, guest memory regions on reset",
    ),
    (libc::SYS_mremap, "mremap", "allocator (growing buffers)"),
    (libc::SYS_mprotect, "mprotect", "thread stack guard pages"),
    (libc::SYS_madvise, "madvise", "allocator returning memory"),
    // Threads: one vring worker per connection, the signal, control and metrics threads.
    (libc::SYS_futex, "futex", "locks and thread join"),
    (
        libc::SYS_set_robust_list,
        "set_robust_list",
        "new threads (glibc)",
    ),
    (libc::SYS_rseq, "rseq", "new threads (glibc)"),
    (libc::SYS_sched_yield, "sched_yield", "spin locks"),
    (
        libc::SYS_sched_getaffinity,
        "sched_getaffinity",
        "std::thread::available_parallelism",
    ),
    (libc::SYS_gettid, "gettid", "tracing thread ids"),
    (libc::SYS_getpid, "getpid", "tracing, signal delivery"),
    (libc::SYS_exit, "exit", "thread exit"),
    (libc::SYS_exit_group, "exit_group", "process exit"),
    (
        libc::SYS_rt_sigprocmask,
        "rt_sigprocmask",
        "new threads block signals (glibc)",
    ),
    (libc::SYS_rt_sigaction, "rt_sigaction", "signal-hook"),
    (
        libc::SYS_rt_sigreturn,
        "rt_sigreturn",
        "return from the SIGTERM/SIGHUP handler",
    ),
    (
        libc::SYS_sigaltstack,
        "sigaltstack",
        "Rust's stack-overflow handler on new threads",
    ),
    (
        libc::SYS_getrandom,
        "getrandom",
        "hash map seeds, smoltcp initial sequence numbers",
    ),
    (
        libc::SYS_clock_gettime,
        "clock_gettime",
        "time (when the vDSO is not used)",
    ),
    (
        libc::SYS_clock_nanosleep,
        "clock_nanosleep",
        "thread::sleep (control socket, metrics)",
    ),
    (libc::SYS_nanosleep, "nanosleep", "thread::sleep"),
    // File descriptors: vhost-user messages, eventfds, timerfds, sockets.
    (
        libc::SYS_read,
        "read",
        "eventfds, timerfds, sockets, the policy file on reload",
    ),
    (
        libc::SYS_write,
        "write",
        "eventfds (guest notifications), sockets, logs to stderr",
    ),
    (libc::SYS_readv, "readv", "sockets"),
    (libc::SYS_writev, "writev", "sockets, logs"),
    (libc::SYS_close, "close", "every descriptor"),
    (
        libc::SYS_fcntl,
        "fcntl",
        "close-on-exec and non-blocking flags (std, vhost)",
    ),
    (
        libc::SYS_ioctl,
        "ioctl",
        "FIONBIO on sockets (std set_nonblocking)",
    ),
    (
        libc::SYS_openat,
        "openat",
        "the policy file on reload (Landlock limits where)",
    ),
    (
        libc::SYS_newfstatat,
        "newfstatat",
        "std::fs metadata (reload, socket removal)",
    ),
    (libc::SYS_statx, "statx", "std::fs metadata"),
    (
        libc::SYS_fstat,
        "fstat",
        "std::fs::read_to_string sizes the buffer",
    ),
    (libc::SYS_lseek, "lseek", "std::fs reads"),
    (
        libc::SYS_unlink,
        "unlink",
        "removing moat's own sockets on exit (Landlock limits where)",
    ),
    (
        libc::SYS_unlinkat,
        "unlinkat",
        "removing moat's own sockets on exit (Landlock limits where)",
    ),
    (
        libc::SYS_dup,
        "dup",
        "vhost-user backend duplicates queue eventfds",
    ),
    (libc::SYS_pipe2, "pipe2", "signal-hook's self-pipe"),
    (
        libc::SYS_epoll_create1,
        "epoll_create1",
        "one epoll set per vring worker",
    ),
    (
        libc::SYS_epoll_ctl,
        "epoll_ctl",
        "proxy sockets and timers join the worker's epoll set",
    ),
    (libc::SYS_epoll_wait, "epoll_wait", "the event loop"),
    (libc::SYS_epoll_pwait, "epoll_pwait", "the event loop"),
    (libc::SYS_poll, "poll", "blocking socket I/O with a timeout"),
    (
        libc::SYS_ppoll,
        "ppoll",
        "blocking socket I/O with a timeout",
    ),
    (libc::SYS_eventfd2, "eventfd2", "vring worker exit event"),
    (
        libc::SYS_timerfd_create,
        "timerfd_create",
        "flow idle and pacing timers",
    ),
    (
        libc::SYS_timerfd_settime,
        "timerfd_settime",
        "flow idle and pacing timers",
    ),
    (
        libc::SYS_timerfd_gettime,
        "timerfd_gettime",
        "flow idle and pacing timers",
    ),
    // Sockets: vhost-user (unix), the proxies and DNS upstream (TCP/UDP, Landlock limits
    // TCP ports), forwards and the control and metrics sockets (accept).
    (
        libc::SYS_connect,
        "connect",
        "proxies, DNS upstream, --client to the VMM",
    ),
    (
        libc::SYS_accept,
        "accept",
        "vhost-user, control, metrics, forwards",
    ),
    (
        libc::SYS_accept4,
        "accept4",
        "vhost-user, control, metrics, forwards",
    ),
    (
        libc::SYS_bind,
        "bind",
        "run-time forwards; SOCKS5 UDP relay sockets",
    ),
    (libc::SYS_listen, "listen", "run-time forwards"),
    (
        libc::SYS_shutdown,
        "shutdown",
        "half-close propagated between guest and proxy",
    ),
    (
        libc::SYS_setsockopt,
        "setsockopt",
        "TCP_NODELAY, timeouts, buffer sizes",
    ),
    (
        libc::SYS_getsockopt,
        "getsockopt",
        "SO_ERROR after a non-blocking connect",
    ),
    (
        libc::SYS_getsockname,
        "getsockname",
        "local addresses (SOCKS5 UDP relay)",
    ),
    (
        libc::SYS_getpeername,
        "getpeername",
        "forward peers (loopback check)",
    ),
    (libc::SYS_sendto, "sendto", "sockets"),
    (libc::SYS_recvfrom, "recvfrom", "sockets"),
    (libc::SYS_sendmsg, "sendmsg", "vhost-user replies, UDP"),
    (
        libc::SYS_sendmmsg,
        "sendmmsg",
        "a batch of guest UDP datagrams to the SOCKS5 relay in one call",
    ),
    (
        libc::SYS_recvmsg,
        "recvmsg",
        "vhost-user messages with file descriptors",
    ),
];

/// `socket()` only for unix, TCP and UDP: no raw, packet or netlink sockets.
fn socket_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let mut rules = Vec::new();
    for (domain, kind) in [
        (libc::AF_UNIX, libc::SOCK_STREAM),
        (libc::AF_INET, libc::SOCK_STREAM),
        (libc::AF_INET, libc::SOCK_DGRAM),
        (libc::AF_INET6, libc::SOCK_STREAM),
        (libc::AF_INET6, libc::SOCK_DGRAM),
    ] {
        rules.push(SeccompRule::new(vec![
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, domain as u64)?,
            // The type's low bits; SOCK_CLOEXEC and SOCK_NONBLOCK ride above them.
            SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xf),
                kind as u64,
            )?,
        ])?);
    }
    Ok(rules)
}

/// `clone()` only for threads (CLONE_THREAD set): no new processes.
fn clone_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )?])?])
}

/// `prctl()` only to name threads.
fn prctl_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::PR_SET_NAME as u64,
    )?])?])
}

/// The allow-list as BPF: match = allow, anything else kills the process.
pub fn allow_list() -> Result<BpfProgram, SandboxError> {
    let build = || -> Result<BpfProgram, seccompiler::Error> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            ALLOWED.iter().map(|&(nr, _, _)| (nr, Vec::new())).collect();
        rules.insert(libc::SYS_socket, socket_rules()?);
        rules.insert(libc::SYS_clone, clone_rules()?);
        rules.insert(libc::SYS_prctl, prctl_rules()?);
        // clone3 passes its flags in memory, where seccomp cannot look: it is allowed here
        // and answered ENOSYS by `clone3_enosys`, so glibc falls back to clone (as
        // Firecracker does).
        rules.insert(libc::SYS_clone3, Vec::new());
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            std::env::consts::ARCH.try_into()?,
        )?;
        filter.try_into().map_err(seccompiler::Error::from)
    };
    build().map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// A second filter: clone3 gets ENOSYS, everything else passes on to the allow-list.
fn clone3_enosys() -> Result<BpfProgram, SandboxError> {
    let build = || -> Result<BpfProgram, seccompiler::Error> {
        let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            std::env::consts::ARCH.try_into()?,
        )?;
        filter.try_into().map_err(seccompiler::Error::from)
    };
    build().map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// Install both filters on every thread of the process (TSYNC). The allow-list goes last:
/// once it is in, not even seccomp() itself is allowed.
pub fn install() -> Result<(), SandboxError> {
    for program in [clone3_enosys()?, allow_list()?] {
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// The allowed calls and why, as a table (`moat sandbox`).
pub fn listing() -> String {
    let mut rows: Vec<(&str, &str)> = ALLOWED.iter().map(|&(_, name, why)| (name, why)).collect();
    rows.extend([
        (
            "socket",
            "unix, TCP and UDP sockets only (no raw, packet, netlink)",
        ),
        ("clone", "threads only (CLONE_THREAD)"),
        ("clone3", "answered ENOSYS: glibc falls back to clone"),
        ("prctl", "PR_SET_NAME only (thread names)"),
    ]);
    let mut out = format!("{:<20} {}\n", "syscall", "why moat needs it");
    for (name, why) in rows {
        out.push_str(&format!("{name:<20} {why}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_architecture() {
        assert!(allow_list().unwrap().len() > ALLOWED.len());
        assert!(!clone3_enosys().unwrap().is_empty());
    }

    #[test]
    fn no_call_is_listed_twice() {
        let mut seen = std::collections::BTreeSet::new();
        for (nr, _, _) in ALLOWED {
            assert!(seen.insert(nr), "syscall {nr} listed twice");
        }
    }
}
