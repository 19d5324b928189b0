//! A guest whose data volume is served by a vhost-user backend process that migrated starts
//! and ends with the VMM (`backend = "vhost-user"`): on the source the backend holds the
//! primary lease, on the destination a backend opens the volume as standby before the VMM
//! arrives and takes over at the flip; a migration there and back keeps the disk workload's
//! records verifying on every leg, each host runs exactly the backends of the guests it runs,
//! and stopping the guest ends its backend.

use e2e::image::guest_image;
use e2e::migrated::{agent_of, process_gone, write_restored_guest_toml, Migrated};
use e2e::process::wait_for;
use e2e::two_hosts::TwoHosts;
use e2e::workload::{assert_same_boot, disk_acked_past};
use serde_json::Value;
use std::time::Duration;

const REPLY: Duration = Duration::from_secs(120);

/// `migratectl --json migrate ARGS` on `m`; the final record, which must say completed.
fn migrate(m: &Migrated, args: &[&str]) -> Value {
    let mut all = vec!["--json", "migrate"];
    all.extend_from_slice(args);
    let out = m.ctl_raw(&all).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && v["phase"] == "completed",
        "{v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// The single backend `m` runs, which serves `volume`.
fn one_backend(m: &Migrated, volume: &str) -> u32 {
    let pids = m.backend_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains(&format!("--volume {volume}")), "{cmdline}");
    pids[0]
}

#[test]
fn migrated_runs_and_migrates_a_guest_with_a_vhost_user_disk() {
    if !e2e::kvm_available("migrated_runs_and_migrates_a_guest_with_a_vhost_user_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = TwoHosts::start(dir.path(), &["vm1-data"], 3000).unwrap();
    let image = guest_image();
    let booted = e2e::snapshot::booted(&image).unwrap();
    let toml = dir.path().join("vm1.toml");
    write_restored_guest_toml(&toml, "vm1", &image, &booted, "vm1-data").unwrap();
    // The data volume is the last disk: its data path leaves the VMM.
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str("backend = \"vhost-user\"\n");
    std::fs::write(&toml, text).unwrap();

    let rec = h.a.ctl(&["run", toml.to_str().unwrap()]).unwrap();
    let backend_a = one_backend(&h.a, "vm1-data");
    assert!(h.b.backend_pids().is_empty());
    let mut agent = agent_of(&rec, &dir.path().join("serial-a.log")).unwrap();
    agent.command("disk start", REPLY).unwrap();
    let acked = disk_acked_past(&mut agent, 0);
    drop(agent);
    assert_eq!(
        h.storaged.leases("vm1-data").unwrap(),
        vec![("a".into(), "primary".into())]
    );

    let m = migrate(&h.a, &["vm1", "--to", "b"]);
    let on_b = h.b.wait_state("vm1", "running", REPLY).unwrap();
    let backend_b = one_backend(&h.b, "vm1-data");
    wait_for("host a's backend to end", REPLY, || {
        process_gone(backend_a).then_some(())
    })
    .unwrap();
    assert!(h.a.backend_pids().is_empty());
    assert_eq!(
        h.storaged.leases("vm1-data").unwrap(),
        vec![("b".into(), "primary".into())],
        "{m}"
    );
    let mut agent = agent_of(&on_b, &dir.path().join("serial-b.log")).unwrap();
    let acked = disk_acked_past(&mut agent, acked);
    assert_same_boot(&mut agent, &booted.boot_id);
    drop(agent);

    // And back.
    migrate(&h.b, &["vm1", "--to", "a"]);
    let on_a = h.a.wait_state("vm1", "running", REPLY).unwrap();
    one_backend(&h.a, "vm1-data");
    wait_for("host b's backend to end", REPLY, || {
        process_gone(backend_b).then_some(())
    })
    .unwrap();
    let mut agent = agent_of(&on_a, &dir.path().join("serial-a2.log")).unwrap();
    disk_acked_past(&mut agent, acked);
    let acked = agent
        .command("disk stop", REPLY)
        .unwrap()
        .num("acked")
        .unwrap();
    let v = agent.command("disk verify", REPLY).unwrap();
    assert_eq!(v.num("verified"), Some(acked), "{v:?}");
    assert_eq!(v.num("boot_ids"), Some(1), "{v:?}");
    drop(agent);

    // Stopping the guest ends its backend.
    h.a.ctl(&["stop", "vm1"]).unwrap();
    wait_for("host a's backend to end after the stop", REPLY, || {
        h.a.backend_pids().is_empty().then_some(())
    })
    .unwrap();
    assert!(h.b.backend_pids().is_empty());
}
