//! Logs a person reads in a file or the journal carry no terminal colour codes.

mod support;

use std::time::Duration;

use support::*;

#[test]
fn logs_to_a_file_have_no_ansi_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("moat.log");
    let file = std::fs::File::create(&log).unwrap();
    let moat = MoatProcess::start(POLICY, &["--no-sandbox"], file.into());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while std::time::Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("INFO") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(moat);
    assert!(text.contains("INFO"), "moat logged at info level:\n{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no escape codes in a file:\n{text:?}"
    );
}
