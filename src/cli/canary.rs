//! `moat canary`: the isolation self-test, once or `--every` interval, against an in-process
//! copy of moat or (`--live`) against the deployment; alerts through `--alert-cmd`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use moat::policy::Policy;

use super::{EXIT_RUNTIME, EXIT_USAGE};

// `moat canary`'s flags. A plain comment, not a doc comment, so that clap takes the
// command's help text from `Command::Canary` in main.rs alone.
#[derive(Args)]
pub struct CanaryArgs {
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// One JSON object a line (without --live: per attempt; with --live: alert and
    /// resolved events, and a `round` summary per run) instead of a table.
    #[arg(long)]
    json: bool,
    /// Repeat forever at this interval (30s, 5m, 1h).
    #[arg(long, value_name = "DUR", value_parser = interval)]
    every: Option<Duration>,
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
}

pub fn run(args: CanaryArgs) -> ExitCode {
    let CanaryArgs {
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
    } = args;
    if !live {
        return canary(&policy, json, every, alert_cmd.as_deref());
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
        every,
        alert: alert_cmd.as_deref(),
        metrics: metrics.as_deref(),
    };
    canary_live(&opts, &out)
}

/// `--every`: a duration as humantime reads it (`30s`, `5m`, `1h`, `500ms`, `1h 30m`), not
/// zero (that would be a busy loop). A bad one is bad usage: clap exits 2, as for any flag.
fn interval(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("not zero: give a duration like 30s, 5m or 1h".to_string()),
        Err(e) => Err(format!("{e}: give a duration like 30s, 5m or 1h")),
    }
}

fn canary(path: &Path, json: bool, interval: Option<Duration>, alert: Option<&str>) -> ExitCode {
    let policy = match Policy::load(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
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
    every: Option<Duration>,
    alert: Option<&'a str>,
    metrics: Option<&'a str>,
}

fn canary_live(opts: &moat::canary::live::LiveOptions, out: &LiveOutput) -> ExitCode {
    use moat::canary::{digest, heartbeat, live, report};
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
        match out.every {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_takes_the_documented_units_and_refuses_zero() {
        for (text, want) in [
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("500ms", Duration::from_millis(500)),
        ] {
            assert_eq!(interval(text), Ok(want), "{text}");
        }
        for bad in ["0s", "0", "5x", "", "-1s"] {
            assert!(interval(bad).is_err(), "{bad:?} accepted");
        }
    }
}
