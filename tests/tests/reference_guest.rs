//! The test guest under the reference VMM (QEMU microvm): it boots to the agent, and the
//! memory, disk and clock workloads answer correctly. This proves the image independently of
//! our own VMM.

use e2e::qemu::{QemuConfig, QemuGuest};
use e2e::workload::{check_disk, check_memory, fresh_disk, wait_booted, REPLY};
use e2e::GuestTest;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn guest_boots_and_workloads_answer_under_qemu() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("guest_boots_and_workloads_answer_under_qemu")
    else {
        return;
    };
    let data = fresh_disk(&dir.path().join("data.img"), 64 << 20);

    let started = Instant::now();
    let mut guest = QemuGuest::start(&QemuConfig {
        image: &image,
        data_disks: vec![data.clone()],
        vhost_user_disks: Vec::new(),
        mem_mib: 256,
        vcpus: 1,
        work_dir: dir.path(),
    })
    .unwrap();
    let (ready, boot_id) = wait_booted(&guest.agent, BOOT_TIMEOUT, "qemu", started);
    let agent = &mut guest.agent;
    agent.command("ping", REPLY).unwrap();

    // Clock: same boot, time moves forward.
    let c1 = agent.command("clock", REPLY).unwrap();
    assert_eq!(c1.get("boot_id"), Some(boot_id.as_str()));
    assert!(c1.num("uptime_ms").unwrap() >= ready.num("uptime_ms").unwrap());

    // Memory: the sequence advances, no word is ever wrong, the checksum matches the pattern.
    check_memory(agent, 8);

    // Disk: records are acknowledged, verify finds every one, and so does the host.
    check_disk(agent, &data, &boot_id);

    // Still the same boot.
    let c2 = agent.command("clock", REPLY).unwrap();
    assert_eq!(c2.get("boot_id"), Some(boot_id.as_str()));
    assert!(c2.num("uptime_ms").unwrap() > c1.num("uptime_ms").unwrap());
}
