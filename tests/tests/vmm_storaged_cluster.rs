//! The real guest on a replicated volume: the VMM's storaged disk is given the addresses of
//! both storaged nodes (`storaged=A,storaged=B`), the guest's disk workload (records written
//! with O_DIRECT and fsync) runs, and the volume's master is killed with SIGKILL. The slave
//! takes over, the VMM holds the guest's I/O while no node is master and reconnects to the new
//! one with the same lease; the guest sees no I/O error and every acknowledged record
//! verifies, in the guest and in the new master's file.

use agent_proto::{Record, RECORD_SIZE};
use e2e::cluster::Cluster;
use e2e::vmm::{Disk, VmmConfig, VmmGuest};
use e2e::workload::{disk_acked_past, stop_and_verify_disk, REPLY};
use e2e::GuestTest;
use std::time::Instant;

#[test]
fn the_guest_keeps_its_disk_when_the_volumes_master_is_killed() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("the_guest_keeps_its_disk_when_the_volumes_master_is_killed")
    else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Cluster::start(dir.path(), &["node-a", "node-b"], false).unwrap();
    let size = e2e::snapshot::DATA_DISK_BYTES.to_string();
    c.node("node-a")
        .storaged
        .create_volume("data", &size, &["--replicas", "2"])
        .unwrap();
    let first = rt
        .block_on(c.wait_view("node-a", "data", "a first master", |v| v.master.is_some()))
        .unwrap();
    let master = first.master.clone().unwrap();
    let survivor = if master == "node-a" {
        "node-b"
    } else {
        "node-a"
    };

    let booted = e2e::snapshot::booted(&image).unwrap();
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let nbd = c.nbd_addresses();
    let cfg = VmmConfig {
        image: &image,
        root: None,
        data_disks: vec![Disk::Storaged(format!(
            "{},storaged={},volume=data,host=host-a",
            nbd[0], nbd[1]
        ))],
        mem_mib: e2e::snapshot::MEM_MIB,
        vcpus: 1,
        work_dir: &vm_dir,
    };
    let mut guest = VmmGuest::restore(&cfg, &booted).unwrap();
    let r = guest.agent.command("disk start", REPLY);
    assert_eq!(guest.ok(r).num("next"), Some(0));
    let before = disk_acked_past(&mut guest.agent, 16);

    c.kill9(&master);
    let killed = Instant::now();
    let after = disk_acked_past(&mut guest.agent, before + 64);
    eprintln!(
        "master {master} killed at record {before}; the guest's writer passed {after} \
        {:?} later, on {survivor}",
        killed.elapsed()
    );
    let now = rt.block_on(c.view(survivor, "data")).unwrap();
    assert_eq!(now.master.as_deref(), Some(survivor), "{now:?}");
    let log = guest.stderr();
    assert!(log.contains("storaged volume reconnected"), "{log}");
    assert!(!log.contains("virtio-blk: I/O error"), "{log}");

    let acked = stop_and_verify_disk(&mut guest.agent);
    let bytes = std::fs::read(c.node(survivor).storaged.volume_file("data")).unwrap();
    for seq in 0..acked {
        let at = seq as usize * RECORD_SIZE;
        let rec = Record::decode(&bytes[at..at + RECORD_SIZE], seq)
            .unwrap_or_else(|| panic!("record {seq} of {acked} invalid on the new master"));
        assert_eq!(&rec.boot_id[..], &booted.boot_id.as_bytes()[..16]);
    }
}
