//! `moat serve`: load and budget the policy, sandbox the process (Landlock before any thread,
//! seccomp once set-up is over), open the metrics and control endpoints, handle signals, and
//! serve the VMM until it leaves.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use moat::control::{self, VmState};
use moat::device::server::{self, ServeOptions};
use moat::device::Tuning;
use moat::egress::fd_budget;
use moat::policy::Policy;
use moat::sandbox;
use moat::telemetry::{metrics, Counters};

use super::{EXIT_RUNTIME, EXIT_USAGE};

/// Forward listeners `moat forward add` may add, counted in the descriptor reserve.
const RUNTIME_FORWARD_ROOM: usize = 16;

// `moat serve`'s flags. A plain comment, not a doc comment, so that clap takes the
// command's help text from `Command::Serve` in main.rs alone.
#[derive(Args)]
pub struct ServeArgs {
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
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn run(args: ServeArgs) -> ExitCode {
    let ServeArgs {
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
    } = args;
    init_logging(log_format);
    let opts = ServeOptions {
        socket,
        client,
        once,
        tuning: Tuning {
            queue_pairs: usize::from(queues),
            busy_poll: Duration::from_micros(busy_poll_us),
        },
    };
    let endpoints = Endpoints {
        metrics: metrics.as_deref(),
        control: control.as_deref(),
        sandbox: !no_sandbox,
    };
    serve(&policy, &opts, &endpoints)
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
                eprintln!(
                    "moat: cannot create the control socket {}: {e}",
                    path.display()
                );
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
