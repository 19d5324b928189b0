//! The test guest under the reference VMM (QEMU microvm): it boots to the agent, and the
//! memory, disk and clock workloads answer correctly. This proves the image independently of
//! our own VMM.

use agent_proto::{expected_checksum, Record, RECORD_SIZE};
use e2e::image::guest_image;
use e2e::qemu::{QemuConfig, QemuGuest};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const REPLY: Duration = Duration::from_secs(60);
/// `mem start` faults its buffer in; the guest kernel zeroes each page emulated (~1 MB/s idle,
/// several times slower when other guests share the cores).
const MEM_START: Duration = Duration::from_secs(600);

#[test]
fn guest_boots_and_workloads_answer_under_qemu() {
    if !e2e::kvm_available("guest_boots_and_workloads_answer_under_qemu") {
        return;
    }
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();

    let started = Instant::now();
    let mut guest = QemuGuest::start(&QemuConfig {
        image: &image,
        data_disks: vec![data.clone()],
        mem_mib: 256,
        vcpus: 1,
        work_dir: dir.path(),
    })
    .unwrap();
    let ready = guest.agent.wait_ready(BOOT_TIMEOUT).unwrap();
    let boot_id = ready.get("boot_id").unwrap().to_string();
    eprintln!(
        "agent ready: {} ms after kernel start, {} ms after qemu start",
        ready.num("uptime_ms").unwrap(),
        started.elapsed().as_millis()
    );
    let agent = &mut guest.agent;
    agent.command("ping", REPLY).unwrap();

    // Clock: same boot, time moves forward.
    let c1 = agent.command("clock", REPLY).unwrap();
    assert_eq!(c1.get("boot_id"), Some(boot_id.as_str()));
    assert!(c1.num("uptime_ms").unwrap() >= ready.num("uptime_ms").unwrap());

    // Memory: the sequence advances, no word is ever wrong, the checksum matches the pattern.
    const MIB: usize = 8;
    let m = agent
        .command(&format!("mem start {MIB}"), MEM_START)
        .unwrap();
    eprintln!("mem started: touch {} ms", m.num("touch_ms").unwrap());
    let first = agent.command("mem status", REPLY).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = agent.command("mem status", REPLY).unwrap();
        if s.num("seq").unwrap() > first.num("seq").unwrap() + 5 {
            break s;
        }
        assert!(Instant::now() < deadline, "memory sequence stuck: {s:?}");
    };
    assert_eq!(status.num("errors"), Some(0), "{status:?}");
    assert_eq!(
        status.num("checksum").unwrap(),
        expected_checksum(MIB, &status.nums("seqs").unwrap()),
        "{status:?}"
    );
    assert!(status.get("maxgap_us").is_some());
    let stopped = agent.command("mem stop", REPLY).unwrap();
    assert_eq!(stopped.num("errors"), Some(0));

    // Disk: records are acknowledged, verify finds every one, and so does the host.
    let d = agent.command("disk start", REPLY).unwrap();
    assert_eq!(d.num("next"), Some(0), "fresh disk: {d:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = agent.command("disk status", REPLY).unwrap();
        assert_eq!(s.get("state"), Some("running"), "{s:?}");
        if s.num("acked").unwrap() >= 256 {
            break;
        }
        assert!(Instant::now() < deadline, "disk writer too slow: {s:?}");
    }
    let acked = agent
        .command("disk stop", REPLY)
        .unwrap()
        .num("acked")
        .unwrap();
    let v = agent.command("disk verify", REPLY).unwrap();
    assert_eq!(v.num("verified"), Some(acked), "{v:?}");
    assert_eq!(v.num("boot_ids"), Some(1));
    let bytes = std::fs::read(&data).unwrap();
    for seq in 0..acked {
        let at = seq as usize * RECORD_SIZE;
        let rec = Record::decode(&bytes[at..at + RECORD_SIZE], seq)
            .unwrap_or_else(|| panic!("record {seq} of {acked} invalid on the host side"));
        assert_eq!(&rec.boot_id[..], &boot_id.as_bytes()[..16]);
    }
    // A restarted writer continues after the last record.
    let again = agent.command("disk start", REPLY).unwrap();
    assert_eq!(again.num("next"), Some(acked));
    agent.command("disk stop", REPLY).unwrap();

    // Still the same boot.
    let c2 = agent.command("clock", REPLY).unwrap();
    assert_eq!(c2.get("boot_id"), Some(boot_id.as_str()));
    assert!(c2.num("uptime_ms").unwrap() > c1.num("uptime_ms").unwrap());
}
