//! migratectl with a running guest (restored from the suite's booted guest; two agents and
//! storaged on loopback): `console` attaches to the guest's serial line (the guest agent
//! answers a command typed into it) and Ctrl-] detaches with the guest still running; after
//! the guest migrated from a to b, asking a about it says where it runs now (stop, migrate,
//! console, and show once a forgot it), as text and as JSON.

use e2e::migrated::{write_restored_guest_toml, Migrated};
use e2e::process::wait_for;
use e2e::storaged::Storaged;
use e2e::GuestTest;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// An agent `host` on loopback with storaged `s` and `peers`.
fn agent(dir: &Path, host: &str, s: &Storaged, peers: &[(&str, &str)]) -> Migrated {
    Migrated::on_loopback(dir, host, s, peers, |_| {}).unwrap()
}

/// Starts vm1 (the suite's booted guest, data disk on `vm1-data`) on `m`.
fn run_vm1(m: &Migrated, image: &e2e::image::GuestImage, dir: &Path) {
    let toml = dir.join("vm1.toml");
    let booted = e2e::snapshot::booted(image).unwrap();
    write_restored_guest_toml(&toml, "vm1", image, &booted, "vm1-data").unwrap();
    let rec = m.ctl(&["run", toml.to_str().unwrap()]).unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
}

#[test]
fn console_attaches_to_the_guest_and_detaches_on_ctrl_bracket() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("console_attaches_to_the_guest_and_detaches_on_ctrl_bracket")
    else {
        return;
    };
    let storaged =
        Storaged::start_with_data_volume(&dir.path().join("storaged"), "vm1-data").unwrap();
    let a = agent(dir.path(), "host-a", &storaged, &[]);
    run_vm1(&a, &image, dir.path());

    let mut console = Command::new(e2e::binary("migratectl"))
        .arg("--socket")
        .arg(&a.socket)
        .args(["console", "vm1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = console.stdout.take().unwrap();
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut stdin = console.stdin.take().unwrap();
    stdin.write_all(b"ping\n").unwrap();
    stdin.flush().unwrap();
    wait_for("the guest agent's pong on the console", LIMIT, || {
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        text.contains("@agent ok pong").then_some(())
    })
    .unwrap();

    // Ctrl-]: migratectl ends, the guest runs on.
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    let status = wait_for("migratectl to detach", LIMIT, || {
        console.try_wait().ok().flatten()
    })
    .unwrap();
    reader.join().unwrap();
    let mut err = String::new();
    console
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("escape character is ^]"), "{err}");
    assert!(err.contains("detached from the console of vm1"), "{err}");
    assert_eq!(a.instance("vm1").unwrap()["state"], "running");
    assert_eq!(a.vmm_pids().len(), 1);
}

#[test]
fn the_host_a_guest_left_says_where_it_runs_now() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("the_host_a_guest_left_says_where_it_runs_now")
    else {
        return;
    };
    let storaged =
        Storaged::start_with_data_volume(&dir.path().join("storaged"), "vm1-data").unwrap();
    let b = agent(dir.path(), "host-b", &storaged, &[]);
    let a = agent(dir.path(), "host-a", &storaged, &[("host-b", &b.listen)]);
    run_vm1(&a, &image, dir.path());
    let done = a.ctl(&["migrate", "vm1", "--to", "host-b"]).unwrap();
    assert_eq!(done["phase"], "completed", "{done}");
    b.wait_state("vm1", "running", LIMIT).unwrap();

    let moved = format!("vm1 now runs on host-b ({})", b.listen);
    for args in [
        vec!["stop", "vm1"],
        vec!["migrate", "vm1", "--to", "host-b"],
    ] {
        let out = a.ctl_raw(&args).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim(), format!("migratectl: {moved}"), "{args:?}");
    }
    let out = a.ctl_raw(&["--json", "stop", "vm1"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({ "error": moved }));
    let out = a.ctl_raw(&["console", "vm1"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vm1 is migrated away (migrated to host-b)"),
        "{err}"
    );

    // Forgotten on a, it is still found there by where it went.
    a.ctl(&["rm", "vm1"]).unwrap();
    let out = a.ctl_raw(&["show", "vm1"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), format!("migratectl: {moved}"));
    assert_eq!(b.instance("vm1").unwrap()["state"], "running");
}
