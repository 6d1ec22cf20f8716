//! `Policy::check`: every error of a file, the first as `Policy::parse` gives it, the others in
//! file order, each mistake once; warnings of the valid parts.

use super::*;

/// `(line, col, key)` of every error, and the first error's message as `parse` gives it.
#[track_caller]
fn errors(text: &str) -> Vec<(usize, usize, String)> {
    let checked = Policy::check_text(text, Path::new("p.toml"));
    let errors = checked.result.expect_err("policy should be invalid");
    let first = parse(text).expect_err("invalid").to_string();
    assert_eq!(
        errors.first.to_string(),
        first,
        "the first error is parse's"
    );
    errors
        .iter()
        .map(|e| {
            let l = e.location().expect("located");
            (l.line, l.col, l.key.to_string())
        })
        .collect()
}

fn at(line: usize, col: usize, key: &str) -> (usize, usize, String) {
    (line, col, key.to_string())
}

#[test]
fn a_valid_policy_has_no_errors_and_its_warnings() {
    let text = rule("protocol = \"tcp\"\nports = [443]\n");
    let checked = Policy::check_text(&text, Path::new("p.toml"));
    let policy = checked.result.expect("valid");
    assert_eq!(checked.warnings, policy.warnings());
    assert_eq!(checked.warnings.len(), 1);
}

#[test]
fn a_syntax_error_is_reported_alone() {
    // Past a syntax error the parser only guesses: one unclosed array would be a dozen lines.
    let text = format!("{VM}{PROXY}[[outbound]]\nports = [80\nx = 1\n[limits]\nmax_flows = 0\n");
    assert_eq!(errors(&text).len(), 1);
}

#[test]
fn each_malformed_rule_is_reported_and_the_others_judged() {
    let text = rule(
        "protocol = \"tcp\"\nprots = [80]\n[[outbound]]\nprotocol = \"tcp\"\nports = [0]\n[[outbound]]\nports = 1\n",
    );
    assert_eq!(
        errors(&text),
        [
            at(10, 1, "outbound[0].prots"),
            at(13, 10, "outbound[1].ports"),
            at(15, 9, "outbound[2].ports"),
        ]
    );
}

#[test]
fn a_malformed_proxy_table_does_not_blame_the_rules() {
    let text = format!(
        "{VM}[proxy]\nhtpp = \"127.0.0.1:3128\"\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\n"
    );
    assert_eq!(errors(&text), [at(6, 1, "proxy.htpp")]);
    // An absent [proxy] does: the rule needs one.
    let text = format!("{VM}[[outbound]]\nprotocol = \"tcp\"\nports = [0]\n");
    // The first is parse's (ports are judged before the proxy), the others in file order.
    assert_eq!(
        errors(&text),
        [at(7, 10, "outbound[0].ports"), at(6, 12, "outbound[0].via")]
    );
}

#[test]
fn a_wrong_proxy_address_is_not_a_missing_one() {
    let text = format!("{VM}[proxy]\nhttp = \"127.0.0.1\"\nexplicit_port = 53\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\nto = [\"a.example\"]\n");
    assert_eq!(
        errors(&text),
        [at(6, 8, "proxy.http"), at(7, 17, "proxy.explicit_port")]
    );
}

#[test]
fn checks_that_depend_on_a_wrong_value_are_skipped() {
    // A wrong address: the gateway is not judged against it.
    let text = format!(
        "{}gateway = \"10.9.9.9\"\n",
        vm_with("10.0.0.2/30", "10.0.0.2")
    );
    assert_eq!(errors(&text), [at(4, 11, "vm.address")]);
    // A wrong protocol: neither its default proxy nor udp-over-http is judged.
    let text = format!("{VM}[[outbound]]\nprotocol = \"icmp\"\nports = [1]\nvia = \"http\"\n");
    assert_eq!(errors(&text), [at(6, 12, "outbound[0].protocol")]);
    // A wrong mode or upstream: not their combination.
    let dns = |body: &str| format!("{VM}[dns]\n{body}\n");
    assert_eq!(
        errors(&dns("mode = \"dot\"\nupstream = \"127.0.0.1:53\"")),
        [at(6, 8, "dns.mode")]
    );
    assert_eq!(
        errors(&dns("upstream = \"resolver\"")),
        [at(6, 12, "dns.upstream")]
    );
}

#[test]
fn every_element_of_a_list_is_judged() {
    let dns = format!(
        "{VM}[dns]\nallow = [\"a b\", \"ok.example\", \"c d\"]\nrecords = {{ \"x y\" = \"nope\", \"db.internal\" = \"10.0.0.1\", \"DB.internal\" = \"10.0.0.2\" }}\n"
    );
    let got = errors(&dns);
    let want = [
        at(6, 10, "dns.allow"),
        at(6, 31, "dns.allow"),
        at(7, 13, "dns.records.\"x y\""),
        at(7, 21, "dns.records.\"x y\""),
        at(7, 57, "dns.records.\"DB.internal\""),
    ];
    assert_eq!(got, want);
}

#[test]
fn forwards_are_judged_one_by_one_and_clash_by_their_own_index() {
    let text = format!(
        "{VM}[[forward]]\nlisten = \"127.0.0.1:8080\"\nguest_port = 0\n[[forward]]\nlisten = \"127.0.0.1:9090\"\nguest_prot = 1\n[[forward]]\nlisten = \"0.0.0.0:8080\"\nguest_port = 81\nfrom = []\n"
    );
    let checked = Policy::check_text(&text, Path::new("p.toml"));
    let errors: Vec<String> = checked
        .result
        .expect_err("invalid")
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors[0].starts_with("p.toml:10:1: forward[1].guest_prot: unknown key"));
    assert!(errors[1].starts_with("p.toml:7:14: forward[0].guest_port: 0 is not a port"));
    assert!(errors[2].starts_with(
        "p.toml:12:10: forward[2].listen: 0.0.0.0:8080 overlaps forward[0].listen (127.0.0.1:8080)"
    ));
    assert!(errors[3].starts_with("p.toml:14:8: forward[2].from: is empty"));
}

#[test]
fn warnings_come_from_the_valid_rules_with_their_own_index() {
    let text = rule(
        "protocol = \"tcp\"\nports = [0]\n[[outbound]]\nprotocol = \"tcp\"\nports = [443]\n[[outbound]]\nprotocol = \"udp\"\nports = [53]\nto = [\"a.example\"]\n",
    );
    let checked = Policy::check_text(&text, Path::new("p.toml"));
    assert!(checked.result.is_err());
    assert_eq!(checked.warnings.len(), 1, "{:?}", checked.warnings);
    assert!(
        checked.warnings[0].starts_with("outbound[1] (tcp ports 443) allows any name"),
        "{}",
        checked.warnings[0]
    );
}

#[test]
fn an_unreadable_file_is_one_io_error() {
    let checked = Policy::check(Path::new("/nonexistent/moat.toml"));
    let errors = checked.result.expect_err("unreadable");
    assert!(matches!(errors.first, PolicyError::Io { .. }));
    assert!(errors.others.is_empty() && checked.warnings.is_empty());
}
