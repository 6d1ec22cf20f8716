//! moat command line: `serve`, `check`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use moat::device::server::{self, ServeOptions};
use moat::policy::Policy;
use moat::telemetry::Counters;

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
        /// Serve Prometheus metrics on this loopback address (not implemented yet).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Control socket path (not implemented yet).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a policy file: exit 0 if valid, 2 if not.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

const EXIT_RUNTIME: u8 = 1;
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
        } => {
            init_logging(log_format);
            if metrics.is_some() || control.is_some() {
                eprintln!("moat: --metrics and --control are not implemented yet; remove them");
                return ExitCode::from(EXIT_USAGE);
            }
            let opts = ServeOptions {
                socket,
                client,
                once,
            };
            serve(&policy, &opts)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(file: &Path) -> ExitCode {
    match Policy::load(file) {
        Ok(policy) => {
            print!("{}", policy.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn serve(policy_path: &Path, opts: &ServeOptions) -> ExitCode {
    let policy = match Policy::load(policy_path) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let counters = Arc::new(Counters::default());
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
    if let Err(e) = stop_on_signals(
        Arc::clone(&counters),
        (!opts.client).then(|| opts.socket.clone()),
    ) {
        eprintln!("moat: cannot install signal handlers: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    tracing::info!(vm = %policy.vm.name, mac = %policy.vm.mac, address = %policy.vm.address, "moat serving");
    let result = server::serve(Arc::clone(&policy), Arc::clone(&counters), opts, listener);
    if !opts.client {
        let _ = std::fs::remove_file(&opts.socket);
    }
    eprint!("{}", counters.table());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// SIGTERM/SIGINT: print the counters, remove the socket, exit 0. The frontend sees the
/// connection close as it would for any backend restart.
fn stop_on_signals(counters: Arc<Counters>, socket: Option<PathBuf>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "stopping");
                if let Some(path) = &socket {
                    let _ = std::fs::remove_file(path);
                }
                eprint!("{}", counters.table());
                std::process::exit(0);
            }
        })?;
    Ok(())
}
