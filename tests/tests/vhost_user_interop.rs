//! vhost-user interoperability with peers nobody here wrote: QEMU (`-M microvm` with a shared
//! memfd and `-device vhost-user-blk`) as the frontend of our backend, the test guest booting
//! from and writing to storaged volumes through it; and our VMM as the frontend of
//! qemu-storage-daemon's vhost-user-blk export. Each runs the guest's workloads and checks the
//! disk records on the host.

use e2e::qemu::{QemuConfig, QemuGuest};
use e2e::storaged::Storaged;
use e2e::vhost::Backend;
use e2e::vmm::{Disk, VmmConfig, VmmGuest};
use e2e::workload::REPLY;
use e2e::workload::{
    check_disk, check_memory, disk_acked_past, fresh_disk, stop_and_verify_disk, wait_booted,
};
use e2e::GuestTest;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn qemu_boots_from_and_writes_to_storaged_volumes_through_our_backend() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("qemu_boots_from_and_writes_to_storaged_volumes_through_our_backend")
    else {
        return;
    };
    let storaged = Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    let d = dir.path();
    let (root, data) = Backend::root_and_data(d, &storaged, &image.rootfs, "host-a", &[]).unwrap();
    let started = Instant::now();
    let mut guest = QemuGuest::start(&QemuConfig {
        image: &image,
        data_disks: Vec::new(),
        vhost_user_disks: vec![root.socket.clone(), data.socket.clone()],
        mem_mib: 128,
        vcpus: 1,
        work_dir: d,
    })
    .unwrap();
    let (_, boot_id) = wait_booted(&guest.agent, BOOT_TIMEOUT, "qemu", started);
    guest.agent.command("ping", REPLY).unwrap();
    check_memory(&mut guest.agent, 8);
    check_disk(&mut guest.agent, &storaged.volume_file("data"), &boot_id);
    for b in [&root, &data] {
        assert!(b.log().contains("frontend connected"), "{}", b.log());
    }
}

#[test]
fn our_vmm_runs_and_migrates_a_disk_served_by_qemu_storage_daemon() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("our_vmm_runs_and_migrates_a_disk_served_by_qemu_storage_daemon")
    else {
        return;
    };
    let d = dir.path();
    let image_file = fresh_disk(&d.join("data.img"), 64 << 20);
    let qsd = Backend::qemu_storage_daemon(d, "qsd", &image_file).unwrap();
    let vm_dir = d.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let mut guest = VmmGuest::start(&VmmConfig {
        image: &image,
        root: None,
        data_disks: vec![Disk::vhost_user(&qsd.socket)],
        mem_mib: 128,
        vcpus: 1,
        work_dir: &vm_dir,
    })
    .unwrap();
    let (_, boot_id) = wait_booted(&guest.agent, BOOT_TIMEOUT, "vmm", guest.started);
    check_memory(&mut guest.agent, 8);
    check_disk(&mut guest.agent, &image_file, &boot_id);

    // The writer runs while the guest moves to a VMM whose disk another qemu-storage-daemon
    // serves from the same image; every record verifies there.
    let r = guest.agent.command("disk start", REPLY);
    let before = guest.ok(r).num("next").unwrap();
    let dst_dir = d.join("dst");
    std::fs::create_dir_all(&dst_dir).unwrap();
    let qsd_dst = Backend::qemu_storage_daemon(&dst_dir, "qsd", &image_file).unwrap();
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut dst = VmmGuest::start_incoming(
        &VmmConfig {
            image: &image,
            root: None,
            data_disks: vec![Disk::vhost_user(&qsd_dst.socket)],
            mem_mib: 128,
            vcpus: 1,
            work_dir: &dst_dir,
        },
        &addr,
    )
    .unwrap();
    let handed = guest.hand_over(&mut dst, &addr, MIGRATION_TIMEOUT);
    guest.ok(handed);
    let done = dst.resume_incoming(MIGRATION_TIMEOUT).unwrap();
    eprintln!("migrated: {done}");
    guest.shutdown().unwrap();
    drop(qsd);
    // The writer goes on at the destination (a record it had in flight at the pause included).
    disk_acked_past(&mut dst.agent, before);
    let acked = stop_and_verify_disk(&mut dst.agent);
    assert!(
        acked > before,
        "the writer made no progress: {acked} after {before}"
    );
    let r = dst.agent.command("clock", REPLY);
    assert_eq!(
        dst.ok(r).get("boot_id"),
        Some(boot_id.as_str()),
        "the guest rebooted"
    );
}
