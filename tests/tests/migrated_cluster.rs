//! A live migration of a guest whose data volume is replicated (a storaged cluster: one etcd
//! member and two storaged nodes, each on a test host of its own), between two hosts that each
//! run a migrated, with the volume's master killed (SIGKILL) during the pre-copy.
//!
//! The source agent is started with `VMHOP_STALL_AT=source.precopy`: it stops itself right
//! after recording the pre-copy phase, so the kill lands in the pre-copy, not before or after
//! it. The agents know every node of the cluster (`--storaged-api` and `--storaged-nbd` list
//! both; an agent that knew only the dead master's API could neither flip nor read the leases
//! back, and kept the guest paused). Expected: the slave becomes master, the migration completes (the standby lease taken
//! at the prepare, the flip made by the new master), the guest runs on the destination without
//! a reboot, its disk writer keeps going and every record it acknowledged verifies, in the
//! guest and in the new master's copy of the volume. The source goes on right after the kill,
//! so its flip may be sent before there is a new master: it waits for one.
//!
//! A guest whose two volumes are mastered on different nodes (its root file system, one copy
//! on one node, and its data volume, mastered on the other) migrates there and back: each
//! flip is cut into one per master (storaged answers `421` naming both), both volumes follow
//! the guest each time, and its workloads verify.

use agent_proto::{Record, RECORD_SIZE};
use e2e::cluster::Cluster;
use e2e::etcd::Etcd;
use e2e::migrated::{
    agent_of, write_restored_guest_toml, write_restored_guest_toml_with_root, Migrated,
    MigratedOptions, Migration,
};
use e2e::netns::Rig;
use e2e::process::{stopped, wait_for};
use e2e::workload::{
    assert_same_boot, disk_acked_past, mem_seq_after, stop_and_verify_disk, REPLY,
};
use std::path::Path;

/// The volume of the guest's data disk.
const VOLUME: &str = "vm1-data";
/// The volume of the guest's root file system, where a test puts it on a volume.
const ROOT: &str = "vm1-root";
/// The REST port of the agents.
const AGENT_PORT: u16 = 7070;

/// Two migration hosts and a storaged cluster, every process on a test host of its own.
struct ClusterHosts {
    // Field order is drop order: the agents (and their VMMs) first, the namespaces last.
    a: Migrated,
    b: Migrated,
    cluster: Cluster,
    _rig: Rig,
}

impl ClusterHosts {
    /// Starts everything under `dir`, creates `VOLUME` with two copies and waits for its first
    /// master; the source agent `a` runs with the environment `env_a`.
    fn start(dir: &Path, env_a: &[(&str, &str)]) -> ClusterHosts {
        let mut rig = Rig::new(&["etcd", "s1", "s2", "a", "b"]).unwrap();
        rig.reach_from_here().unwrap();
        let etcd_host = rig.host("etcd").clone();
        let ip = etcd_host.addr.to_string();
        let etcd = Etcd::start_members(dir, 1, &ip, Some(&etcd_host.netns)).unwrap();
        let mut cluster = Cluster::start_on(etcd, dir, &[], false).unwrap();
        cluster.add_node_in("node-1", rig.host("s1")).unwrap();
        cluster.add_node_in("node-2", rig.host("s2")).unwrap();
        let size = e2e::snapshot::DATA_DISK_BYTES.to_string();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(cluster.create_replicated("node-1", VOLUME, &size, 2))
            .unwrap();
        let list = |f: fn(&e2e::storaged::Storaged) -> String| {
            cluster
                .nodes
                .iter()
                .map(|n| f(&n.storaged))
                .collect::<Vec<_>>()
                .join(",")
        };
        let apis = list(|s| s.api.to_string());
        let nbds = list(|s| s.nbd.to_string());
        let addr = |h: &str| format!("{}:{AGENT_PORT}", rig.host(h).addr);
        let opts = |me: &str, peer: &str, env: &[(&str, &str)]| MigratedOptions {
            listen: addr(me),
            peers: vec![(peer.into(), addr(peer))],
            netns: Some(rig.host(me).clone()),
            peer_timeout_ms: 3000,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..MigratedOptions::local(me, &apis, &nbds)
        };
        let a = Migrated::start(&dir.join("a"), opts("a", "b", env_a)).unwrap();
        let b = Migrated::start(&dir.join("b"), opts("b", "a", &[])).unwrap();
        ClusterHosts {
            a,
            b,
            cluster,
            _rig: rig,
        }
    }
}

/// The other one of the cluster's two nodes.
fn other_node(node: &str) -> &'static str {
    match node {
        "node-1" => "node-2",
        _ => "node-1",
    }
}

/// Waits for `migration` and asserts that it completed (with both agents' logs if not);
/// returns its record.
fn completed(h: &ClusterHosts, migration: Migration) -> serde_json::Value {
    let (ok, m, stderr) = migration.wait().unwrap();
    assert!(
        ok,
        "{m}\n{stderr}\nsource log:\n{}\ndestination log:\n{}",
        h.a.log(),
        h.b.log()
    );
    assert_eq!(m["phase"], "completed", "{m}");
    m
}

/// Runs the guest of `toml` on `host` and starts its memory and disk workloads; returns the
/// memory pass and the disk records acknowledged so far.
fn run_with_workloads(host: &Migrated, toml: &Path, dir: &Path) -> (u64, u64) {
    let rec = host.ctl(&["run", toml.to_str().unwrap()]).unwrap();
    let mut agent = agent_of(&rec, &dir.join("serial-a.log")).unwrap();
    agent.command("mem start 8", REPLY).unwrap();
    let r = agent.command("disk start", REPLY).unwrap();
    assert_eq!(r.num("next"), Some(0), "{r:?}");
    let seq = mem_seq_after(&mut agent, 0).num("seq").unwrap();
    (seq, disk_acked_past(&mut agent, 16))
}

#[test]
fn a_guest_migrates_while_its_volumes_master_is_killed_in_the_precopy() {
    if !e2e::kvm_available("a_guest_migrates_while_its_volumes_master_is_killed_in_the_precopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stall = [(vmhop_common::faults::STALL_AT, "source.precopy")];
    let mut h = ClusterHosts::start(dir.path(), &stall);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (master, _) = rt
        .block_on(h.cluster.wait_master("node-1", VOLUME))
        .unwrap();
    let survivor = other_node(&master);

    let image = e2e::image::guest_image();
    let booted = e2e::snapshot::booted(&image).unwrap();
    let toml = dir.path().join("vm1.toml");
    write_restored_guest_toml(&toml, "vm1", &image, &booted, VOLUME).unwrap();
    let (seq, acked) = run_with_workloads(&h.a, &toml, dir.path());

    // The source agent stops itself once it has recorded the pre-copy: kill the master there.
    let migration = Migration::start(&h.a, &["vm1", "--to", "b", "--downtime-ms", "300"]).unwrap();
    let pid = h.a.pid().unwrap();
    wait_for("the source agent at the pre-copy", REPLY, || {
        stopped(pid).then_some(())
    })
    .unwrap();
    let precopy = h.b.wait_migration_phase("vm1", "precopy", REPLY).unwrap();
    eprintln!("destination in the pre-copy: {precopy}");
    h.cluster.kill9(&master);
    eprintln!("master {master} killed in the pre-copy; {survivor} remains");
    // The source goes on at once: its flip may come while the survivor still names the dead
    // master or is being elected, and then waits for the new master (storaged's client asks
    // again), or after the failover.
    // SAFETY: kill(2) on the pid of the agent this test started (stopped, not reaped).
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) }, 0);

    let m = completed(&h, migration);
    eprintln!("migration: {}", m["figures"]);
    let view = rt.block_on(h.cluster.view(survivor, VOLUME)).unwrap();
    assert_eq!(view.master.as_deref(), Some(survivor), "{view:?}");

    let on_b = h.b.wait_state("vm1", "running", REPLY).unwrap();
    assert_eq!(h.a.instance("vm1").unwrap()["state"], "migrated-away");
    let mut agent = agent_of(&on_b, &dir.path().join("serial-b.log")).unwrap();
    assert_same_boot(&mut agent, &booted.boot_id);
    let s = mem_seq_after(&mut agent, seq);
    assert_eq!(s.num("errors"), Some(0), "{s:?}");
    disk_acked_past(&mut agent, acked + 16);
    let acked = stop_and_verify_disk(&mut agent);

    // The new master's copy holds every acknowledged record.
    let bytes = std::fs::read(h.cluster.node(survivor).storaged.volume_file(VOLUME)).unwrap();
    for seq in 0..acked {
        let at = seq as usize * RECORD_SIZE;
        let rec = Record::decode(&bytes[at..at + RECORD_SIZE], seq)
            .unwrap_or_else(|| panic!("record {seq} of {acked} invalid on the new master"));
        assert_eq!(&rec.boot_id[..], &booted.boot_id.as_bytes()[..16]);
    }
}

#[test]
fn a_guest_whose_volumes_have_different_masters_migrates_there_and_back() {
    if !e2e::kvm_available("a_guest_whose_volumes_have_different_masters_migrates_there_and_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = ClusterHosts::start(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (master, _) = rt
        .block_on(h.cluster.wait_master("node-1", VOLUME))
        .unwrap();
    let other = other_node(&master);
    // The root file system's one copy is placed on the node that creates it: the other one.
    let image = e2e::image::guest_image();
    let size = std::fs::metadata(&image.rootfs).unwrap().len().to_string();
    let node = &h.cluster.node(other).storaged;
    node.create_volume(ROOT, &size, &["--replicas", "1"])
        .unwrap();
    e2e::process::run_ok(
        std::process::Command::new(e2e::binary("storaged"))
            .args(["volume", "import", ROOT])
            .arg(&image.rootfs)
            .args([
                "--api",
                &node.api.to_string(),
                "--nbd",
                &node.nbd.to_string(),
            ]),
    )
    .unwrap();
    let (root_master, _) = rt.block_on(h.cluster.wait_master(other, ROOT)).unwrap();
    assert_eq!(root_master, other);

    let booted = e2e::snapshot::booted(&image).unwrap();
    let toml = dir.path().join("vm1.toml");
    write_restored_guest_toml_with_root(&toml, "vm1", &image, &booted, Some(ROOT), VOLUME).unwrap();
    let (mut seq, mut acked) = run_with_workloads(&h.a, &toml, dir.path());

    // Through the first node's API only: the agents' lease changes are cut there.
    let api = storaged_client::rest::StoragedApi::new(
        &h.cluster.node("node-1").storaged.api.to_string(),
        None,
    );
    let volumes = [ROOT.to_string(), VOLUME.to_string()];
    for (from, to) in [(&h.a, "b"), (&h.b, "a")] {
        let migration = Migration::start(from, &["vm1", "--to", to]).unwrap();
        let m = completed(&h, migration);
        eprintln!("migration to {to}: {}", m["figures"]);
        let views = rt.block_on(api.leases_of(&volumes)).unwrap();
        for v in &views {
            assert_eq!(
                v.state_of(to),
                Some(storaged_client::api::LeaseState::Primary),
                "{views:?}"
            );
        }
        let dest = if to == "b" { &h.b } else { &h.a };
        let on = dest.wait_state("vm1", "running", REPLY).unwrap();
        let mut agent = agent_of(&on, &dir.path().join(format!("serial-{to}.log"))).unwrap();
        assert_same_boot(&mut agent, &booted.boot_id);
        let s = mem_seq_after(&mut agent, seq);
        assert_eq!(s.num("errors"), Some(0), "{s:?}");
        seq = s.num("seq").unwrap();
        acked = disk_acked_past(&mut agent, acked + 16);
    }
    let on_a = h.a.wait_state("vm1", "running", REPLY).unwrap();
    let mut agent = agent_of(&on_a, &dir.path().join("serial-end.log")).unwrap();
    stop_and_verify_disk(&mut agent);
}
