//! `moat check FILE`: exit 0 with a summary for a valid policy, exit 2 for an invalid one with
//! one line `<file>:<line>:<col>: <key>: <reason>` on stderr per error (the first is the one
//! `moat serve` would refuse the file with, the others follow in file order), then warnings.

use std::path::Path;
use std::process::Command;

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(path: &Path) -> Checked {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("check")
        .arg(path)
        .output()
        .expect("run moat check");
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn shipped_policies_pass_with_a_summary() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = check(&repo.join("policy/example.toml"));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    for needle in [
        "sandbox-17",
        "52:54:00:12:34:56",
        "10.0.0.2/30",
        "gateway 10.0.0.1",
        "http 127.0.0.1:3128",
        "socks5 127.0.0.1:1080",
        "*.example.com",
        "203.0.113.0/24",
        "api.internal -> 10.0.0.1",
        "127.0.0.1:8080 -> guest port 3000",
        "max_flows 4096",
    ] {
        assert!(
            out.stdout.contains(needle),
            "{needle:?} missing from\n{}",
            out.stdout
        );
    }
    let out = check(&repo.join("policy/deny-all.toml"));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("nothing leaves the VM"),
        "{}",
        out.stdout
    );
}

/// A rule that allows any name is valid, but the proxy alone then decides where names lead:
/// `moat check` says so on stderr and still exits 0.
#[test]
fn a_rule_for_any_name_is_valid_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("any.toml");
    std::fs::write(
        &path,
        format!("{VM}[proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [80, 443]\n[[outbound]]\nprotocol = \"tcp\"\nports = [22]\nto = [\"git.example.com\"]\n"),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let warnings: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, for the any-name rule: {}",
        out.stderr
    );
    let head = format!(
        "{}: warning: outbound[0] (tcp ports 80,443) allows any name",
        path.display()
    );
    assert!(warnings[0].starts_with(&head), "{}", warnings[0]);
    assert!(
        warnings[0].contains("Configure your proxy"),
        "{}",
        warnings[0]
    );
}

const VM: &str = "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n";

#[test]
fn invalid_policies_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = "[proxy]\nhttp = \"127.0.0.1:3128\"\n";
    // (file, text, "line:col", key, reason)
    let cases = [
        ("syntax.toml", "[vm\n".to_string(), "1:4", "vm", "unclosed table, expected `]`"),
        (
            "unknown.toml",
            format!("{VM}nmae = \"x\"\n"),
            "5:1",
            "vm.nmae",
            "unknown key `nmae`; did you mean `name`?",
        ),
        (
            "missing.toml",
            "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\n".to_string(),
            "1:1",
            "vm.address",
            "required key is missing; add address = \"10.0.0.2/30\"",
        ),
        (
            "mac.toml",
            VM.replace("52:54:00:12:34:56", "01:00:5e:00:00:01"),
            "3:7",
            "vm.mac",
            "\"01:00:5e:00:00:01\" is a multicast MAC; use a unicast address such as 52:54:00:12:34:56",
        ),
        (
            "gw.toml",
            format!("{VM}gateway = \"192.168.1.1\"\n"),
            "5:11",
            "vm.gateway",
            "192.168.1.1 is outside the VM's subnet 10.0.0.0/30",
        ),
        (
            "port.toml",
            format!("{VM}{proxy}[[outbound]]\nprotocol = \"tcp\"\nports = [443, 70000]\n"),
            "9:15",
            "outbound[0].ports",
            "70000 is not a port; use 1..=65535",
        ),
        (
            "udp.toml",
            format!("{VM}{proxy}[[outbound]]\nprotocol = \"udp\"\nports = [53]\nvia = \"http\"\n"),
            "10:7",
            "outbound[0].via",
            "udp cannot go through an HTTP CONNECT proxy",
        ),
        (
            "ipv6.toml",
            format!("{VM}{proxy}[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"2001:db8::/32\"]\n"),
            "10:7",
            "outbound[0].to",
            "IPv6 is not supported",
        ),
        (
            "forward.toml",
            format!("{VM}[[forward]]\nlisten = \"127.0.0.1:8080\"\nguest_port = 80\n[[forward]]\nlisten = \"0.0.0.0:8080\"\nguest_port = 81\n"),
            "9:10",
            "forward[1].listen",
            "overlaps forward[0].listen",
        ),
        (
            "limits.toml",
            format!("{VM}[limits]\nmax_flows = 0\n"),
            "6:13",
            "limits.max_flows",
            "0 is outside 1..=1000000",
        ),
    ];
    for (name, text, place, key, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = check(&path);
        assert_eq!(out.code, Some(2), "{name}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
        let line = out.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "{name}: one line: {}", out.stderr);
        let head = format!("{}:{place}: {key}: ", path.display());
        assert!(
            line.starts_with(&head),
            "{name}: want {head}...\n got {line}"
        );
        assert!(
            line.contains(reason),
            "{name}: want {reason:?}\n got {line}"
        );
    }
}

#[test]
fn a_missing_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let out = check(&path);
    assert_eq!(out.code, Some(2));
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with(&format!("{}: cannot read the policy: ", path.display())),
        "{}",
        out.stderr
    );
}

/// Write `text` to `dir/name` and run `moat check` on it.
fn check_text(dir: &Path, name: &str, text: &str) -> (std::path::PathBuf, Checked) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = check(&path);
    (path, out)
}

/// The lines of stderr, each checked to start with `<file>:<line>:<col>: <key>: `.
#[track_caller]
fn assert_errors(path: &Path, out: &Checked, want: &[(&str, &str, &str)]) {
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), want.len(), "{}", out.stderr);
    for (line, (place, key, reason)) in lines.iter().zip(want) {
        let head = format!("{}:{place}: {key}: ", path.display());
        assert!(line.starts_with(&head), "want {head}...\n got {line}");
        assert!(line.contains(reason), "want {reason:?}\n got {line}");
    }
}

/// Three independent mistakes in three sections: three lines, in file order, and the first is
/// the line a one-error check (and `moat serve`) gives.
#[test]
fn every_error_of_a_file_is_reported_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}[proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [443, 70000]\nto = [\"example.com\"]\n[limits]\nmax_flows = 0\n",
        VM.replace("52:54:00:12:34:56", "01:00:5e:00:00:01")
    );
    let (path, out) = check_text(dir.path(), "three.toml", &text);
    assert_errors(
        &path,
        &out,
        &[
            ("3:7", "vm.mac", "is a multicast MAC"),
            ("9:15", "outbound[0].ports", "70000 is not a port"),
            ("12:13", "limits.max_flows", "0 is outside 1..=1000000"),
        ],
    );
    let first = moat::policy::Policy::load(&path).unwrap_err().to_string();
    assert_eq!(out.stderr.lines().next(), Some(first.as_str()));
}

/// The first line stays the error `moat serve` refuses the file with, even when a later error
/// in the file is found first (a misspelt key is found before any value is judged); the
/// others follow in file order.
#[test]
fn the_first_line_is_the_error_serve_reports() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}[dns]\nmode = \"dot\"\n[limits]\nmax_flow = 1\negress_bps = -1\n",
        VM.replace("\"t\"", "\"T\"")
    );
    let (path, out) = check_text(dir.path(), "order.toml", &text);
    assert_errors(
        &path,
        &out,
        &[
            ("8:1", "limits.max_flow", "did you mean `max_flows`?"),
            ("2:8", "vm.name", "not a valid VM name"),
            ("6:8", "dns.mode", "\"dot\" is not a DNS mode"),
        ],
    );
    let first = moat::policy::Policy::load(&path).unwrap_err().to_string();
    assert_eq!(out.stderr.lines().next(), Some(first.as_str()));
}

/// Several mistakes in one section, and in several rules, each get their line; a mistake is
/// not echoed by the checks that depend on it (a bad proxy address does not make the rules
/// that use it "lack" a proxy, a bad address does not make the gateway wrong).
#[test]
fn errors_within_a_section_each_get_a_line_without_echoes() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[vm]\nname = \"t\"\nmac = \"zz\"\naddress = \"10.0.0.2\"\ngateway = \"10.9.9.9\"\nmtu = 1\n[proxy]\nhttp = \"localhost:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [0, 443, \"9-1\"]\nto = [\"example.com\"]\n[[outbound]]\nprotocol = \"icmp\"\nports = [1]\nto = [\"203.0.113.7\"]\nvia = \"ftp\"\n";
    let (path, out) = check_text(dir.path(), "many.toml", text);
    assert_errors(
        &path,
        &out,
        &[
            ("3:7", "vm.mac", "is not a MAC address"),
            ("4:11", "vm.address", "has no prefix"),
            ("6:7", "vm.mtu", "1 is outside 68..=9000"),
            ("8:8", "proxy.http", "is not an IP address and port"),
            ("11:10", "outbound[0].ports", "0 is not a port"),
            ("11:18", "outbound[0].ports", "range 9-1 runs backwards"),
            (
                "14:12",
                "outbound[1].protocol",
                "\"icmp\" is not a protocol",
            ),
            ("16:7", "outbound[1].to", "is a bare IP address"),
            ("17:7", "outbound[1].via", "\"ftp\" is not a proxy kind"),
        ],
    );
}

/// Warnings of the valid parts follow the errors, and the exit status is still 2.
#[test]
fn warnings_follow_the_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{VM}mtu = 1\n[proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [0]\n[[outbound]]\nprotocol = \"tcp\"\nports = [80, 443]\n"
    );
    let (path, out) = check_text(dir.path(), "warn.toml", &text);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stderr);
    let file = path.display();
    assert!(
        lines[0].starts_with(&format!("{file}:5:7: vm.mtu: ")),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(&format!("{file}:10:10: outbound[0].ports: ")),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with(&format!(
            "{file}: warning: outbound[1] (tcp ports 80,443) allows any name"
        )),
        "{}",
        lines[2]
    );
}
