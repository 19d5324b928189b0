//! Live migration between two VMM processes on loopback, with the disk on a storaged volume
//! whose lease is flipped between the hand-over and the resume: three round trips while the
//! guest's memory and disk workloads run. Afterwards the memory sequence continued with no
//! reset, the checksum verifies, the guest never rebooted, and every acknowledged disk record
//! verifies in the guest and on the host. A command typed at the destination's console before
//! the guest arrives is answered once it runs there.

use agent_proto::expected_checksum;
use e2e::snapshot::vm_config_with;
use e2e::storaged::Storaged;
use e2e::vmm::VmmGuest;
use e2e::workload::{mem_seq_after, verify_on_host, MEM_START, REPLY};
use e2e::GuestTest;
use std::path::Path;
use std::time::{Duration, Instant};

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
const MEM_MIB: usize = 8;

/// Moves the guest from `src` to a new VMM for `host`, flipping the data volume's lease to
/// `host` between the hand-over and the resume. Returns the new VMM.
fn migrate(
    src: &mut VmmGuest,
    image: &e2e::image::GuestImage,
    storaged: &Storaged,
    dir: &Path,
    host: &str,
) -> VmmGuest {
    std::fs::create_dir_all(dir).unwrap();
    let port = e2e::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut dst = VmmGuest::start_incoming(
        &vm_config_with(image, dir, storaged.lease_disk("data", host, "standby")),
        &addr,
    )
    .unwrap();
    // Typed at the destination's console before the guest is there: answered once it runs.
    dst.agent.send("clock").unwrap();
    let t = Instant::now();
    let handed = src.hand_over(&mut dst, &addr, MIGRATION_TIMEOUT);
    let handed = src.ok(handed);
    // The source's guest is paused and may not be resumed; the destination has not resumed.
    let (code, _) = src.api("POST", "/v1/vm/resume").unwrap();
    assert_eq!(code, 409, "a handed-over source must refuse to resume");
    let flip = storaged
        .cli(&["lease", "flip", "data", "--to", host])
        .unwrap();
    let done = dst.resume_incoming(MIGRATION_TIMEOUT).unwrap();
    eprintln!(
        "migrated to {host} in {} ms: source {handed}\ndestination {done}\nflip {flip}",
        t.elapsed().as_millis()
    );
    assert!(done["downtime_us"].as_u64().unwrap() > 0, "{done}");
    src.shutdown().unwrap();
    // Cleanup: the old host is deactivated on the volume until the control plane, knowing its
    // VMM is gone, revokes that lease (so the guest can come back to it later).
    let old = if host == "host-a" { "host-b" } else { "host-a" };
    storaged
        .cli(&["lease", "revoke", "data", "--host", old])
        .unwrap();
    dst
}

#[test]
fn vmm_migrates_a_running_guest_three_round_trips() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vmm_migrates_a_running_guest_three_round_trips")
    else {
        return;
    };
    let storaged = Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    let booted = e2e::snapshot::booted(&image).unwrap();

    let first = dir.path().join("vm0");
    std::fs::create_dir_all(&first).unwrap();
    let mut guest = VmmGuest::restore(
        &vm_config_with(
            &image,
            &first,
            storaged.lease_disk("data", "host-a", "primary"),
        ),
        &booted,
    )
    .unwrap();
    let boot_id = booted.boot_id.clone();
    let r = guest
        .agent
        .command(&format!("mem start {MEM_MIB}"), MEM_START);
    guest.ok(r);
    let r = guest.agent.command("disk start", REPLY);
    assert_eq!(guest.ok(r).num("next"), Some(0));

    let mut last_seq = 0;
    let mut last_acked = 0;
    let mut last_uptime = 0;
    for leg in 0..6 {
        let host = if leg % 2 == 0 { "host-b" } else { "host-a" };
        let next_dir = dir.path().join(format!("vm{}", leg + 1));
        guest = migrate(&mut guest, &image, &storaged, &next_dir, host);

        // The guest continues where it was: same boot, clock forward, workloads advancing.
        let c = guest.agent.reply("clock", REPLY);
        let c = guest.ok(c);
        assert_eq!(
            c.get("boot_id"),
            Some(boot_id.as_str()),
            "the guest rebooted"
        );
        let uptime = c.num("uptime_ms").unwrap();
        assert!(
            uptime > last_uptime,
            "uptime went back: {uptime} after {last_uptime}"
        );
        last_uptime = uptime;
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let m = guest.agent.command("mem status", REPLY);
            let m = guest.ok(m);
            assert_eq!(m.num("errors"), Some(0), "leg {leg}: {m:?}");
            let d = guest.agent.command("disk status", REPLY);
            let d = guest.ok(d);
            assert_eq!(d.get("state"), Some("running"), "leg {leg}: {d:?}");
            let (seq, acked) = (m.num("seq").unwrap(), d.num("acked").unwrap());
            assert!(
                seq >= last_seq && acked >= last_acked,
                "leg {leg}: went back"
            );
            if seq > last_seq + 2 && acked > last_acked {
                eprintln!("leg {leg} on {host}: mem seq {seq}, disk acked {acked}");
                (last_seq, last_acked) = (seq, acked);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "leg {leg}: workloads stuck: {m:?} {d:?}"
            );
        }
    }

    let r = guest.agent.command("mem status", REPLY);
    let m = guest.ok(r);
    assert_eq!(
        m.num("checksum").unwrap(),
        expected_checksum(MEM_MIB, &m.nums("seqs").unwrap()),
        "{m:?}"
    );
    let r = guest.agent.command("mem stop", REPLY);
    assert_eq!(guest.ok(r).num("errors"), Some(0));
    let r = guest.agent.command("disk stop", REPLY);
    let acked = guest.ok(r).num("acked").unwrap();
    let r = guest.agent.command("disk verify", REPLY);
    let v = guest.ok(r);
    assert_eq!(v.num("verified"), Some(acked), "{v:?}");
    assert_eq!(v.num("boot_ids"), Some(1), "{v:?}");
    verify_on_host(&storaged.volume_file("data"), acked, Some(&boot_id));
    eprintln!("{acked} disk records verified after 6 migrations");
}

/// A guest that rewrites its memory faster than a 1 ms downtime budget allows, with the
/// throttle enabled: pre-copy runs rounds (throttling the vCPU when the guest outruns the link)
/// until the rest is small or the iteration cap ends it, and the migration completes with the
/// workload intact. (When the throttle rises is unit-tested in vmm::migration::send.)
#[test]
fn vmm_busy_guest_completes_with_the_throttle() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vmm_busy_guest_completes_with_the_throttle")
    else {
        return;
    };
    let booted = e2e::snapshot::booted(&image).unwrap();
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    let mut guest =
        VmmGuest::restore(&e2e::snapshot::vm_config(&image, &src_dir), &booted).unwrap();
    let r = guest
        .agent
        .command(&format!("mem start {MEM_MIB}"), MEM_START);
    guest.ok(r);
    let r = guest.agent.command("mem status", REPLY);
    let started = guest.ok(r).num("seq").unwrap();
    // The writer must be rewriting its memory before the migration starts: on a starved machine
    // it can take a while to get going, and a guest that dirties nothing converges at once.
    let before = mem_seq_after(&mut guest.agent, started + 1)
        .num("seq")
        .unwrap();

    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let mut dst =
        VmmGuest::start_incoming(&e2e::snapshot::vm_config(&image, &dst_dir), &addr).unwrap();
    guest
        .send_migration(&format!(
            r#"{{"destination":"{addr}","downtime_limit_ms":1,"max_iterations":8,"throttle":true,"resume":"auto"}}"#
        ))
        .unwrap();
    let m = guest.wait_migration(&["completed"], MIGRATION_TIMEOUT);
    let m = guest.ok(m);
    eprintln!("busy guest migrated: {m}");
    // Whether the guest outran the link (and was throttled) depends on the machine, and so
    // does the number of rounds: a guest starved of CPU may dirty less after the first pass
    // than the downtime budget sends, and then pre-copy rightly stops after one round. Either
    // way the pages it dirtied went over and the migration completed.
    assert!(m["iteration"].as_u64().unwrap() >= 1, "{m}");
    // `completed` comes with the destination's measure of the pause.
    assert!(m["downtime_us"].as_u64().unwrap() > 0, "{m}");
    dst.wait_migration(&["completed"], MIGRATION_TIMEOUT)
        .unwrap();
    let s = mem_seq_after(&mut dst.agent, before + 3);
    assert_eq!(
        s.num("checksum").unwrap(),
        expected_checksum(MEM_MIB, &s.nums("seqs").unwrap()),
        "{s:?}"
    );
}
