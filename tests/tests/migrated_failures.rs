//! Failures injected into live migrations between two namespaced hosts, with a real guest whose
//! memory and disk workloads run throughout: storaged refusing the flip of a guest's volumes
//! (nothing moves, the source keeps the guest), the destination VMM killed during pre-copy, the
//! source migrated killed after the hot copy (the destination completes alone, the restarted
//! source cleans up), the source cut off from storaged at the flip (it stays paused, the
//! destination takes over with the same conditional flip, the source completes once the link
//! is back), and migrated restarted during pre-copy on either side.
//! After each: exactly one VMM runs the guest, it never rebooted, its memory pattern is intact
//! and every disk record it was acknowledged verifies.
//!
//! A migration of this small guest takes a fraction of a second; to act during a phase, the
//! test slows the migration stream with traffic shaping on the source host (the agents' REST
//! port exempted) or stops storaged (SIGSTOP) so that the source waits on the flip, and
//! releases it after acting.

use agent_proto::{expected_checksum, Fields};
use e2e::agent::AgentConn;
use e2e::image::GuestImage;
use e2e::migrated::{agent_of, write_guest_toml, write_restored_guest_toml, Migration};
use e2e::process::wait_for;
use e2e::two_hosts::{TwoHosts, AGENT_PORT};
use e2e::workload::{assert_same_boot, stop_and_verify_disk, stop_disk};
use e2e::GuestTest;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(400);
const REPLY: Duration = Duration::from_secs(120);
const PHASE: Duration = Duration::from_secs(120);
const MIB: usize = 8;
/// The rate the migration stream is slowed to while the test acts.
const SLOW: &str = "1mbit";

/// A running guest started on host a and what it has done so far.
struct Guest {
    /// The pid of its VMM on a.
    pid: Option<u64>,
    boot_id: String,
    seq: u64,
    acked: u64,
}

/// What each test starts from: two namespaced hosts sharing a storaged with `volumes`, and the
/// guest running on a (see [`boot_on_a`]). `None` when the test is skipped (see
/// [`GuestTest::new`]).
fn guest_on_a(
    test: &str,
    volumes: &[&str],
) -> Option<(tempfile::TempDir, TwoHosts, Guest, AgentConn)> {
    let GuestTest { image, dir } = GuestTest::new(test)?;
    let h = TwoHosts::start(dir.path(), volumes, 3000).unwrap();
    let (g, agent) = boot_on_a(&h, &image, dir.path(), volumes);
    Some((dir, h, g, agent))
}

/// Starts the guest on a with its memory and disk workloads running.
fn boot_on_a(h: &TwoHosts, image: &GuestImage, dir: &Path, volumes: &[&str]) -> (Guest, AgentConn) {
    let toml = dir.join("vm1.toml");
    // One data volume: the suite's booted guest fits; more: a boot of its own.
    let booted = match volumes {
        [volume] => {
            let booted = e2e::snapshot::booted(image).unwrap();
            write_restored_guest_toml(&toml, "vm1", image, &booted, volume).unwrap();
            Some(booted)
        }
        _ => {
            write_guest_toml(&toml, "vm1", image, 256, volumes).unwrap();
            None
        }
    };
    let rec = h.a.ctl(&["run", toml.to_str().unwrap()]).unwrap();
    let mut agent = agent_of(&rec, &dir.join("serial-a.log")).unwrap();
    let boot_id = match booted {
        Some(b) => b.boot_id,
        None => {
            let ready = agent.wait_ready(BOOT).unwrap();
            ready.get("boot_id").unwrap().to_string()
        }
    };
    agent.command(&format!("mem start {MIB}"), REPLY).unwrap();
    agent.command("disk start", REPLY).unwrap();
    let mut g = Guest {
        pid: None,
        boot_id,
        seq: 0,
        acked: 0,
    };
    advances(&mut agent, &mut g);
    g.pid = h.a.instance("vm1").unwrap()["pid"].as_u64();
    (g, agent)
}

fn mem_status(agent: &mut AgentConn) -> Fields {
    let s = agent.command("mem status", REPLY).unwrap();
    assert_eq!(s.num("errors"), Some(0), "{s:?}");
    assert_eq!(
        s.num("checksum"),
        Some(expected_checksum(MIB, &s.nums("seqs").unwrap())),
        "{s:?}"
    );
    s
}

/// The same boot, the memory pattern intact and advancing, the disk writer running and
/// acknowledging more records.
fn advances(agent: &mut AgentConn, g: &mut Guest) {
    assert_same_boot(agent, &g.boot_id);
    g.seq = wait_for("the memory workload to advance", REPLY, || {
        let s = mem_status(agent).num("seq")?;
        (s > g.seq).then_some(s)
    })
    .unwrap();
    g.acked = wait_for("the disk workload to advance", REPLY, || {
        let s = agent.command("disk status", REPLY).ok()?;
        assert_eq!(s.get("state"), Some("running"), "{s:?}");
        let acked = s.num("acked")?;
        (acked > g.acked).then_some(acked)
    })
    .unwrap();
}

/// The guest runs on `host` only: its instance is running there with a live VMM, the other
/// host has no VMM and no live instance, and `host` holds every volume alone.
fn runs_only_on(h: &TwoHosts, host: &str, volumes: &[&str]) -> Value {
    let other = if host == "a" { "b" } else { "a" };
    let rec = h.agent(host).wait_state("vm1", "running", REPLY).unwrap();
    assert_eq!(rec["migration"], Value::Null, "{rec}");
    let pids = h.agent(host).vmm_pids();
    assert_eq!(pids.len(), 1, "{host}: {pids:?}");
    assert_eq!(rec["pid"].as_u64(), Some(u64::from(pids[0])), "{rec}");
    assert!(
        h.agent(other).vmm_pids().is_empty(),
        "a VMM still runs on {other}"
    );
    // Every VMM process started for this test, whoever started it.
    let root = h.a.work_dir.parent().unwrap().display().to_string();
    let all_vm1 = e2e::migrated::vmm_processes_with(&root);
    assert_eq!(all_vm1, pids, "VMM processes of this test's guest");
    if let Ok(o) = h.agent(other).instance("vm1") {
        let state = o["state"].as_str().unwrap_or("");
        assert!(
            ["stopped", "failed", "migrated-away", "exited"].contains(&state),
            "{other}: {o}"
        );
    }
    for v in volumes {
        let leases = h.storaged.leases(v).unwrap();
        assert_eq!(
            leases,
            vec![(host.to_string(), "primary".to_string())],
            "{v}"
        );
    }
    rec
}

/// The guest runs on a only (see [`runs_only_on`]), in the VMM process it started in, and goes
/// on (see [`advances`]).
fn still_on_a(h: &TwoHosts, volumes: &[&str], agent: &mut AgentConn, g: &mut Guest) {
    let on_a = runs_only_on(h, "a", volumes);
    assert_eq!(on_a["pid"].as_u64(), g.pid);
    advances(agent, g);
}

/// The migration stream from a to b crawls (the agents' REST calls do not).
fn slow_stream(h: &TwoHosts) {
    h.rig
        .host("a")
        .shape(h.rig.host("b").addr, Some(AGENT_PORT), SLOW)
        .unwrap();
}

/// Starts migrating vm1 from a to b with the stream crawling (see [`slow_stream`]) and waits
/// until the source is in pre-copy; returns the `migratectl migrate` run and the source's record.
fn migrate_slowly(h: &TwoHosts) -> (Migration, Value) {
    slow_stream(h);
    let m = Migration::start(&h.a, &["vm1", "--to", "b"]).unwrap();
    let rec = h.a.wait_migration_phase("vm1", "precopy", PHASE).unwrap();
    (m, rec)
}

fn unshape(h: &TwoHosts) {
    h.rig.host("a").unshape().unwrap();
}

fn steps(m: &Value) -> Vec<String> {
    m["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|s| format!("{} {}", s["phase"].as_str().unwrap_or(""), s["note"]))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn migrated_refused_flip_moves_nothing_and_the_source_keeps_the_guest() {
    let volumes = ["vm1-data", "vm1-extra"];
    let Some((_dir, h, mut g, mut agent)) = guest_on_a(
        "migrated_refused_flip_moves_nothing_and_the_source_keeps_the_guest",
        &volumes,
    ) else {
        return;
    };

    // During pre-copy, storaged loses b's standby lease on the second volume: the group flip
    // of both volumes is refused and neither moves.
    let (m, _) = migrate_slowly(&h);
    h.storaged
        .cli(&["lease", "revoke", "vm1-extra", "--host", "b"])
        .unwrap();
    unshape(&h);
    let (ok, rec, err) = m.wait().unwrap();
    assert!(!ok, "{rec} {err}");
    assert_eq!(rec["phase"], "aborted", "{rec}");
    assert!(
        rec["error"].as_str().unwrap().contains("flip refused"),
        "{rec}"
    );
    assert_eq!(rec["flipped"], serde_json::json!([]), "{rec}");
    let s = steps(&rec);
    assert!(
        s.iter().any(|s| s.contains("its standby leases ended")),
        "{s:#?}"
    );
    assert!(!s.iter().any(|s| s.contains("lease flipped")), "{s:#?}");

    // The source VMM resumed and the disk writer never saw an error.
    still_on_a(&h, &volumes, &mut agent, &mut g);
    stop_and_verify_disk(&mut agent);
}

#[test]
fn migrated_destination_vmm_killed_during_precopy_leaves_the_guest_on_the_source() {
    let volumes = ["vm1-data"];
    let Some((_dir, h, mut g, mut agent)) = guest_on_a(
        "migrated_destination_vmm_killed_during_precopy_leaves_the_guest_on_the_source",
        &volumes,
    ) else {
        return;
    };

    let (m, _) = migrate_slowly(&h);
    let dest = h.b.vmm_pids();
    assert_eq!(dest.len(), 1, "{dest:?}");
    // SAFETY: kill(2) on the pid of the destination VMM, just read from its pid file and
    // checked to be a live vmm process.
    unsafe {
        libc::kill(dest[0] as libc::pid_t, libc::SIGKILL);
    }
    let (ok, rec, err) = m.wait().unwrap();
    unshape(&h);
    assert!(!ok, "{rec} {err}");
    assert_eq!(rec["phase"], "aborted", "{rec}");
    eprintln!("aborted: {}", rec["error"]);

    still_on_a(&h, &volumes, &mut agent, &mut g);
    stop_and_verify_disk(&mut agent);
}

#[test]
fn migrated_source_agent_killed_after_the_hot_copy_completes_on_the_destination() {
    let volumes = ["vm1-data"];
    let Some((dir, mut h, mut g, mut agent)) = guest_on_a(
        "migrated_source_agent_killed_after_the_hot_copy_completes_on_the_destination",
        &volumes,
    ) else {
        return;
    };
    // storaged is stopped while the source waits on the flip: no disk request may be in
    // flight then (the source's drain would wait for it), so the writer pauses meanwhile.
    let acked = stop_disk(&mut agent);
    drop(agent);

    // storaged stops answering: the source hands the guest over, then waits on the flip, and
    // is killed there.
    // (After the destination VMM opened its standby connection, while the stream crawls.)
    let (m, _) = migrate_slowly(&h);
    h.storaged.signal(libc::SIGSTOP).unwrap();
    unshape(&h);
    let rec = h.a.wait_migration_phase("vm1", "flipping", PHASE);
    if rec.is_ok() {
        h.a.kill9();
    }
    h.storaged.signal(libc::SIGCONT).unwrap();
    let rec = rec.unwrap_or_else(|e| {
        panic!(
            "{e}: {:#?}\n{}",
            h.a.migrations().unwrap_or_default(),
            h.a.log()
        )
    });
    let id = rec["id"].as_str().unwrap().to_string();
    let (ok, _, _) = m.wait().unwrap();
    assert!(!ok, "migratectl lost its agent");

    // b hears nothing from a, holds the whole state: it takes the lease and runs the guest.
    let on_b = h.b.wait_state("vm1", "running", PHASE).unwrap();
    let mut agent = agent_of(&on_b, &dir.path().join("serial-b.log")).unwrap();
    let d = agent.command("disk start", REPLY).unwrap();
    assert_eq!(d.num("next"), Some(acked), "{d:?}");
    advances(&mut agent, &mut g);
    let b_rec = h.b.ctl(&["migrations", &id]).unwrap();
    assert_eq!(b_rec["phase"], "completed", "{b_rec}");
    // The source VMM, handed over, stays paused until its agent is back: it never runs.
    assert_eq!(h.a.vmm_pids().len(), 1);

    // The restarted source agent finds the flip done and cleans up.
    h.a.start_again().unwrap();
    let done = wait_for("the source to complete the migration", PHASE, || {
        let r = h.a.ctl(&["migrations", &id]).ok()?;
        (r["phase"] == "completed").then_some(r)
    })
    .unwrap();
    eprintln!("{:#?}", steps(&done));
    let on_a = h.a.instance("vm1").unwrap();
    assert_eq!(on_a["state"], "migrated-away", "{on_a}");
    runs_only_on(&h, "b", &volumes);
    advances(&mut agent, &mut g);
    stop_and_verify_disk(&mut agent);
}

#[test]
fn migrated_source_cut_off_from_storaged_at_the_flip_stays_paused_and_the_destination_takes_over() {
    let volumes = ["vm1-data"];
    let Some((dir, h, mut g, mut agent)) = guest_on_a(
        "migrated_source_cut_off_from_storaged_at_the_flip_stays_paused_and_the_destination_takes_over",
        &volumes,
    ) else {
        return;
    };
    // The source's disk connections are cut with the link: no disk request may be in flight
    // then (the hand-over drains them), so the writer pauses meanwhile.
    let acked = stop_disk(&mut agent);
    drop(agent);

    // During pre-copy, a loses its link to storaged; the hand-over completes, the flip cannot
    // reach storaged.
    let (m, rec) = migrate_slowly(&h);
    let id = rec["id"].as_str().unwrap().to_string();
    let (a, storage) = (h.rig.host("a"), h.rig.host("storage"));
    a.cut(storage).unwrap();
    unshape(&h);

    // b holds the whole state and sees a stuck in its flip: it makes the same conditional flip
    // and runs the guest. a cannot tell what happened, so it neither resumes nor aborts.
    let on_b = h.b.wait_state("vm1", "running", PHASE).unwrap();
    let on_a = h.a.ctl(&["migrations", &id]).unwrap();
    assert!(
        ["flipping", "rolling-back"].contains(&on_a["phase"].as_str().unwrap_or("")),
        "{on_a}"
    );
    assert_eq!(h.a.instance("vm1").unwrap()["state"], "migrating");
    let mut agent = agent_of(&on_b, &dir.path().join("serial-b.log")).unwrap();
    let d = agent.command("disk start", REPLY).unwrap();
    assert_eq!(d.num("next"), Some(acked), "{d:?}");
    advances(&mut agent, &mut g);

    // The link is back: a reads the leases, finds that b won, and completes.
    a.heal(storage).unwrap();
    let (ok, rec, err) = m.wait().unwrap();
    assert!(ok, "{rec} {err}");
    assert_eq!(rec["phase"], "completed", "{rec}");
    eprintln!("{:#?}", steps(&rec));
    runs_only_on(&h, "b", &volumes);
    advances(&mut agent, &mut g);
    stop_and_verify_disk(&mut agent);
}

#[test]
fn migrated_restarted_during_precopy_on_either_side() {
    let volumes = ["vm1-data"];
    let Some((dir, mut h, mut g, mut agent)) =
        guest_on_a("migrated_restarted_during_precopy_on_either_side", &volumes)
    else {
        return;
    };

    // The source agent restarts during pre-copy: it cannot know how far the stream got, so it
    // aborts: the stream stops, the destination ends its VMM, the guest runs on at a.
    let (m, rec) = migrate_slowly(&h);
    let id = rec["id"].as_str().unwrap().to_string();
    h.a.restart().unwrap();
    let _ = m.wait().unwrap();
    let done = wait_for("the source to abort", PHASE, || {
        let r = h.a.ctl(&["migrations", &id]).ok()?;
        (r["phase"] == "aborted").then_some(r)
    })
    .unwrap();
    unshape(&h);
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("migrated restarted during precopy"),
        "{done}"
    );
    h.b.wait_state("vm1", "stopped", PHASE).unwrap();
    still_on_a(&h, &volumes, &mut agent, &mut g);

    // The destination agent restarts during pre-copy: it re-adopts the incoming VMM and the
    // migration completes.
    let (m, _) = migrate_slowly(&h);
    h.b.restart().unwrap();
    unshape(&h);
    let (ok, rec, err) = m.wait().unwrap();
    assert!(ok, "{rec} {err}");
    assert_eq!(rec["phase"], "completed", "{rec}");
    drop(agent);
    let on_b = runs_only_on(&h, "b", &volumes);
    let mut agent = agent_of(&on_b, &dir.path().join("serial-b.log")).unwrap();
    advances(&mut agent, &mut g);
    stop_and_verify_disk(&mut agent);
}
