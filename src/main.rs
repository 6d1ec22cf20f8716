//! moat command line: `serve`, `check`, and the operator commands `stats`, `reload` and
//! `forward`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use moat::control::{self, VmState};
use moat::device::server::{self, ServeOptions};
use moat::device::{fd_budget, Tuning};
use moat::policy::Policy;
use moat::sandbox;
use moat::telemetry::{metrics, Counters};

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "vhost-user-net backend with an inline firewall"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one VM: the VMM connects to SOCKET (or moat connects to it with --client).
    Serve {
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Connect to a socket the VMM listens on (Cloud Hypervisor vhost_mode=server).
        #[arg(long)]
        client: bool,
        /// Exit after the first frontend disconnects instead of waiting for the next.
        #[arg(long)]
        once: bool,
        /// Serve Prometheus metrics at /metrics on a loopback IP:PORT or a unix socket path.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Control socket (mode 0600) for `moat stats` and `moat reload`.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Serve without the seccomp filter and Landlock ruleset (for strace, gdb, debugging).
        #[arg(long)]
        no_sandbox: bool,
        /// Queue pairs to offer (VIRTIO_NET_F_MQ when more than 1; one thread each).
        /// The VMM must ask for as many (QEMU `-netdev vhost-user,queues=N`).
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=moat::device::MAX_QUEUE_PAIRS as i64))]
        queues: u16,
        /// After draining the guest's TX queue, look for more for this many microseconds
        /// before sleeping (0: sleep at once). Trades CPU for packet rate and latency.
        #[arg(long, value_name = "US", default_value_t = 0,
              value_parser = clap::value_parser!(u64).range(0..=10_000))]
        busy_poll_us: u64,
    },
    /// Print the sandbox `moat serve` applies: the system calls it allows and why.
    Sandbox,
    /// Validate a policy file: exit 0 if valid, 2 if not.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print a running moat's counters and flow table (through its control socket).
    Stats {
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make a running moat re-read its policy file (as SIGHUP does); exit 1 if refused.
    Reload {
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
    },
    /// Isolation self-test: a moat for the policy, a simulated guest making the forbidden
    /// attempts (must fail) and the allowed ones (must work). Exit 0 if all passed, 1 if
    /// not, 2 for a bad policy or command line. Without --live: an in-process copy with
    /// stand-in proxies. With --live: the deployment's proxies, resolver, sandbox and
    /// tuning, the policy re-read every round, the proxies asked directly for what moat
    /// never sends, alert events and a heartbeat.
    Canary {
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// One JSON object a line (without --live: per attempt; with --live: alert and
        /// resolved events, and a `round` summary per run) instead of a table.
        #[arg(long)]
        json: bool,
        /// Repeat forever at this interval (30s, 5m, 1h).
        #[arg(long, value_name = "DUR")]
        every: Option<String>,
        /// Run this command (sh -c) with the alert events as JSON lines on stdin (on a
        /// failed run, and with --live once more when it passes again).
        #[arg(long, value_name = "CMD")]
        alert_cmd: Option<String>,
        /// Test the deployment: the policy's real proxies, resolver and forwards, moat's
        /// sandbox and the --queues/--busy-poll-us moat serve runs with.
        #[arg(long)]
        live: bool,
        /// --live: heartbeat metrics, served on a loopback IP:PORT at /metrics or written
        /// to a node-exporter textfile PATH (atomically; it also keeps state between runs).
        #[arg(long, value_name = "ADDR|PATH", requires = "live")]
        metrics: Option<String>,
        /// --live: also ask the proxies for this name (one that resolves to a private or
        /// loopback address on the proxy's host); they must refuse it.
        #[arg(long, value_name = "NAME", requires = "live")]
        rebind_name: Option<String>,
        /// --live: a control destination (http://, https:// or tcp://host:port) used for
        /// the rule that allows it; repeatable.
        #[arg(long, value_name = "URL", requires = "live")]
        control_url: Vec<String>,
        /// --live: make no real requests through the proxies (no controls).
        #[arg(long, requires = "live")]
        no_controls: bool,
        /// --live: the running moat's control socket; its policy generation is reported.
        #[arg(long, value_name = "PATH", requires = "live")]
        control: Option<PathBuf>,
        /// --live: as `moat serve --queues`.
        #[arg(long, value_name = "N", default_value_t = 1, requires = "live",
              value_parser = clap::value_parser!(u16).range(1..=moat::device::MAX_QUEUE_PAIRS as i64))]
        queues: u16,
        /// --live: as `moat serve --busy-poll-us`.
        #[arg(long, value_name = "US", default_value_t = 0, requires = "live",
              value_parser = clap::value_parser!(u64).range(0..=10_000))]
        busy_poll_us: u64,
        /// --live: as `moat serve --no-sandbox` (debugging only).
        #[arg(long, requires = "live")]
        no_sandbox: bool,
    },
    /// Add, remove or list host -> guest forwards of a running moat (run-time `[[forward]]`).
    Forward {
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        #[command(subcommand)]
        action: ForwardAction,
    },
}

#[derive(Subcommand)]
enum ForwardAction {
    /// `add 127.0.0.1:8080 3000`: host LISTEN to the guest's PORT (loopback peers only).
    Add { listen: String, guest_port: String },
    /// `remove 127.0.0.1:8080`.
    Remove { listen: String },
    /// The policy's forwards and the run-time ones.
    List,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

const EXIT_RUNTIME: u8 = 1;
/// Forward listeners `moat forward add` may add, counted in the descriptor reserve.
const RUNTIME_FORWARD_ROOM: usize = 16;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Serve {
            socket,
            policy,
            client,
            once,
            metrics,
            control,
            log_format,
            no_sandbox,
            queues,
            busy_poll_us,
        } => {
            init_logging(log_format);
            let opts = ServeOptions {
                socket,
                client,
                once,
                tuning: Tuning {
                    queue_pairs: usize::from(queues),
                    busy_poll: std::time::Duration::from_micros(busy_poll_us),
                },
            };
            let endpoints = Endpoints {
                metrics: metrics.as_deref(),
                control: control.as_deref(),
                sandbox: !no_sandbox,
            };
            serve(&policy, &opts, &endpoints)
        }
        Command::Sandbox => {
            print!("{}", sandbox::seccomp::listing());
            ExitCode::SUCCESS
        }
        Command::Stats { control, json } => {
            ask(&control, if json { "stats json" } else { "stats" })
        }
        Command::Reload { control } => ask(&control, "reload"),
        Command::Canary {
            policy,
            json,
            every,
            alert_cmd,
            live,
            metrics,
            rebind_name,
            control_url,
            no_controls,
            control,
            queues,
            busy_poll_us,
            no_sandbox,
        } => {
            if !live {
                return canary(&policy, json, every.as_deref(), alert_cmd.as_deref());
            }
            let mut control_urls = Vec::new();
            for url in &control_url {
                match moat::canary::ControlUrl::parse(url) {
                    Ok(u) => control_urls.push(u),
                    Err(e) => {
                        eprintln!("moat: {e}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
            }
            let moat = match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("moat: cannot find my own binary: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let opts = moat::canary::live::LiveOptions {
                moat,
                policy_path: policy,
                queues,
                busy_poll_us,
                sandbox: !no_sandbox,
                rebind_name,
                control_urls,
                controls: !no_controls,
                control,
            };
            let out = LiveOutput {
                json,
                every: every.as_deref(),
                alert: alert_cmd.as_deref(),
                metrics: metrics.as_deref(),
            };
            canary_live(&opts, &out)
        }
        Command::Forward { control, action } => match action {
            ForwardAction::Add { listen, guest_port } => {
                ask(&control, &format!("forward add {listen} {guest_port}"))
            }
            ForwardAction::Remove { listen } => ask(&control, &format!("forward remove {listen}")),
            ForwardAction::List => ask(&control, "forward list"),
        },
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log that cannot be written (stderr is a closed pipe) must not panic the writing
    // thread: tracing-subscriber would report it with eprintln!, which panics on EPIPE.
    // Colour only for a person at a terminal: a file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Every error of the file on stderr, one a line (the first is the one `serve` would refuse
/// the file with), then the warnings; or the summary on stdout, then the warnings.
fn check(file: &Path) -> ExitCode {
    let checked = Policy::check(file);
    let code = match &checked.result {
        Ok(policy) => {
            print!("{}", policy.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors.iter() {
                eprintln!("{e}");
            }
            ExitCode::from(EXIT_USAGE)
        }
    };
    for warning in &checked.warnings {
        eprintln!("{}: warning: {warning}", file.display());
    }
    code
}

fn canary(path: &Path, json: bool, every: Option<&str>, alert: Option<&str>) -> ExitCode {
    let policy = match Policy::load(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let interval = match every.map(moat::canary::parse_duration) {
        None => None,
        Some(Some(d)) => Some(d),
        Some(None) => {
            eprintln!(
                "moat: --every {}: give a duration like 30s, 5m or 1h",
                every.unwrap_or_default()
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    loop {
        let passed = match moat::canary::run(&policy) {
            Ok(outcomes) => {
                if json {
                    print!("{}", moat::canary::json_lines(&outcomes));
                } else {
                    print!("{}", moat::canary::table(&outcomes));
                }
                let failures: Vec<_> = outcomes.into_iter().filter(|o| !o.passed()).collect();
                if let (false, Some(cmd)) = (failures.is_empty(), alert) {
                    alert_with(cmd, &moat::canary::json_lines(&failures));
                }
                failures.is_empty()
            }
            Err(e) => {
                eprintln!("moat: {e}");
                if let Some(cmd) = alert {
                    alert_with(
                        cmd,
                        &format!("{}\n", serde_json::json!({"error": e.to_string()})),
                    );
                }
                false
            }
        };
        match interval {
            Some(d) => std::thread::sleep(d),
            None => {
                return if passed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}

/// Where `canary --live` reports.
struct LiveOutput<'a> {
    json: bool,
    every: Option<&'a str>,
    alert: Option<&'a str>,
    metrics: Option<&'a str>,
}

fn canary_live(opts: &moat::canary::live::LiveOptions, out: &LiveOutput) -> ExitCode {
    use moat::canary::{digest, heartbeat, live, report};
    let interval = match out.every.map(moat::canary::parse_duration) {
        None => None,
        Some(Some(d)) => Some(d),
        Some(None) => {
            eprintln!(
                "moat: --every {}: give a duration like 30s, 5m or 1h",
                out.every.unwrap_or_default()
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // The first read decides the VM's name (and a bad file at start is bad usage).
    let mut vm = match Policy::load(&opts.policy_path) {
        Ok(p) => p.vm.name,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let (sink, mut beat) = match out.metrics.map(|m| heartbeat::open(m, &vm)) {
        None => (None, heartbeat::Heartbeat::new(&vm)),
        Some(Ok((sink, beat))) => (Some(sink), beat),
        Some(Err(e)) => {
            eprintln!("moat: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut tracker = report::Tracker {
        failing: beat.failing.clone(),
    };
    loop {
        let round = live::round(opts);
        if let Some(name) = &round.vm {
            vm = name.clone();
        }
        let now = digest::now_secs();
        let time = digest::rfc3339(now);
        let events = tracker.round(&vm, &round.policy, &time, &round.result);
        let alerts: String = events.iter().map(report::Event::json_line).collect();
        if out.json {
            print!("{alerts}");
            print!(
                "{}",
                report::summary(&vm, &round.policy, &time, &round.result)
            );
        } else {
            let generation = round
                .policy
                .generation
                .map(|g| format!(", running moat's policy generation {g}"))
                .unwrap_or_default();
            println!(
                "{time} vm {vm}: policy {} {}{generation}",
                round.policy.path, round.policy.hash
            );
            match &round.result {
                report::RoundResult::Ran(outcomes) => {
                    print!("{}", moat::canary::table(outcomes))
                }
                report::RoundResult::Failed(why) => println!("canary could not run: {why}"),
            }
            for e in events.iter().filter(|e| e.event == "resolved") {
                println!("resolved: {} pass again", e.resolves.join(", "));
            }
        }
        {
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        if let (false, Some(cmd)) = (alerts.is_empty(), out.alert) {
            alert_with(cmd, &alerts);
        }
        let result = match &round.result {
            report::RoundResult::Failed(_) => "error",
            report::RoundResult::Ran(_) if tracker.failing.is_empty() => "pass",
            report::RoundResult::Ran(_) => "fail",
        };
        beat.record(now, result, &tracker.failing);
        if let Some(sink) = &sink {
            if let Err(e) = sink.publish(&beat) {
                eprintln!("moat: {e}");
            }
        }
        match interval {
            Some(d) => std::thread::sleep(d),
            None => {
                return match result {
                    "pass" => ExitCode::SUCCESS,
                    _ if round.invalid_policy => ExitCode::from(EXIT_USAGE),
                    _ => ExitCode::from(EXIT_RUNTIME),
                }
            }
        }
    }
}

/// Run the operator's alert command with `input` on its stdin.
fn alert_with(cmd: &str, input: &str) {
    use std::io::Write;
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .spawn();
    match child {
        Ok(mut child) => {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(input.as_bytes());
            }
            let _ = child.wait();
        }
        Err(e) => eprintln!("moat: --alert-cmd failed to start: {e}"),
    }
}

/// One request to a running moat's control socket.
fn ask(socket: &Path, request: &str) -> ExitCode {
    match control::socket::request(socket, request) {
        Ok((true, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((false, body)) => {
            eprint!("moat: {body}");
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(e) => {
            eprintln!(
                "moat: cannot reach the control socket {}: {e}; is `moat serve --control` running?",
                socket.display()
            );
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// What `serve` opens besides the vhost-user socket, and whether it sandboxes itself.
struct Endpoints<'a> {
    metrics: Option<&'a str>,
    control: Option<&'a Path>,
    sandbox: bool,
}

/// Landlock first, before any thread exists (every thread inherits it): the policy's
/// directory stays readable, the sockets' directories writable, TCP connects limited to
/// the policy's proxy and upstream ports.
fn enter_landlock(
    policy_path: &Path,
    policy: &Policy,
    opts: &ServeOptions,
    ep: &Endpoints,
) -> Result<(), String> {
    let mut sockets: Vec<PathBuf> = ep.control.map(Path::to_path_buf).into_iter().collect();
    if !opts.client {
        sockets.push(opts.socket.clone());
    }
    if let Some(m) = ep.metrics.filter(|m| m.starts_with('/')) {
        sockets.push(PathBuf::from(m));
    }
    let needs = sandbox::Needs {
        reads: vec![policy_path.to_path_buf()],
        sockets,
        connect_ports: policy.connect_ports(),
    };
    let enforced = sandbox::landlock::restrict(&needs).map_err(|e| e.to_string())?;
    tracing::info!(landlock = %enforced, connect_ports = ?needs.connect_ports, "sandbox: filesystem and TCP connects restricted");
    Ok(())
}

fn serve(policy_path: &Path, opts: &ServeOptions, ep: &Endpoints) -> ExitCode {
    let (metrics_addr, control_path) = (ep.metrics, ep.control);
    let mut policy = match Policy::load(policy_path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Descriptors: the soft limit raised to the hard one, a budget for flows, max_flows
    // clamped (with a warning) if it could need more.
    match fd_budget::plan(
        opts.tuning.queue_pairs,
        policy.forward.len() + RUNTIME_FORWARD_ROOM,
    ) {
        Ok(plan) => {
            fd_budget::clamp_max_flows(&mut policy);
            tracing::info!(
                nofile = plan.nofile,
                flow_fds = plan.flow_fds,
                max_flows = policy.limits.max_flows,
                "descriptor budget"
            );
        }
        Err(e) => tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE: no descriptor budget"),
    }
    if ep.sandbox {
        if let Err(e) = enter_landlock(policy_path, &policy, opts, ep) {
            eprintln!("moat: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    }
    for warning in policy.warnings() {
        tracing::warn!(policy = %policy_path.display(), "{warning}");
    }
    moat::stack::map_flow_buffers();
    let connect_ports = policy.connect_ports();
    let counters = Arc::new(Counters::default());
    let vm_name = policy.vm.name.clone();
    let vm = Arc::new(VmState::new(
        policy_path.to_path_buf(),
        policy,
        Arc::clone(&counters),
    ));
    if let Some(addr) = metrics_addr {
        if let Err(e) = metrics::serve(addr, vm_name.clone(), Arc::clone(&counters)) {
            eprintln!("moat: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let control = match control_path {
        None => None,
        Some(path) => match control::socket::bind(path) {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("moat: cannot create the control socket {}: {e}", path.display());
                return ExitCode::from(EXIT_RUNTIME);
            }
        },
    };
    let listener = if opts.client {
        None
    } else {
        match server::bind(&opts.socket) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("moat: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    };
    let mut cleanup: Vec<PathBuf> = control_path.map(Path::to_path_buf).into_iter().collect();
    if !opts.client {
        cleanup.push(opts.socket.clone());
    }
    if let Err(e) = handle_signals(Arc::clone(&vm), cleanup.clone()) {
        eprintln!("moat: cannot install signal handlers: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    if ep.sandbox {
        // Setup is over: from here on only the calls the data path makes.
        if let Err(e) = sandbox::seccomp::install() {
            eprintln!("moat: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        vm.pin_connect_ports(connect_ports);
        tracing::info!("sandbox: seccomp allow-list installed");
    } else {
        tracing::warn!("serving without the sandbox (--no-sandbox)");
    }
    // Only now does the control socket answer: a request that came during set-up has waited
    // in the backlog, so it runs under the sandbox too.
    if let Some(listener) = control {
        if let Err(e) = control::socket::serve(listener, Arc::clone(&vm)) {
            eprintln!("moat: cannot start the control socket's thread: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    }
    let policy = vm.policy();
    tracing::info!(vm = %policy.vm.name, mac = %policy.vm.mac, address = %policy.vm.address, "moat serving");
    let result = server::serve(Arc::clone(&vm), opts, listener);
    for path in &cleanup {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::io::Write::write_all(&mut std::io::stderr(), counters.table().as_bytes());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// SIGHUP: reload the policy (a bad file changes nothing). SIGTERM/SIGINT: print the
/// counters, remove our sockets, exit 0; the frontend sees the connection close as it would
/// for any backend restart.
fn handle_signals(vm: Arc<VmState>, cleanup: Vec<PathBuf>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    // Reloads run on their own thread, so a SIGTERM that follows a SIGHUP is acted on at
    // once; SIGHUPs that come while one runs are folded into one more.
    let (reload, reloads) = std::sync::mpsc::sync_channel::<()>(1);
    let reloader = Arc::clone(&vm);
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            for () in reloads {
                // Outcome logged (and counted) by reload itself.
                let _ = reloader.reload();
            }
        })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    let _ = reload.try_send(());
                    continue;
                }
                tracing::info!(signal = sig, "stopping");
                for path in &cleanup {
                    let _ = std::fs::remove_file(path);
                }
                // stderr may be a pipe nobody reads any more: never let that stop the exit.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    vm.counters.table().as_bytes(),
                );
                std::process::exit(0);
            }
        })?;
    Ok(())
}
