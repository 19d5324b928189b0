//! Disks served by our vhost-user-blk backend process, over storaged volumes: the guest boots
//! from a vhost-user root disk and both workloads run on a data disk with two queues (two
//! vCPUs); a guest whose data disk is a
//! vhost-user disk migrates there and back between two VMMs (each host with its own backend,
//! the destination's opened as standby and promoted by the lease flip), the disk workload
//! verified on every leg; and a backend killed in the middle of the disk workload is
//! reported by the VMM, and once restarted the workload goes on without losing an
//! acknowledged record.

use e2e::storaged::Storaged;
use e2e::vhost::Backend;
use e2e::vmm::{Disk, VmmConfig, VmmGuest};
use e2e::workload::{
    check_disk, check_memory, disk_acked_past, mem_seq_after, stop_and_verify_disk, verify_on_host,
    wait_booted,
};
use e2e::workload::{MEM_START, REPLY};
use e2e::GuestTest;
use std::path::Path;
use std::time::Duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
const MEM_MIB: usize = 8;

/// A VM of the suite snapshot's shape whose data disk is the backend on `socket`.
fn config<'a>(image: &'a e2e::image::GuestImage, dir: &'a Path, socket: &Path) -> VmmConfig<'a> {
    e2e::snapshot::vm_config_with(image, dir, Disk::vhost_user(socket))
}

#[test]
fn vhost_user_root_disk_boots_and_both_workloads_run() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vhost_user_root_disk_boots_and_both_workloads_run")
    else {
        return;
    };
    let storaged = Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    let d = dir.path();
    let (root, data) =
        Backend::root_and_data(d, &storaged, &image.rootfs, "host-a", &["--queues", "2"]).unwrap();
    let vm_dir = d.join("vm");
    let mut cfg = config(&image, &vm_dir, &data.socket);
    cfg.root = Some(Disk::vhost_user(&root.socket));
    cfg.data_disks = vec![Disk::VhostUser {
        socket: data.socket.clone(),
        queues: 2,
    }];
    cfg.vcpus = 2;
    let mut guest = VmmGuest::start(&cfg).unwrap();
    let (_, boot_id) = wait_booted(&guest.agent, BOOT_TIMEOUT, "vmm", guest.started);
    let console = std::fs::read_to_string(&guest.serial_log).unwrap();
    assert!(
        console.contains("virtio1: 2/0/0 default/read/poll queues"),
        "the data disk should have two queues:\n{console}"
    );
    check_memory(&mut guest.agent, MEM_MIB);
    check_disk(&mut guest.agent, &storaged.volume_file("data"), &boot_id);
    assert!(root.log().contains("frontend connected"), "{}", root.log());
}

/// Moves the guest from `src` to a new VMM whose data disk is a new backend for `host`,
/// opened as standby and promoted by the lease flip between the hand-over and the resume.
/// The source VMM and its backend end; the old host's lease is released.
fn migrate(
    src: &mut VmmGuest,
    src_backend: Backend,
    image: &e2e::image::GuestImage,
    storaged: &Storaged,
    dir: &Path,
    host: &str,
) -> (VmmGuest, Backend) {
    std::fs::create_dir_all(dir).unwrap();
    let backend = Backend::storaged(dir, "data", storaged, "data", host, "standby", &[]).unwrap();
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut dst = VmmGuest::start_incoming(&config(image, dir, &backend.socket), &addr).unwrap();
    let handed = src.hand_over(&mut dst, &addr, MIGRATION_TIMEOUT);
    src.ok(handed);
    storaged
        .cli(&["lease", "flip", "data", "--to", host])
        .unwrap();
    let done = dst.resume_incoming(MIGRATION_TIMEOUT).unwrap();
    eprintln!("migrated to {host}: {done}");
    src.shutdown().unwrap();
    drop(src_backend);
    let old = if host == "host-a" { "host-b" } else { "host-a" };
    storaged
        .cli(&["lease", "revoke", "data", "--host", old])
        .unwrap();
    (dst, backend)
}

/// The suite's booted guest restored in `dir` with its data disk on our backend serving the
/// `data` volume of `storaged` as host-a, and its disk writer started on the fresh disk.
fn restored_with_writer(
    image: &e2e::image::GuestImage,
    storaged: &Storaged,
    booted: &e2e::snapshot::Booted,
    dir: &Path,
) -> (Backend, VmmGuest) {
    std::fs::create_dir_all(dir).unwrap();
    let backend =
        Backend::storaged(dir, "data", storaged, "data", "host-a", "primary", &[]).unwrap();
    let mut guest =
        VmmGuest::restore(&config(image, &dir.join("vm"), &backend.socket), booted).unwrap();
    let r = guest.agent.command("disk start", REPLY);
    assert_eq!(guest.ok(r).num("next"), Some(0));
    (backend, guest)
}

#[test]
fn vhost_user_disk_migrates_there_and_back_with_the_disk_workload() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vhost_user_disk_migrates_there_and_back_with_the_disk_workload")
    else {
        return;
    };
    let storaged = Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    let booted = e2e::snapshot::booted(&image).unwrap();
    let (mut backend, mut guest) =
        restored_with_writer(&image, &storaged, &booted, &dir.path().join("vm0"));
    let r = guest
        .agent
        .command(&format!("mem start {MEM_MIB}"), MEM_START);
    guest.ok(r);
    let mut acked = disk_acked_past(&mut guest.agent, 0);
    let mut seq = 0;

    for (leg, host) in ["host-b", "host-a"].into_iter().enumerate() {
        let next_dir = dir.path().join(format!("vm{}", leg + 1));
        (guest, backend) = migrate(&mut guest, backend, &image, &storaged, &next_dir, host);
        // The memory workload went on untouched; every acknowledged record verifies, and the
        // writer continues after them on this host's backend.
        seq = mem_seq_after(&mut guest.agent, seq + 2).num("seq").unwrap();
        let verified = stop_and_verify_disk(&mut guest.agent);
        assert!(
            verified >= acked,
            "leg {leg}: {verified} records after {acked}"
        );
        let r = guest.agent.command("disk start", REPLY);
        assert_eq!(guest.ok(r).num("next"), Some(verified), "leg {leg}");
        acked = disk_acked_past(&mut guest.agent, verified);
        eprintln!("leg {leg} on {host}: mem seq {seq}, {acked} records");
    }
    let acked = stop_and_verify_disk(&mut guest.agent);
    verify_on_host(&storaged.volume_file("data"), acked, Some(&booted.boot_id));
    assert!(
        backend.log().contains("frontend connected"),
        "{}",
        backend.log()
    );
}

#[test]
fn vhost_user_backend_killed_mid_io_is_reported_and_a_restart_resumes() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vhost_user_backend_killed_mid_io_is_reported_and_a_restart_resumes")
    else {
        return;
    };
    let storaged = Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    let booted = e2e::snapshot::booted(&image).unwrap();
    let (mut backend, mut guest) =
        restored_with_writer(&image, &storaged, &booted, &dir.path().join("vm"));
    let before = disk_acked_past(&mut guest.agent, 64);

    // Killed with the writer's requests in flight: the VMM says so at once.
    backend.kill9();
    e2e::process::wait_for(
        "the VMM to report the lost backend",
        Duration::from_secs(10),
        || {
            guest
                .stderr()
                .contains("vhost-user backend disconnected")
                .then_some(())
        },
    )
    .unwrap();
    // The guest's writes on that disk wait; the guest itself runs.
    std::thread::sleep(Duration::from_secs(1));
    let r = guest.agent.command("ping", REPLY);
    guest.ok(r);

    // A new backend on the same socket: the VMM reconnects, the rings resume at the used
    // index, the waiting requests run, and the writer goes on.
    backend.restart().unwrap();
    e2e::process::wait_for("the VMM to reconnect", Duration::from_secs(30), || {
        guest
            .stderr()
            .contains("vhost-user backend reconnected")
            .then_some(())
    })
    .unwrap();
    let after = disk_acked_past(&mut guest.agent, before + 64);
    let acked = stop_and_verify_disk(&mut guest.agent);
    assert!(acked >= after);
    verify_on_host(&storaged.volume_file("data"), acked, Some(&booted.boot_id));
    eprintln!("{before} records before the crash, {acked} in all, every one verified");
}
