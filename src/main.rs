//! moat command line: `serve`, `check`, `sandbox`, `canary`, and the operator commands
//! `stats`, `reload` and `forward`. This file is the table of commands; each command's flags
//! and what it does are in `cli/`: `serve` (the daemon), `canary` (the isolation self-test),
//! `operator` (`check` and the requests to a running moat's control socket).

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::canary::CanaryArgs;
use cli::serve::ServeArgs;

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
    Serve(ServeArgs),
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
    Canary(CanaryArgs),
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

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => cli::serve::run(args),
        Command::Sandbox => {
            print!("{}", moat::sandbox::seccomp::listing());
            ExitCode::SUCCESS
        }
        Command::Check { file } => cli::operator::check(&file),
        Command::Stats { control, json } => {
            cli::operator::ask(&control, if json { "stats json" } else { "stats" })
        }
        Command::Reload { control } => cli::operator::ask(&control, "reload"),
        Command::Canary(args) => cli::canary::run(args),
        Command::Forward { control, action } => {
            let request = match action {
                ForwardAction::Add { listen, guest_port } => {
                    format!("forward add {listen} {guest_port}")
                }
                ForwardAction::Remove { listen } => format!("forward remove {listen}"),
                ForwardAction::List => "forward list".to_string(),
            };
            cli::operator::ask(&control, &request)
        }
    }
}
