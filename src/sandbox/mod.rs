//! The process sandbox of `moat serve`: once moat has read its policy and bound its
//! sockets, it gives up what a compromised moat could use against the host.
//!
//! - [`landlock`]: the filesystem shrinks to the policy's directory (read, for reloads)
//!   and the directories of moat's own sockets (create and remove them); TCP connects shrink
//!   to the proxy and DNS upstream ports; abstract unix sockets and signals to processes
//!   outside the sandbox are refused. Applied before moat starts any thread, so every
//!   thread inherits it.
//! - [`seccomp`]: an allow-list of the system calls moat makes (the list, with why each is
//!   needed, is in that module); anything else kills the process. Applied to every thread
//!   once setup is over.
//!
//! `moat serve --no-sandbox` turns both off, for debugging (strace, gdb, a new syscall).

pub mod landlock;
pub mod seccomp;

use std::path::PathBuf;

/// Why the sandbox could not be set up. moat refuses to serve unsandboxed unless asked to
/// (`--no-sandbox`).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("landlock: {0} (run with --no-sandbox to serve without it)")]
    Landlock(String),
    #[error("seccomp: {0} (run with --no-sandbox to serve without it)")]
    Seccomp(String),
}

/// What moat still needs of the filesystem and network once sandboxed.
#[derive(Debug, Default, Clone)]
pub struct Needs {
    /// Files read again later (the policy, on reload): their directories become readable,
    /// so an editor's write-and-rename still reloads.
    pub reads: Vec<PathBuf>,
    /// Sockets moat creates and removes (vhost-user, control, metrics): their directories.
    pub sockets: Vec<PathBuf>,
    /// TCP ports moat connects to (proxies, DNS upstream over TCP).
    pub connect_ports: Vec<u16>,
}

/// How much of the sandbox the kernel enforces, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    Fully,
    Partially,
    Not,
}

impl std::fmt::Display for Enforced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Enforced::Fully => "fully enforced",
            Enforced::Partially => "partially enforced (older kernel)",
            Enforced::Not => "not enforced (kernel without landlock)",
        })
    }
}
