//! The control socket: a unix socket only its owner may use (mode 0600), one request line
//! per connection, the answer as text. Requests: `stats`, `stats json`, `reload`,
//! `forward add LISTEN PORT`, `forward remove LISTEN`, `forward list`.
//! The first word of an answer is `ok` or `error`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::VmState;

/// Requests answered at once (one worker thread each, so a slow reload does not hold up
/// `moat stats`), and requests that may wait for a worker; more than both are refused.
const WORKERS: usize = 4;
const QUEUED: usize = 8;

/// The bound control socket, not yet answering.
pub struct ControlListener(UnixListener);

/// Bind the control socket at `path` (replacing a stale one). The socket is bound and
/// listening under a temporary name, then renamed into place: whoever sees `path` exist can
/// connect (bind-then-listen would refuse connections in between). Requests wait in the
/// backlog until `serve` starts answering: moat starts it only once the sandbox is in
/// place, so no request (a debug probe included) runs with more rights than the data path.
pub fn bind(path: &Path) -> std::io::Result<ControlListener> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staging = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = bind_owner_only(&staging)?;
    if let Err(e) = std::fs::rename(&staging, path) {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(ControlListener(listener))
}

/// Answer requests: an accepting thread hands connections to `WORKERS` threads through a
/// queue of `QUEUED`. A fixed pool, not a thread a request: the number of threads is bounded,
/// and a client that sends one request after another never finds the pool "busy" because
/// the previous request's thread had not quite ended.
pub fn serve(listener: ControlListener, vm: Arc<VmState>) -> std::io::Result<()> {
    let ControlListener(listener) = listener;
    let (queue, work) = std::sync::mpsc::sync_channel::<UnixStream>(QUEUED);
    let work = Arc::new(std::sync::Mutex::new(work));
    for _ in 0..WORKERS {
        let (vm, work) = (Arc::clone(&vm), Arc::clone(&work));
        std::thread::Builder::new()
            .name("control-worker".into())
            .spawn(move || loop {
                let next = match work.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                match next {
                    Ok(conn) => {
                        let _ = answer(conn, &vm);
                    }
                    Err(_) => return,
                }
            })?;
    }
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(std::sync::mpsc::TrySendError::Full(conn)) = queue.try_send(conn) {
                    refuse_busy(conn);
                }
            }
        })?;
    Ok(())
}

/// Tell a client the pool is full. Its request line is read first (briefly): closing a unix
/// socket with unread data resets the connection, and the client would see a reset instead
/// of the reason.
fn refuse_busy(mut conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let mut line = String::new();
    let _ = BufReader::new(&conn).take(4096).read_line(&mut line);
    let _ = conn.write_all(b"error busy: too many control requests at once\n");
}

/// Bind a unix socket that is mode 0600 from the moment it exists (not bound, then
/// chmod-ed: in between, the umask's mode would let others connect).
fn bind_owner_only(path: &Path) -> std::io::Result<UnixListener> {
    // The mask is the whole process's: this runs during start-up, before the data path's
    // threads create any file.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound?;
    // Belt and braces (a filesystem that ignores the umask for sockets).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn answer(conn: UnixStream, vm: &VmState) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    // One request line, at most 4 KiB.
    BufReader::new(conn.try_clone()?)
        .take(4096)
        .read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        ["stats"] => format!("ok\n{}", vm.stats(false)),
        ["stats", "json"] => format!("ok\n{}", vm.stats(true)),
        ["reload"] => match vm.reload() {
            Ok(r) if r.pairs_pending > 0 => format!(
                "ok generation {} flows_reset {} pairs_pending {}\n",
                r.generation, r.flows_reset, r.pairs_pending
            ),
            Ok(r) => format!(
                "ok generation {} flows_reset {}\n",
                r.generation, r.flows_reset
            ),
            Err(e) => format!("error {e}\n"),
        },
        ["forward", "add", listen, port] => match vm.add_forward(listen, port) {
            Ok(text) => format!("ok\n{text}"),
            Err(e) => format!("error {e}\n"),
        },
        ["forward", "remove", listen] => match vm.remove_forward(listen) {
            Ok(text) => format!("ok\n{text}"),
            Err(e) => format!("error {e}\n"),
        },
        ["forward", "list"] => format!("ok\n{}", vm.list_forwards()),
        #[cfg(debug_assertions)]
        ["debug", probe @ ..] => debug_probe(probe),
        _ => format!(
            "error unknown request {:?}; use stats, stats json, reload, forward add LISTEN PORT, forward remove LISTEN, forward list\n",
            line.trim()
        ),
    };
    let mut conn = conn;
    conn.write_all(reply.as_bytes())
}

/// Debug builds only: do what the sandbox must stop, so tests can prove it does.
/// `debug exec` calls execve (seccomp kills the process; without the sandbox it fails with
/// ENOENT), `debug read PATH` reads a file (Landlock refuses paths outside moat's own),
/// `debug connect IP:PORT` opens a TCP connection (Landlock refuses ports other than the
/// policy's proxies and upstream), `debug socket raw|packet|netlink|udp` opens a socket of
/// that family (seccomp allows only unix, TCP and UDP).
#[cfg(debug_assertions)]
fn debug_probe(probe: &[&str]) -> String {
    match probe {
        ["exec"] => {
            let path = c"/nonexistent/moat-sandbox-probe";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path, NULL-terminated argv and envp that outlive the call.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            format!("ok execve returned: {}\n", std::io::Error::last_os_error())
        }
        ["read", path] => match std::fs::read(path) {
            Ok(bytes) => format!("ok read {} bytes\n", bytes.len()),
            Err(e) => format!("error {e}\n"),
        },
        ["connect", addr] => match addr.parse::<std::net::SocketAddr>() {
            Ok(a) => match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                Ok(_) => format!("ok connected to {a}\n"),
                Err(e) => format!("error {e}\n"),
            },
            Err(e) => format!("error {addr}: {e}\n"),
        },
        ["socket", family] => {
            use rustix::net::{ipproto, AddressFamily as Af, SocketFlags, SocketType as St};
            // Protocol `None` is 0: NETLINK_ROUTE for netlink.
            let (domain, kind, protocol) = match *family {
                "raw" => (Af::INET, St::RAW, Some(ipproto::TCP)),
                "packet" => (Af::PACKET, St::RAW, None),
                "netlink" => (Af::NETLINK, St::RAW, None),
                "udp" => (Af::INET, St::DGRAM, None),
                other => return format!("error socket {other}: raw, packet, netlink or udp\n"),
            };
            // The descriptor is closed at once, when the OwnedFd drops.
            match rustix::net::socket_with(domain, kind, SocketFlags::CLOEXEC, protocol) {
                Ok(_fd) => format!("ok {family} socket opened\n"),
                Err(e) => format!("error {}\n", std::io::Error::from(e)),
            }
        }
        _ => "error debug probes: exec, read PATH, connect IP:PORT, socket FAMILY\n".to_string(),
    }
}

/// Client side: send one request, return (ok, answer without the status word).
pub fn request(path: &Path, line: &str) -> std::io::Result<(bool, String)> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    let ok = reply.starts_with("ok");
    let body = reply
        .split_once(['\n', ' '])
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((ok, body))
}
