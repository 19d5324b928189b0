//! migrated's `GET /metrics` and `migratectl abort` on two hosts with the real test guest: the
//! VMM's figures (exits, disk requests) move while the guest works; a migration whose stream
//! crawls is aborted by the operator during pre-copy (migratectl exits 3, the guest runs on at the source,
//! the abort is counted); a migration then completes and its outcome, duration, downtime, flip
//! time and bytes are counted at the source, and the destination exports the guest's VMM.

use e2e::image::guest_image;
use e2e::metrics::{scrape_unix, Exposition};
use e2e::migrated::{agent_of, write_restored_guest_toml, Migrated};
use e2e::process::wait_for;
use e2e::two_hosts::{TwoHosts, AGENT_PORT};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

const REPLY: Duration = Duration::from_secs(120);
const VM: (&str, &str) = ("vm", "vm1");

fn scrape(m: &Migrated) -> Exposition {
    let e = scrape_unix(&m.socket).unwrap();
    e.check_names("migrated_").unwrap();
    e
}

fn exits(e: &Exposition) -> f64 {
    e.sum("migrated_vmm_exits_total", &[VM])
}

fn disk_writes(e: &Exposition) -> f64 {
    e.sum("migrated_vmm_disk_requests_total", &[VM, ("op", "write")])
}

fn outcome(e: &Exposition, role: &str, outcome: &str) -> f64 {
    let labels = [("role", role), ("outcome", outcome)];
    e.value("migrated_migrations_total", &labels).unwrap()
}

/// `migratectl --socket S ARGS` run to its end: exit code and stdout.
fn ctl(m: &Migrated, args: &[&str]) -> (i32, String) {
    let out = Command::new(e2e::binary("migratectl"))
        .arg("--socket")
        .arg(&m.socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "migratectl {args:?}: {:?}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn migrated_metrics_move_and_migratectl_aborts_a_migration() {
    if !e2e::kvm_available("migrated_metrics_move_and_migratectl_aborts_a_migration") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = TwoHosts::start(dir.path(), &["vm1-data"], 3000).unwrap();
    let image = guest_image();
    let toml = dir.path().join("vm1.toml");
    let booted = e2e::snapshot::booted(&image).unwrap();
    write_restored_guest_toml(&toml, "vm1", &image, &booted, "vm1-data").unwrap();
    let rec = h.a.ctl(&["run", toml.to_str().unwrap()]).unwrap();
    let pid = rec["pid"].as_u64().unwrap();
    let mut agent = agent_of(&rec, &dir.path().join("serial-a.log")).unwrap();

    // The guest's work shows in its VMM's figures.
    let idle = scrape(&h.a);
    assert_eq!(idle.value("migrated_vmm_up", &[VM]).unwrap(), 1.0);
    agent.command("disk start", REPLY).unwrap();
    agent.command("mem start 16", REPLY).unwrap();
    let working = wait_for("the guest's disk writes to be counted", REPLY, || {
        let e = scrape(&h.a);
        (disk_writes(&e) > disk_writes(&idle) && exits(&e) > exits(&idle)).then_some(e)
    })
    .unwrap();
    let written = [VM, ("device", "vdb")];
    assert!(
        working
            .value("migrated_vmm_disk_written_bytes_total", &written)
            .unwrap()
            > 0.0
    );
    assert_eq!(
        working
            .value("migrated_vmm_disk_errors_total", &written)
            .unwrap(),
        0.0
    );

    // A migration whose stream crawls (the agents' REST calls do not), aborted by the operator
    // during pre-copy.
    let (a, b) = (h.rig.host("a"), h.rig.host("b"));
    a.shape(b.addr, Some(AGENT_PORT), "8mbit").unwrap();
    let migrate = Command::new(e2e::binary("migratectl"))
        .arg("--socket")
        .arg(&h.a.socket)
        .args(["migrate", "vm1", "--to", "b", "--downtime-ms", "1"])
        .args(["--max-iterations", "1000000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let m = h.a.wait_migration_phase("vm1", "precopy", REPLY).unwrap();
    let id = m["id"].as_str().unwrap();
    // Bytes on their way, and time for migratectl (polling every 200 ms) to show them.
    wait_for("the pre-copy's first bytes", REPLY, || {
        let m = h.a.ctl(&["migrations", id]).ok()?;
        (m["progress"]["bytes_sent"].as_u64()? > 0).then_some(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let (code, out) = ctl(&h.a, &["abort", id]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("aborted"), "{out}");
    let migrated = migrate.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&migrated.stdout);
    assert_eq!(migrated.status.code(), Some(3), "{text}");
    assert!(text.contains("aborted by the operator"), "{text}");
    // Not a terminal: plain progress lines on stderr, no bar drawing.
    let progress = String::from_utf8_lossy(&migrated.stderr);
    assert!(
        progress.contains("precopy") && progress.contains("pass"),
        "{progress}"
    );
    assert!(!progress.contains('\r'), "{progress}");
    let on_a = h.a.instance("vm1").unwrap();
    assert_eq!(on_a["state"], "running", "{on_a}");
    assert_eq!(on_a["pid"].as_u64(), Some(pid));
    agent.command("ping", REPLY).unwrap();
    // Too late to abort an ended migration; unknown ids are refused.
    let (code, _) = ctl(&h.a, &["abort", id]);
    assert_eq!(code, 1);
    let aborted = scrape(&h.a);
    assert_eq!(outcome(&aborted, "source", "aborted"), 1.0);
    assert_eq!(outcome(&aborted, "source", "completed"), 0.0);
    let at_b = scrape(&h.b);
    assert_eq!(outcome(&at_b, "destination", "aborted"), 1.0);

    // A migration that completes, at full speed.
    a.unshape().unwrap();
    agent.command("mem stop", REPLY).unwrap();
    drop(agent);
    let (code, out) = ctl(&h.a, &["--json", "migrate", "vm1", "--to", "b"]);
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 0, "{m}");
    assert_eq!(m["phase"], "completed", "{m}");
    let done = scrape(&h.a);
    assert_eq!(outcome(&done, "source", "completed"), 1.0);
    for h in [
        "migrated_migration_duration_seconds_count",
        "migrated_migration_downtime_seconds_count",
        "migrated_migration_flip_duration_seconds_count",
    ] {
        assert_eq!(done.value(h, &[]).unwrap(), 1.0, "{h}");
    }
    let total = m["figures"]["total_ms"].as_f64().unwrap() / 1e3;
    let seen = done
        .value("migrated_migration_duration_seconds_sum", &[])
        .unwrap();
    assert!(
        (seen - total).abs() < 1e-3,
        "{seen} s recorded, {total} s reported"
    );
    let sent = done
        .value("migrated_migration_sent_bytes_total", &[])
        .unwrap();
    assert!(
        sent >= m["figures"]["bytes_sent"].as_f64().unwrap(),
        "{sent}"
    );
    // The guest left a: no VMM to export there; b exports it.
    assert!(done.samples("migrated_vmm_up", &[VM]).next().is_none());
    let at_b = scrape(&h.b);
    assert_eq!(outcome(&at_b, "destination", "completed"), 1.0);
    assert_eq!(at_b.value("migrated_vmm_up", &[VM]).unwrap(), 1.0);
    assert!(exits(&at_b) > 0.0);
}
