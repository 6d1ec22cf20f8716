//! The canary's heartbeat: Prometheus metrics labelled with the VM, either served on a
//! loopback address (`--metrics 127.0.0.1:9101`, for a long-running `--every`) or written
//! as a node-exporter textfile (`--metrics /var/lib/node-exporter/moat-canary-vm.prom`,
//! written atomically, for a timer). A dead canary is seen by its last success timestamp
//! going stale:
//!
//! ```text
//! time() - moat_canary_last_success_timestamp_seconds > 900
//! ```
//!
//! The textfile also carries the state between timer runs: the counters continue from the
//! file's values and `moat_canary_attempt_failing` remembers what was failing, so that a
//! recovery is announced by the next run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::report::Severity;

/// Everything the heartbeat shows.
#[derive(Debug, Default, Clone)]
pub struct Heartbeat {
    pub vm: String,
    /// Runs per result: `pass`, `fail`, `error`.
    pub runs: BTreeMap<String, u64>,
    pub last_success: Option<u64>,
    pub last_run: Option<u64>,
    /// Failed rounds per attempt.
    pub failures: BTreeMap<String, u64>,
    /// Attempts failing in the last run, with their severity.
    pub failing: BTreeMap<String, Severity>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(c) => out.push(c),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Heartbeat {
    pub fn new(vm: &str) -> Heartbeat {
        let mut h = Heartbeat {
            vm: vm.to_string(),
            ..Heartbeat::default()
        };
        for r in ["pass", "fail", "error"] {
            h.runs.insert(r.into(), 0);
        }
        h
    }

    /// Count one run.
    pub fn record(&mut self, now: u64, result: &str, failing: &BTreeMap<String, Severity>) {
        *self.runs.entry(result.to_string()).or_default() += 1;
        self.last_run = Some(now);
        if result == "pass" {
            self.last_success = Some(now);
        }
        for attempt in failing.keys() {
            *self.failures.entry(attempt.clone()).or_default() += 1;
        }
        self.failing = failing.clone();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let vm = escape(&self.vm);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP moat_canary_runs_total Canary runs by result (pass, fail: an attempt went the wrong way, error: could not run)."
        );
        let _ = writeln!(out, "# TYPE moat_canary_runs_total counter");
        for (result, n) in &self.runs {
            let _ = writeln!(
                out,
                "moat_canary_runs_total{{vm=\"{vm}\",result=\"{}\"}} {n}",
                escape(result)
            );
        }
        let _ = writeln!(
            out,
            "# HELP moat_canary_last_success_timestamp_seconds Unix time of the last run in which every attempt went as expected (0: never)."
        );
        let _ = writeln!(
            out,
            "# TYPE moat_canary_last_success_timestamp_seconds gauge"
        );
        // 0 until the first success: "not passed in 15 minutes" then fires for a canary
        // that never passed, with no separate absent() rule.
        let _ = writeln!(
            out,
            "moat_canary_last_success_timestamp_seconds{{vm=\"{vm}\"}} {}",
            self.last_success.unwrap_or(0)
        );
        let _ = writeln!(
            out,
            "# HELP moat_canary_last_run_timestamp_seconds Unix time of the last run, whatever its result."
        );
        let _ = writeln!(out, "# TYPE moat_canary_last_run_timestamp_seconds gauge");
        if let Some(t) = self.last_run {
            let _ = writeln!(
                out,
                "moat_canary_last_run_timestamp_seconds{{vm=\"{vm}\"}} {t}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP moat_canary_attempt_failures_total Runs in which this attempt went the wrong way."
        );
        let _ = writeln!(out, "# TYPE moat_canary_attempt_failures_total counter");
        for (attempt, n) in &self.failures {
            let _ = writeln!(
                out,
                "moat_canary_attempt_failures_total{{vm=\"{vm}\",attempt=\"{}\"}} {n}",
                escape(attempt)
            );
        }
        let _ = writeln!(
            out,
            "# HELP moat_canary_attempt_failing 1 while this attempt fails (label severity P1|P2)."
        );
        let _ = writeln!(out, "# TYPE moat_canary_attempt_failing gauge");
        for (attempt, sev) in &self.failing {
            let _ = writeln!(
                out,
                "moat_canary_attempt_failing{{vm=\"{vm}\",attempt=\"{}\",severity=\"{sev:?}\"}} 1",
                escape(attempt)
            );
        }
        out
    }

    /// Read back what [`render`](Self::render) wrote (unknown lines are ignored).
    pub fn parse(vm: &str, text: &str) -> Heartbeat {
        let mut h = Heartbeat::new(vm);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((head, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = parse_labels(labels);
            if labels.get("vm").map(String::as_str) != Some(vm) {
                continue;
            }
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            match name {
                "moat_canary_runs_total" => {
                    h.runs.insert(label("result"), value);
                }
                "moat_canary_last_success_timestamp_seconds" => {
                    h.last_success = (value > 0).then_some(value)
                }
                "moat_canary_last_run_timestamp_seconds" => h.last_run = Some(value),
                "moat_canary_attempt_failures_total" => {
                    h.failures.insert(label("attempt"), value);
                }
                "moat_canary_attempt_failing" if value == 1 => {
                    let sev = Severity::parse(&label("severity")).unwrap_or(Severity::P2);
                    h.failing.insert(label("attempt"), sev);
                }
                _ => {}
            }
        }
        h
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let key = key.trim_start_matches(',').trim().to_string();
        // The value ends at the first quote not escaped.
        let bytes = after.as_bytes();
        let mut i = 0;
        while i < bytes.len() && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        let end = i.min(after.len());
        out.insert(key, unescape(&after[..end]));
        rest = after.get(end + 1..).unwrap_or("");
    }
    out
}

/// Where the heartbeat goes.
pub enum Sink {
    /// Served by a thread at `/metrics`.
    Served(Arc<Mutex<Heartbeat>>),
    /// A textfile rewritten (tmp + rename) after each run.
    File(PathBuf),
}

/// `--metrics ADDR|PATH`: an IP:PORT must be loopback; anything else is a file path.
pub fn open(spec: &str, vm: &str) -> Result<(Sink, Heartbeat), String> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--metrics {spec}: serve metrics on a loopback address only"
            ));
        }
        let server = tiny_http::Server::http(addr)
            .map_err(|e| format!("--metrics {spec}: cannot listen: {e}"))?;
        let shared = Arc::new(Mutex::new(Heartbeat::new(vm)));
        let served = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("canary-metrics".into())
            .spawn(move || {
                for request in server.incoming_requests() {
                    let body = served.lock().map(|h| h.render()).unwrap_or_default();
                    let response = if request.url() == "/metrics" {
                        tiny_http::Response::from_string(body)
                    } else {
                        tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                    };
                    let _ = request.respond(response);
                }
            })
            .map_err(|e| format!("--metrics {spec}: {e}"))?;
        let current = Heartbeat::new(vm);
        return Ok((Sink::Served(shared), current));
    }
    let path = PathBuf::from(spec);
    let previous = std::fs::read_to_string(&path)
        .map(|t| Heartbeat::parse(vm, &t))
        .unwrap_or_else(|_| Heartbeat::new(vm));
    Ok((Sink::File(path), previous))
}

impl Sink {
    /// Publish the heartbeat after a run.
    pub fn publish(&self, h: &Heartbeat) -> Result<(), String> {
        match self {
            Sink::Served(shared) => {
                if let Ok(mut s) = shared.lock() {
                    *s = h.clone();
                }
                Ok(())
            }
            Sink::File(path) => write_atomically(path, &h.render()),
        }
    }
}

/// A temporary file beside `path`, renamed over it: the textfile collector never reads half a
/// file. Hidden (a leading dot) and not `*.prom` while it is written, so the collector skips
/// it; mode 0666 less the umask, as a plain write would create it, so the collector (another
/// user) can read the result.
fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "moat-canary.prom".into());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let cannot = |e: std::io::Error| format!("--metrics {}: cannot write: {e}", path.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(cannot)?;
    // On failure the temporary file is removed when `tmp` drops.
    tmp.write_all(text.as_bytes()).map_err(cannot)?;
    tmp.persist(path).map_err(|e| cannot(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_then_parse_round_trips() {
        let mut h = Heartbeat::new("vm-1");
        let mut failing = BTreeMap::new();
        failing.insert("proxy http \"x\":22".to_string(), Severity::P1);
        h.record(100, "fail", &failing);
        h.record(200, "pass", &BTreeMap::new());
        h.record(300, "fail", &failing);
        let text = h.render();
        assert!(text.contains("moat_canary_runs_total{vm=\"vm-1\",result=\"pass\"} 1"));
        assert!(text.contains("moat_canary_last_success_timestamp_seconds{vm=\"vm-1\"} 200"));
        let back = Heartbeat::parse("vm-1", &text);
        assert_eq!(back.runs, h.runs);
        assert_eq!(back.last_success, Some(200));
        assert_eq!(back.failures, h.failures);
        assert_eq!(back.failing, failing);
        assert!(Heartbeat::parse("other", &text).failing.is_empty());
        let never = Heartbeat::new("vm-1").render();
        assert!(never.contains("moat_canary_last_success_timestamp_seconds{vm=\"vm-1\"} 0"));
        assert_eq!(Heartbeat::parse("vm-1", &never).last_success, None);
    }

    #[test]
    fn textfile_is_replaced_whole_and_readable_by_the_collector() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moat-canary.prom");
        write_atomically(&path, "first\n").unwrap();
        write_atomically(&path, "second\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        // The same mode a plain write gets (0666 less the umask), not tempfile's 0600.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&path), mode(&plain));
        std::fs::remove_file(&plain).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
