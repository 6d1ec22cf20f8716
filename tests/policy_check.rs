//! `moat check`: exit 0 with a summary for a valid policy, exit 2 with one line naming
//! file:line:col, key and reason for an invalid one.

use std::process::Command;

fn check(path: &std::path::Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("check")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_policies_pass_with_a_summary() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, _) = check(&repo.join("policy/example.toml"));
    assert_eq!(code, Some(0), "{stdout}");
    for needle in [
        "sandbox-17",
        "52:54:00:12:34:56",
        "10.0.0.2/30",
        "gateway 10.0.0.1",
        "example.com",
        "127.0.0.1:8080 -> guest:3000",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from\n{stdout}");
    }
    let (code, stdout, _) = check(&repo.join("policy/deny-all.toml"));
    assert_eq!(code, Some(0));
    assert!(stdout.contains("nothing leaves the VM"), "{stdout}");
}

#[test]
fn invalid_policies_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let vm = "[vm]\nname = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"10.0.0.2/30\"\n";
    let cases = [
        ("unknown.toml", format!("{vm}colour = \"blue\"\n"), ":5:", "vm.colour", "unknown field"),
        ("mac.toml", vm.replace("52:54:00:12:34:56", "ff:ff:ff:ff:ff:ff"), ":3:", "vm.mac", "multicast"),
        ("gw.toml", format!("{vm}gateway = \"192.168.1.1\"\n"), ":5:", "vm.gateway", "outside the VM's subnet"),
        ("port.toml", format!("{vm}[proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [70000]\n"), ":9:", "outbound[0].ports", "not a port"),
        ("udp.toml", format!("{vm}[proxy]\nhttp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"udp\"\nports = [53]\nvia = \"http\"\n"), ":10:", "outbound[0].via", "udp cannot go"),
        ("syntax.toml", "[vm\n".to_string(), ":1:", "vm", ""),
    ];
    for (name, text, line, key, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = check(&path);
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(stdout.is_empty(), "{name}: nothing on stdout");
        let line_text = stderr.trim_end();
        assert_eq!(line_text.lines().count(), 1, "{name}: one line: {stderr}");
        assert!(
            line_text.starts_with(&format!("{}{line}", path.display())),
            "{name}: {stderr}"
        );
        assert!(
            line_text.contains(&format!(": {key}: ")) && line_text.contains(reason),
            "{name}: {stderr}"
        );
    }
    let (code, _, stderr) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("missing.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}
