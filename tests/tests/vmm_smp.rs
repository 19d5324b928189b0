//! Two vCPUs: the guest brings up both (MP table, CPUID topology, in-kernel LAPIC) and the
//! memory workload runs one thread on each; then the guest migrates to another VMM process
//! (both vCPUs' state, the application processor's LAPIC included) and both threads go on.

use agent_proto::expected_checksum;
use e2e::vmm::{VmmConfig, VmmGuest};
use e2e::workload::mem_seq_after;
use e2e::GuestTest;
use std::time::Duration;

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const REPLY: Duration = Duration::from_secs(180);

#[test]
fn vmm_two_vcpus_boot_and_both_run_the_workload() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vmm_two_vcpus_boot_and_both_run_the_workload")
    else {
        return;
    };
    let config = |work| VmmConfig {
        image: &image,
        root: None,
        data_disks: vec![],
        mem_mib: 256,
        vcpus: 2,
        work_dir: work,
    };
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mut guest = VmmGuest::start(&config(&src_dir)).unwrap();
    let ready = guest.agent.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.num("cpus"), Some(2), "{ready:?}");
    const MIB: usize = 16;
    let m = guest
        .agent
        .command(&format!("mem start {MIB} 2"), REPLY)
        .unwrap();
    assert_eq!(m.num("threads"), Some(2), "{m:?}");
    let status = mem_seq_after(&mut guest.agent, 5);
    check(&status, MIB);

    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut dst = VmmGuest::start_incoming(&config(&dst_dir), &addr).unwrap();
    let params = format!(r#"{{"destination":"{addr}","resume":"auto"}}"#);
    guest.send_migration(&params).unwrap();
    let m = guest.wait_migration(&["completed"], Duration::from_secs(300));
    eprintln!("two vCPUs migrated: {}", guest.ok(m));
    let status = mem_seq_after(&mut dst.agent, status.num("seq").unwrap() + 4);
    check(&status, MIB);
    dst.agent.command("mem stop", REPLY).unwrap();
}

/// Both vCPUs ran the workload and the memory holds exactly the expected pattern.
fn check(status: &agent_proto::Fields, mib: usize) {
    let mut cpus = status.nums("cpus").unwrap();
    cpus.sort();
    assert_eq!(cpus, vec![0, 1], "{status:?}");
    assert_eq!(
        status.num("checksum").unwrap(),
        expected_checksum(mib, &status.nums("seqs").unwrap()),
        "{status:?}"
    );
}
