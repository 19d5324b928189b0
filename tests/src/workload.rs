//! Checks of the guest agent's workloads that several end-to-end tests share.

use crate::agent::AgentConn;
use agent_proto::{expected_checksum, Fields, Record, RECORD_SIZE};
use std::path::Path;
use std::time::{Duration, Instant};

/// `mem start` faults its buffer in; the guest kernel zeroes each page emulated (~1 MB/s idle,
/// several times slower when other guests share the cores).
pub const MEM_START: Duration = Duration::from_secs(600);
/// One agent reply.
pub const REPLY: Duration = Duration::from_secs(180);

/// Waits for the agent of a guest booting under `vmm` (started at `started`) to say it is ready,
/// and logs how long that took since the kernel started and since `vmm` did. Returns the ready
/// line and the boot id.
pub fn wait_booted(
    agent: &AgentConn,
    timeout: Duration,
    vmm: &str,
    started: Instant,
) -> (Fields, String) {
    let ready = agent.wait_ready(timeout).unwrap();
    let boot_id = ready.get("boot_id").unwrap().to_string();
    eprintln!(
        "agent ready: {} ms after kernel start, {} ms after {vmm} start",
        ready.num("uptime_ms").unwrap(),
        started.elapsed().as_millis()
    );
    (ready, boot_id)
}

/// Runs the memory workload over `mib` MiB until its sequence has advanced, checks that no word
/// was ever wrong and that the checksum matches the pattern, then stops it.
pub fn check_memory(agent: &mut AgentConn, mib: usize) {
    let m = agent
        .command(&format!("mem start {mib}"), MEM_START)
        .unwrap();
    eprintln!("mem started: touch {} ms", m.num("touch_ms").unwrap());
    let first = agent.command("mem status", REPLY).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
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
        expected_checksum(mib, &status.nums("seqs").unwrap()),
        "{status:?}"
    );
    assert!(status.get("maxgap_us").is_some());
    let stopped = agent.command("mem stop", REPLY).unwrap();
    assert_eq!(stopped.num("errors"), Some(0));
}

/// Runs the disk workload on a fresh data disk backed by the host file `data` until at least
/// 256 records are durable; the guest verifies them, the host decodes each one (written by the
/// guest with boot id `boot_id`), and a restarted writer continues after the last record.
pub fn check_disk(agent: &mut AgentConn, data: &Path, boot_id: &str) {
    let d = agent.command("disk start", REPLY).unwrap();
    assert_eq!(d.num("next"), Some(0), "fresh disk: {d:?}");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = agent.command("disk status", REPLY).unwrap();
        assert_eq!(s.get("state"), Some("running"), "{s:?}");
        if s.num("acked").unwrap() >= 256 {
            break;
        }
        assert!(Instant::now() < deadline, "disk writer too slow: {s:?}");
    }
    let acked = stop_and_verify_disk(agent);
    verify_on_host(data, acked, Some(boot_id));
    let again = agent.command("disk start", REPLY).unwrap();
    assert_eq!(again.num("next"), Some(acked));
    agent.command("disk stop", REPLY).unwrap();
}

/// Decodes the first `acked` records of the disk workload from `data`, the file behind the
/// guest's disk, on the host; each must be valid and, given `boot_id`, written by that boot.
pub fn verify_on_host(data: &Path, acked: u64, boot_id: Option<&str>) {
    let bytes = std::fs::read(data).unwrap();
    for seq in 0..acked {
        let at = seq as usize * RECORD_SIZE;
        let rec = Record::decode(&bytes[at..at + RECORD_SIZE], seq)
            .unwrap_or_else(|| panic!("record {seq} of {acked} invalid on the host side"));
        if let Some(boot_id) = boot_id {
            assert_eq!(&rec.boot_id[..], &boot_id.as_bytes()[..16]);
        }
    }
}

/// Asserts that the guest behind `agent` still runs the boot `boot_id` (it was not rebooted).
pub fn assert_same_boot(agent: &mut AgentConn, boot_id: &str) {
    let clock = agent.command("clock", REPLY).unwrap();
    assert_eq!(clock.get("boot_id"), Some(boot_id), "rebooted");
}

/// Stops the disk writer; returns how many records it acknowledged.
pub fn stop_disk(agent: &mut AgentConn) -> u64 {
    agent
        .command("disk stop", REPLY)
        .unwrap()
        .num("acked")
        .unwrap()
}

/// Stops the disk writer and has the guest verify every record it acknowledged, all written by
/// one boot; returns how many there are.
pub fn stop_and_verify_disk(agent: &mut AgentConn) -> u64 {
    let acked = stop_disk(agent);
    let v = agent.command("disk verify", REPLY).unwrap();
    assert_eq!(v.num("verified"), Some(acked), "{v:?}");
    assert_eq!(v.num("boot_ids"), Some(1), "{v:?}");
    eprintln!("{acked} disk records verified");
    acked
}

/// Waits until the memory workload's sequence passes `after`, checking on every status that no
/// word was ever wrong; returns that status.
pub fn mem_seq_after(agent: &mut AgentConn, after: u64) -> agent_proto::Fields {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = agent.command("mem status", REPLY).unwrap();
        assert_eq!(s.num("errors"), Some(0), "{s:?}");
        if s.num("seq").unwrap() > after {
            return s;
        }
        assert!(Instant::now() < deadline, "memory sequence stuck: {s:?}");
    }
}

/// Waits (up to [`REPLY`]) until the memory workload over `mib` MiB has passed sequence
/// `after`, then checks that no word was ever wrong and that the checksum matches the pattern;
/// returns that status.
pub fn mem_advances(agent: &mut AgentConn, mib: usize, after: u64) -> Fields {
    let s = crate::process::wait_for("the memory workload to advance", REPLY, || {
        let s = agent.command("mem status", REPLY).ok()?;
        (s.num("seq")? > after).then_some(s)
    })
    .unwrap();
    assert_eq!(s.num("errors"), Some(0), "{s:?}");
    assert_eq!(
        s.num("checksum"),
        Some(expected_checksum(mib, &s.nums("seqs").unwrap())),
        "{s:?}"
    );
    s
}

/// Waits until the disk writer acknowledged more than `after` records, checking on every
/// status that it still runs; returns the count.
pub fn disk_acked_past(agent: &mut AgentConn, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = agent.command("disk status", REPLY).unwrap();
        assert_eq!(s.get("state"), Some("running"), "{s:?}");
        let acked = s.num("acked").unwrap();
        if acked > after {
            return acked;
        }
        assert!(Instant::now() < deadline, "disk writer stuck: {s:?}");
    }
}

/// A fresh, zeroed (sparse) disk image of `bytes` at `path`.
pub fn fresh_disk(path: &Path, bytes: u64) -> std::path::PathBuf {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
    path.to_path_buf()
}
