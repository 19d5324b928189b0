//! The destination cut at COMMIT, with the real VMM and storaged of [`common::hosts`]: b's VMM
//! stops itself right after it read COMMIT (its fault point `incoming.commit`, `VMHOP_STALL_AT`), before it acted on it.
//! Whether it then dies there or stays frozen until the source gave up, the guest must run on
//! exactly one host, never on both and never on none: the source may not take COMMIT as
//! delivered before the destination confirmed it, and may resume only once storaged fenced the
//! destination off.

mod common;

use common::hosts::{hosts_with, start_migration, wait_phase, HostsOptions};
use common::hosts::{SplitBrainWatch, DEADLINE};
use migrated::migration::record::Phase;
use std::time::{Duration, Instant};

/// The source resumed only after storaged fenced the destination off: the record notes the
/// fence before the resume.
fn resumed_after_the_fence(r: &migrated::migration::record::MigrationRecord) {
    let at = |what: &str| r.steps.iter().position(|s| s.note.contains(what));
    let fenced = at("can no longer take over").unwrap_or_else(|| panic!("no fence: {r:?}"));
    let resumed = at("the guest runs on the source").unwrap_or_else(|| panic!("{r:?}"));
    assert!(fenced < resumed, "{r:?}");
}

/// Options whose host b's VMMs stop at COMMIT.
fn frozen_at_commit() -> HostsOptions {
    HostsOptions {
        b_vmm_env: vec![("VMHOP_STALL_AT".into(), "incoming.commit".into())],
        ..Default::default()
    }
}

/// Waits until process `pid` is stopped (state `T` in /proc/PID/stat).
async fn wait_stopped(pid: u32) {
    let t = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        if state == Some('T') {
            return;
        }
        assert!(t.elapsed() < DEADLINE, "pid {pid} never stopped: {stat}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts migrating vm1 from a to b and waits until b's VMM froze at COMMIT; returns the
/// migration's id and the frozen VMM's pid.
async fn migrate_until_frozen(h: &common::hosts::Hosts) -> (String, u32) {
    let id = start_migration(&h.a, "b").await;
    let t = Instant::now();
    let pid = loop {
        if let Some(pid) = h.b.instance("vm1").ok().and_then(|i| i.pid) {
            break pid;
        }
        assert!(t.elapsed() < DEADLINE, "no VMM on b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    wait_stopped(pid).await;
    (id, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_dies_at_commit_leaves_the_guest_on_the_source() {
    if !e2e::kvm_available("a_destination_that_dies_at_commit_leaves_the_guest_on_the_source") {
        return;
    }
    let h = hosts_with(frozen_at_commit()).await;
    let started = h.guest_on_a().await;
    let watch = SplitBrainWatch::start(&h);
    let (id, pid) = migrate_until_frozen(&h).await;
    // SAFETY: kill(2) has no memory effects; pid is the frozen VMM this test waited for.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }

    let r = wait_phase(&h.a, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert!(r.flipped.is_empty(), "{r:?}");
    resumed_after_the_fence(&r);
    assert_eq!(h.a.instance("vm1").unwrap().pid, started.pid);
    h.runs_only_on(&h.a, &h.b).await;
    assert!(!watch.ran_on_both());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_frozen_at_commit_until_the_source_gave_up_never_runs_the_guest() {
    if !e2e::kvm_available(
        "a_destination_frozen_at_commit_until_the_source_gave_up_never_runs_the_guest",
    ) {
        return;
    }
    let h = hosts_with(frozen_at_commit()).await;
    let started = h.guest_on_a().await;
    let watch = SplitBrainWatch::start(&h);
    let (id, pid) = migrate_until_frozen(&h).await;

    let r = wait_phase(&h.a, &id, Phase::is_terminal).await;
    // The frozen VMM goes on, if it still exists: it must not run the guest.
    // SAFETY: kill(2) has no memory effects; pid is the VMM this test froze (or a dead pid).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGCONT);
    }
    let b = wait_phase(&h.b, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert_eq!(b.phase, Phase::Aborted, "{b:?}");
    resumed_after_the_fence(&r);
    assert_eq!(h.a.instance("vm1").unwrap().pid, started.pid);
    h.runs_only_on(&h.a, &h.b).await;
    assert!(!watch.ran_on_both());
}
