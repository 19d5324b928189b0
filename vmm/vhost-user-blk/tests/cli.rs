//! The backend's exit message when it cannot start: one line that names the cause once, and a
//! JSON line with `--log-json` (the flag of the other daemons; the older `--json-logs` too).

use std::process::Command;

/// Runs the backend on a disk file that does not exist; returns its stderr.
fn fail_to_start(flags: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .arg("--socket")
        .arg(dir.path().join("blk.sock"))
        .arg("--file")
        .arg(dir.path().join("missing.img"))
        .args(flags)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_backend_that_cannot_start_says_why_once() {
    let err = fail_to_start(&[]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("vhost-user-blk: open "), "{err}");
    assert!(err.contains("missing.img"), "{err}");
    assert_eq!(
        err.matches("missing.img").count(),
        1,
        "the path said twice: {err}"
    );
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn with_log_json_the_exit_message_is_a_json_line() {
    for flag in ["--log-json", "--json-logs"] {
        let err = fail_to_start(&[flag]);
        let lines: Vec<&str> = err.lines().collect();
        assert!(!lines.is_empty(), "{flag}: nothing on stderr");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{flag}: not JSON ({e}): {line}"));
            assert!(v.get("level").is_some(), "{flag}: {line}");
        }
        let last: serde_json::Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
        assert_eq!(last["level"], "ERROR", "{flag}: {err}");
        assert!(last.to_string().contains("No such file"), "{flag}: {err}");
    }
}
