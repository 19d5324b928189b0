//! A source VMM never resumes a guest by itself once COMMIT is on its way: between real VMMs of
//! a halting kernel ([`e2e::tiny`]), the destination stops itself right after it read COMMIT
//! (`VMHOP_STALL_AT=incoming.commit`) and is killed there. The source cannot know whether the destination
//! acted on it: its migration fails as undecided, the guest stays paused, a resume is refused,
//! and only `POST /v1/migration/abort` (what the caller sends once it knows that the destination
//! cannot run the guest) runs it again.

use e2e::tiny::{hlt_kernel, TinyVmm};
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// Waits until process `pid` is stopped (state `T` in /proc/PID/stat).
fn wait_stopped(pid: u32) {
    let t = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()) == Some('T') {
            return;
        }
        assert!(t.elapsed() < WAIT, "pid {pid} never stopped: {stat}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_source_whose_commit_is_unconfirmed_stays_paused_until_aborted() {
    if !e2e::kvm_available("a_source_whose_commit_is_unconfirmed_stays_paused_until_aborted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = hlt_kernel(dir.path()).unwrap();
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let dst = TinyVmm::start_env(
        dir.path(),
        "dst",
        &kernel,
        &["--incoming", &addr],
        &[("VMHOP_STALL_AT", "incoming.commit")],
    )
    .unwrap();
    let mut src = TinyVmm::start(dir.path(), "src", &kernel, &[]).unwrap();
    let (code, body) = src
        .send(&json!({"destination": addr, "resume": "wait"}))
        .unwrap();
    assert_eq!(code, 202, "{body}");
    wait_stopped(dst.pid());
    drop(dst);

    let m = src.wait_phase(&["failed", "handed-over"], WAIT).unwrap();
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(
        m["error"]
            .as_str()
            .unwrap_or_default()
            .contains("did not confirm COMMIT"),
        "{m}"
    );
    assert_eq!(src.info().unwrap()["state"], "paused", "{m}");
    let (code, body) = src.api("POST", "/v1/vm/resume").unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("may hold the guest"), "{body}");
    assert_eq!(src.info().unwrap()["state"], "paused");

    let (code, body) = src.api("POST", "/v1/migration/abort").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(src.info().unwrap()["state"], "running");
}
