//! Migrations between two hosts, each a network namespace with its own migrated, storaged in a
//! third. A migration to a host whose migrated is down ends `aborted` with a clear reason while
//! the guest keeps running on the source, which keeps its lease. A migration there and back
//! with the workloads running: the memory sequence and the disk records continue, the guest
//! never reboots, the figures are reported, and after the flip host a is fenced (a write
//! through its old connection and a new primary connection are refused).

use agent_proto::Fields;
use e2e::agent::AgentConn;
use e2e::image::guest_image;
use e2e::migrated::{agent_of, write_restored_guest_toml, Migrated};
use e2e::two_hosts::{StaleWriter, TwoHosts};
use e2e::workload::{assert_same_boot, disk_acked_past};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const REPLY: Duration = Duration::from_secs(120);
const MIB: usize = 8;

type Hosts = TwoHosts;

fn hosts(dir: &Path) -> Hosts {
    TwoHosts::start(dir, &["vm1-data"], 3000).unwrap()
}

/// Waits for the memory workload to pass `after` and checks it is intact.
fn mem_advances(agent: &mut AgentConn, after: u64) -> Fields {
    e2e::workload::mem_advances(agent, MIB, after)
}

/// `migratectl --json migrate ARGS` on `m`: exit status and the final record.
fn migrate(m: &Migrated, args: &[&str]) -> (bool, Value) {
    let mut all = vec!["--json", "migrate"];
    all.extend_from_slice(args);
    let out = m.ctl_raw(&all).unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

fn start_guest(h: &Hosts, dir: &Path) -> (Value, AgentConn, String) {
    let image = guest_image();
    let toml = dir.join("vm1.toml");
    let booted = e2e::snapshot::booted(&image).unwrap();
    write_restored_guest_toml(&toml, "vm1", &image, &booted, "vm1-data").unwrap();
    let rec = h.a.ctl(&["run", toml.to_str().unwrap()]).unwrap();
    let mut agent = agent_of(&rec, &dir.join("serial-a.log")).unwrap();
    agent.command(&format!("mem start {MIB}"), REPLY).unwrap();
    (rec, agent, booted.boot_id)
}

fn assert_runs_on_a(h: &Hosts, agent: &mut AgentConn, pid: u64) {
    let rec = h.a.instance("vm1").unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(rec["migration"], Value::Null);
    assert_eq!(rec["pid"].as_u64(), Some(pid));
    let seq = agent
        .command("mem status", REPLY)
        .unwrap()
        .num("seq")
        .unwrap();
    mem_advances(agent, seq);
    let leases = h.storaged.leases("vm1-data").unwrap();
    assert!(
        leases.contains(&("a".to_string(), "primary".to_string())),
        "{leases:?}"
    );
    assert!(leases.iter().all(|(host, _)| host != "b"), "{leases:?}");
    assert_eq!(h.b.ctl(&["instances"]).unwrap(), serde_json::json!([]));
    assert!(h.b.vmm_pids().is_empty());
}

#[test]
fn migrated_failed_migrations_leave_the_guest_on_the_source() {
    if !e2e::kvm_available("migrated_failed_migrations_leave_the_guest_on_the_source") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut h = hosts(dir.path());
    let hosts = h.a.ctl(&["hosts"]).unwrap();
    assert_eq!(hosts[1]["host_id"], "b");
    assert_eq!(hosts[1]["reachable"], true, "{hosts}");
    let (rec, mut agent, _boot_id) = start_guest(&h, dir.path());
    let pid = rec["pid"].as_u64().unwrap();

    // The destination's migrated is down: the migration aborts before anything starts there.
    h.b.terminate().unwrap();
    let (ok, m) = migrate(&h.a, &["vm1", "--to", "b", "--downtime-ms", "100"]);
    assert!(!ok, "{m}");
    assert_eq!(m["phase"], "aborted", "{m}");
    let err = m["error"].as_str().unwrap();
    assert!(
        err.contains("destination b") && err.contains("unreachable"),
        "{err}"
    );
    h.b.start_again().unwrap();
    assert_runs_on_a(&h, &mut agent, pid);
    // The record is durable and listed.
    let id = m["id"].as_str().unwrap();
    let shown = h.a.ctl(&["migrations", id]).unwrap();
    assert_eq!(shown["phase"], "aborted");
    assert!(shown["steps"].as_array().unwrap().len() >= 3, "{shown}");

    // The source VMM has no migration API (yet): refused with a clear reason.
    let api = rec["api_socket"].as_str().unwrap();
    let (code, _) = e2e::vmm::api_call(Path::new(api), "GET", "/v1/migration").unwrap();
    if code == 404 || code == 405 {
        let (ok, m) = migrate(&h.a, &["vm1", "--to", "b"]);
        assert!(!ok, "{m}");
        assert_eq!(m["phase"], "aborted", "{m}");
        let err = m["error"].as_str().unwrap();
        assert!(err.contains("has no migration API"), "{err}");
        assert_runs_on_a(&h, &mut agent, pid);
    } else {
        eprintln!("the VMM has a migration API ({code}): its refusal is not testable here");
    }

    // Text output names the reason too.
    let out = h.a.ctl_raw(&["migrate", "vm1", "--to", "nowhere"]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown host \"nowhere\""),
        "{out:?}"
    );
    assert_runs_on_a(&h, &mut agent, pid);
}

#[test]
fn migrated_migrates_a_guest_there_and_back() {
    if !e2e::kvm_available("migrated_migrates_a_guest_there_and_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = hosts(dir.path());
    let (rec, mut agent_a, boot_id) = start_guest(&h, dir.path());
    agent_a.command("disk start", REPLY).unwrap();
    let seq = mem_advances(&mut agent_a, 1).num("seq").unwrap();
    let acked = disk_acked_past(&mut agent_a, 0);
    drop(agent_a);
    // What a slow or buggy host a could still write with after the flip.
    let stale = StaleWriter::open(&h, "a", "vm1-data").unwrap();

    let (ok, m) = migrate(&h.a, &["vm1", "--to", "b", "--downtime-ms", "300"]);
    assert!(ok, "{m}");
    // Fenced: its old connection's write and a new primary connection are both refused.
    let refusals = stale.attempt().unwrap();
    eprintln!("host a after the flip: {refusals:?}");
    assert_eq!(m["phase"], "completed", "{m}");
    for k in ["total_ms", "downtime_ms", "flip_ms", "bytes_sent"] {
        assert!(m["figures"][k].as_u64().is_some(), "{k}: {m}");
    }
    assert!(m["figures"]["bytes_sent"].as_u64().unwrap() > 0);
    // The destination VMM measured the pause, source's last vCPU pause to its first run.
    assert!(m["figures"]["vmm_downtime_us"].as_u64().unwrap() > 0, "{m}");
    let on_a = h.a.instance("vm1").unwrap();
    assert_eq!(on_a["state"], "migrated-away", "{on_a}");
    assert!(e2e::migrated::process_gone(
        rec["pid"].as_u64().unwrap() as u32
    ));
    let on_b = h.b.wait_state("vm1", "running", REPLY).unwrap();
    let mut agent_b = agent_of(&on_b, &dir.path().join("serial-b.log")).unwrap();
    mem_advances(&mut agent_b, seq);
    let acked = disk_acked_past(&mut agent_b, acked);
    assert_same_boot(&mut agent_b, &boot_id);
    // b holds the volume; a's lease, deactivated by the flip, was released at cleanup once its
    // VMM was gone (so the guest can come back).
    let leases = h.storaged.leases("vm1-data").unwrap();
    assert_eq!(leases, vec![("b".into(), "primary".into())], "{m}");

    // And back.
    let (ok, m) = migrate(&h.b, &["vm1", "--to", "a"]);
    assert!(ok, "{m}");
    let on_a = h.a.wait_state("vm1", "running", REPLY).unwrap();
    drop(agent_b);
    let mut agent_a = agent_of(&on_a, &dir.path().join("serial-a2.log")).unwrap();
    mem_advances(&mut agent_a, seq + 1);
    disk_acked_past(&mut agent_a, acked);
    assert_same_boot(&mut agent_a, &boot_id);
    let leases = h.storaged.leases("vm1-data").unwrap();
    assert_eq!(leases, vec![("a".into(), "primary".into())], "{m}");
    assert_eq!(h.b.instance("vm1").unwrap()["state"], "migrated-away");
    assert!(h.b.vmm_pids().is_empty());
    assert_eq!(h.a.vmm_pids().len(), 1);
    let acked = agent_a
        .command("disk stop", REPLY)
        .unwrap()
        .num("acked")
        .unwrap();
    assert!(acked > 0);
    let v = agent_a.command("disk verify", REPLY).unwrap();
    assert_eq!(v.num("verified"), Some(acked), "{v:?}");
    assert_eq!(v.num("boot_ids"), Some(1), "{v:?}");
}
