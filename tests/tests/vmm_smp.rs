//! Two vCPUs: the guest brings up both (MP table, CPUID topology, in-kernel LAPIC) and the
//! memory workload runs one thread on each.

use agent_proto::expected_checksum;
use e2e::image::guest_image;
use e2e::vmm::{VmmConfig, VmmGuest};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const REPLY: Duration = Duration::from_secs(180);

#[test]
fn vmm_two_vcpus_boot_and_both_run_the_workload() {
    if !e2e::kvm_available("vmm_two_vcpus_boot_and_both_run_the_workload") {
        return;
    }
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let mut guest = VmmGuest::start(&VmmConfig {
        image: &image,
        root: None,
        data_disks: vec![],
        mem_mib: 256,
        vcpus: 2,
        work_dir: dir.path(),
    })
    .unwrap();
    let ready = guest.agent.wait_ready(BOOT_TIMEOUT).unwrap();
    assert_eq!(ready.num("cpus"), Some(2), "{ready:?}");
    const MIB: usize = 16;
    let m = guest
        .agent
        .command(&format!("mem start {MIB} 2"), REPLY)
        .unwrap();
    assert_eq!(m.num("threads"), Some(2), "{m:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let s = guest.agent.command("mem status", REPLY).unwrap();
        assert_eq!(s.num("errors"), Some(0), "{s:?}");
        if s.num("seq").unwrap() > 5 {
            break s;
        }
        assert!(Instant::now() < deadline, "memory sequence stuck: {s:?}");
    };
    let mut cpus = status.nums("cpus").unwrap();
    cpus.sort();
    assert_eq!(cpus, vec![0, 1], "{status:?}");
    assert_eq!(
        status.num("checksum").unwrap(),
        expected_checksum(MIB, &status.nums("seqs").unwrap()),
        "{status:?}"
    );
    guest.agent.command("mem stop", REPLY).unwrap();
}
