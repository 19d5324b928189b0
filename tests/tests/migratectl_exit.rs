//! migratectl's exit statuses and its `abort` against a migrated without guests (no KVM
//! needed): usage errors, an unreachable migrated, a refused request, an abort of a migration
//! that does not exist; and migrated's `GET /metrics` answers at zero.

use e2e::metrics::scrape_unix;
use e2e::migrated::{migratectl as ctl, Migrated, MigratedOptions};

#[test]
fn migratectl_exit_statuses_are_distinct_and_documented() {
    let (code, out, _) = ctl(&["--help"]);
    assert_eq!(code, 0);
    for line in [
        "0  done",
        "1  failed",
        "2  usage",
        "3  aborted",
        "4  unreachable",
    ] {
        assert!(out.contains(line), "--help lacks {line:?}:\n{out}");
    }
    assert!(out.contains("abort"), "{out}");

    // Usage.
    let (code, _, err) = ctl(&["--no-such-flag", "hosts"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ctl(&["abort"]);
    assert_eq!(code, 2, "{err}");

    // Unreachable: nobody at the socket, nobody at the address; as JSON with --json.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nobody.sock");
    let (code, _, err) = ctl(&["--socket", nowhere.to_str().unwrap(), "hosts"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("nobody.sock"), "{err}");
    let (code, out, _) = ctl(&["--host", "127.0.0.1:9", "--json", "instances"]);
    assert_eq!(code, 4, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["error"].as_str().unwrap().contains("127.0.0.1:9"), "{v}");

    // Refused by a running migrated: failed.
    let m = Migrated::start(dir.path(), MigratedOptions::without_storaged("host-a")).unwrap();
    let sock = m.socket.to_str().unwrap();
    let (code, _, err) = ctl(&["--socket", sock, "abort", "vm1.host-a.1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("vm1.host-a.1"), "{err}");
    assert!(!err.contains("404"), "no HTTP status in the message: {err}");
    let (code, _, err) = ctl(&["--socket", sock, "migrate", "vm1", "--to", "b"]);
    assert_eq!(code, 1, "{err}");

    // The metrics answer, at zero, named by the conventions.
    let metrics = scrape_unix(&m.socket).unwrap();
    metrics.check_names("migrated_").unwrap();
    let completed = [("role", "source"), ("outcome", "completed")];
    assert_eq!(
        metrics
            .value("migrated_migrations_total", &completed)
            .unwrap(),
        0.0
    );
    assert_eq!(
        metrics.value("migrated_migrations_active", &[]).unwrap(),
        0.0
    );
}
