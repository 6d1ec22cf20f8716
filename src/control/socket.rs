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

/// Listen on `path` and answer requests from a thread.
pub fn serve(path: &Path, vm: Arc<VmState>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &vm);
            }
        })?;
    Ok(())
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
        _ => format!(
            "error unknown request {:?}; use stats, stats json, reload, forward add LISTEN PORT, forward remove LISTEN, forward list\n",
            line.trim()
        ),
    };
    let mut conn = conn;
    conn.write_all(reply.as_bytes())
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
