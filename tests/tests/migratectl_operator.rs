//! What an operator meets with migratectl and no guest running (no KVM needed): `hosts` says
//! whether this host reaches storaged, before and after storaged stops; `console` refuses
//! `--host` (its socket is local to the guest's host) and an instance without a VMM, with the
//! cause and no HTTP status, as JSON with `--json`; migrated started with `--log-json` has its
//! VMMs log JSON lines too, and `vmm --log-json` does on its own.

use e2e::migrated::{migratectl as ctl, Migrated, MigratedOptions};
use e2e::storaged::Storaged;
use std::process::Command;

/// A guest whose VMM cannot start (its kernel does not exist).
fn broken_guest(dir: &std::path::Path) -> String {
    let guest = dir.join("vm1.toml");
    std::fs::write(
        &guest,
        "name = 'vm1'\nkernel = '/nonexistent/vmlinux'\nmemory_mib = 64\n",
    )
    .unwrap();
    guest.to_str().unwrap().to_string()
}

#[test]
fn hosts_say_whether_storaged_answers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("storaged")).unwrap();
    let mut storaged = Storaged::start(&dir.path().join("storaged")).unwrap();
    let api = storaged.api.to_string();
    let m = Migrated::start(
        &dir.path().join("a"),
        MigratedOptions::local("host-a", &api, &storaged.nbd.to_string()),
    )
    .unwrap();

    let hosts = m.ctl(&["hosts"]).unwrap();
    assert_eq!(hosts[0]["storaged"]["addr"], api.as_str(), "{hosts}");
    assert_eq!(hosts[0]["storaged"]["reachable"], true, "{hosts}");
    let out = m.ctl_raw(&["hosts"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("storaged at {api} from host-a: reachable")),
        "{text}"
    );

    storaged.terminate().unwrap();
    let hosts = m.ctl(&["hosts"]).unwrap();
    assert_eq!(hosts[0]["storaged"]["reachable"], false, "{hosts}");
    let why = hosts[0]["storaged"]["error"].as_str().unwrap();
    assert!(why.contains(&api), "{why}");
    let out = m.ctl_raw(&["hosts"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("storaged at {api} from host-a: unreachable")),
        "{text}"
    );
}

#[test]
fn console_needs_the_local_host_and_a_running_guest() {
    let dir = tempfile::tempdir().unwrap();
    let m = Migrated::start(dir.path(), MigratedOptions::without_storaged("host-a")).unwrap();
    let sock = m.socket.to_str().unwrap();

    // Over --host there is no serial socket to reach: a usage error that says what to do.
    let (code, _, err) = ctl(&["--host", &m.listen, "console", "vm1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("needs the local host") && err.contains("migratectl console vm1"),
        "{err}"
    );

    // No such instance: the cause, as JSON with --json, without an HTTP status.
    let (code, out, err) = ctl(&["--socket", sock, "--json", "console", "nope"]);
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(e.starts_with("instance nope not found"), "{e}");
    assert!(!e.contains("404") && !e.contains("Not Found"), "{e}");

    // An instance whose VMM never started has no console.
    let out = m.ctl_raw(&["run", &broken_guest(dir.path())]).unwrap();
    assert!(!out.status.success());
    let (code, _, err) = ctl(&["--socket", sock, "console", "vm1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("vm1 is failed") && err.contains("no console"),
        "{err}"
    );
}

/// Every non-empty line of `text` is a JSON object with a level.
fn all_json(what: &str, text: &str) {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "{what}: no line");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: {e}: {l:?}"));
        assert!(v["level"].is_string(), "{what}: {l}");
    }
}

#[test]
fn vmms_log_json_lines_when_migrated_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = MigratedOptions::without_storaged("host-a");
    opts.log_json = true;
    let m = Migrated::start(dir.path(), opts).unwrap();
    let out = m.ctl_raw(&["run", &broken_guest(dir.path())]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    all_json("migrated's log", &m.log());
    let vmm_log = m.state_dir.join("instances/vm1/vmm.log");
    let text = std::fs::read_to_string(&vmm_log).unwrap();
    all_json("the VMM's log", &text);
    assert!(text.contains("/nonexistent/vmlinux"), "{text}");

    // The VMM on its own: JSON lines with the flag, its plain exit message without.
    let vmm = |json: bool| {
        let mut c = Command::new(e2e::binary("vmm"));
        c.arg("run");
        if json {
            c.arg("--log-json");
        }
        let out = c
            .args(["--kernel", "/nonexistent/vmlinux"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = vmm(true);
    assert_eq!(code, Some(1), "{err}");
    all_json("vmm --log-json", &err);
    assert!(
        err.contains("\"ERROR\"") && err.contains("/nonexistent/vmlinux"),
        "{err}"
    );
    let (code, err) = vmm(false);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("vmm: ") || err.contains("\nvmm: "), "{err}");
}
