//! Running the moat binary under test: finding it, a child process that cannot outlive
//! its test ([`Reaped`]), moat serving a policy in a temp dir ([`MoatProcess`]), and its
//! counters as `moat stats --json` reports them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::fixtures::{eventually, wait_for, DEADLINE};

/// The moat binary cargo built for this test or benchmark: `MOAT_BIN` if set, else `moat`
/// in the profile directory above the running test executable (`target/<profile>/deps/`),
/// where cargo puts the binary it also names in `CARGO_BIN_EXE_moat`.
///
/// # Panics
/// If there is no such binary (the kit used outside moat's tests and benchmarks).
pub fn moat_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = std::env::var_os("MOAT_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let exe = std::env::current_exe().ok()?;
                let mut dir = exe.parent()?;
                if dir.ends_with("deps") {
                    dir = dir.parent()?;
                }
                Some(dir.join("moat"))
            })
            .filter(|p| p.is_file())
            .expect("the moat binary next to the test executable (or set MOAT_BIN)");
        path.into_os_string()
            .into_string()
            .expect("a UTF-8 path to the moat binary")
    })
}

/// `moat stats --json` of the moat serving `control`, if it answers.
pub fn stats_json(control: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(moat_bin())
        .args(["stats", "--json", "--control"])
        .arg(control)
        .output()
        .ok()?;
    out.status.success().then_some(())?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Wait until the running moat's counter `name` (as `moat stats --json` names it, e.g.
/// `drop.arp_not_for_gateway`) reads `value`.
pub fn wait_counter(control: &Path, name: &str, value: u64) {
    let mut last = None;
    wait_for(&format!("{name} = {value} in moat stats"), DEADLINE, || {
        last = stats_json(control).and_then(|v| v["counters"][name].as_u64());
        (last == Some(value)).then_some(())
    });
}

/// Wait up to `within` for `child` to exit (polled every 20 ms): its status, or `None` if
/// it is still running.
pub fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A spawned process that is killed (SIGKILL) and reaped when dropped, also when the test
/// panics. It leads its own process group, and the whole group goes with it (peers that
/// fork workers). Derefs to the `Child` for everything else.
pub struct Reaped(std::process::Child);

impl Reaped {
    pub fn spawn(cmd: &mut std::process::Command) -> Reaped {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Reaped(child)
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        // Not reaped yet (else the test already waited for it): the id still names our
        // child and the group it leads.
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) takes no pointers; the negative pid names the process group
            // our own child leads, and that child is not reaped yet, so the id cannot have
            // been reused by an unrelated group.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

/// `moat serve` for the `vm.toml` in `dir`, with `moat.sock` and `control.sock` there too,
/// run under `wrapper` if it is not empty (`prlimit --nofile=256 --`, `strace ...`).
pub fn serve_in(dir: &Path, wrapper: &[&str]) -> std::process::Command {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(moat_bin());
            c
        }
        None => std::process::Command::new(moat_bin()),
    };
    command
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("moat.sock"))
        .arg("--policy")
        .arg(dir.join("vm.toml"))
        .arg("--control")
        .arg(dir.join("control.sock"));
    command
}

/// The moat binary serving `vm.toml` in a temp dir, with `moat.sock` and `control.sock`
/// there too; killed when dropped (before the directory goes).
pub struct MoatProcess {
    pub child: Reaped,
    pub dir: tempfile::TempDir,
}

impl MoatProcess {
    /// Write `policy` as vm.toml, start `moat serve` with `extra` arguments, and wait for
    /// its control socket.
    pub fn start(policy: &str, extra: &[&str], stderr: std::process::Stdio) -> MoatProcess {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm.toml"), policy).unwrap();
        let child = Reaped::spawn(serve_in(dir.path(), &[]).args(extra).stderr(stderr));
        let m = MoatProcess { child, dir };
        eventually("control socket", || m.path("control.sock").exists());
        m
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A child's output (a pipe), collected line by line as it comes, so a test can look at it
/// while the child runs and read all of it once the child is gone.
pub struct LineLog {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl LineLog {
    pub fn collect(pipe: impl std::io::Read + Send + 'static) -> LineLog {
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&text);
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        LineLog { text, reader }
    }

    /// What has come so far.
    pub fn so_far(&self) -> String {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything, once the pipe has closed (the child is gone).
    pub fn finish(self) -> String {
        let LineLog { text, reader } = self;
        let _ = reader.join();
        let text = text.lock().unwrap_or_else(|e| e.into_inner()).clone();
        text
    }
}
