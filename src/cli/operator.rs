//! `check` (a policy file, offline) and the requests an operator sends to a running moat's
//! control socket (`stats`, `reload`, `forward`).

use std::path::Path;
use std::process::ExitCode;

use moat::control;
use moat::policy::Policy;

use super::{EXIT_RUNTIME, EXIT_USAGE};

/// Every error of the file on stderr, one a line (the first is the one `serve` would refuse
/// the file with), then the warnings; or the summary on stdout, then the warnings.
pub fn check(file: &Path) -> ExitCode {
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

/// One request to a running moat's control socket.
pub fn ask(socket: &Path, request: &str) -> ExitCode {
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
