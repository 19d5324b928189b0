//! Snapshot and restore: a guest with its memory and disk workloads running is paused and
//! written to a snapshot file; a new VMM process restores it (memory mapped from the file) with
//! the same disk, and the workloads continue as after a migration: same boot, the memory
//! sequence going on without error, every disk record verifying. A damaged snapshot is refused
//! with a clear error.

use agent_proto::expected_checksum;
use e2e::image::guest_image;
use e2e::vmm::{Disk, VmmConfig, VmmGuest};
use e2e::workload::{fresh_disk, verify_on_host, MEM_START, REPLY};
use std::time::{Duration, Instant};

#[test]
fn snapshot_restores_into_a_new_vmm_and_the_workloads_continue() {
    if !e2e::kvm_available("snapshot_restores_into_a_new_vmm_and_the_workloads_continue") {
        return;
    }
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let data = fresh_disk(&dir.path().join("data.img"), e2e::snapshot::DATA_DISK_BYTES);
    let cfg = |d: &str| {
        let work = dir.path().join(d);
        std::fs::create_dir_all(&work).unwrap();
        work
    };
    let (w1, w2, w3) = (cfg("a"), cfg("b"), cfg("c"));
    let config = |w| VmmConfig {
        image: &image,
        root: None,
        data_disks: vec![Disk::File {
            path: data.clone(),
            read_only: false,
        }],
        mem_mib: e2e::snapshot::MEM_MIB,
        vcpus: 1,
        work_dir: w,
    };

    let booted = e2e::snapshot::booted(&image).unwrap();
    let mut guest = VmmGuest::restore(&config(&w1), &booted).unwrap();
    let boot_id = booted.boot_id.clone();
    let r = guest.agent.command("mem start 4", MEM_START);
    guest.ok(r);
    let r = guest.agent.command("disk start", REPLY);
    guest.ok(r);
    let deadline = Instant::now() + Duration::from_secs(180);
    let (seq0, acked0) = loop {
        let m = guest.agent.command("mem status", REPLY);
        let d = guest.agent.command("disk status", REPLY);
        let (m, d) = (guest.ok(m), guest.ok(d));
        if d.num("acked").unwrap() >= 64 {
            break (m.num("seq").unwrap(), d.num("acked").unwrap());
        }
        assert!(Instant::now() < deadline, "disk writer too slow: {d:?}");
    };

    let snap = dir.path().join("guest.snap");
    let (code, body) = guest.api("POST", "/v1/vm/pause").unwrap();
    assert_eq!(code, 200, "{body}");
    let t = Instant::now();
    // PUT, as clients of earlier versions send it: still accepted beside POST.
    let (code, body) = guest
        .api_json(
            "PUT",
            "/v1/vm/snapshot",
            &format!(r#"{{"path":"{}"}}"#, snap.display()),
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let size = std::fs::metadata(&snap).unwrap();
    eprintln!(
        "snapshot of 128 MiB written in {} ms, {} bytes apparent",
        t.elapsed().as_millis(),
        size.len()
    );
    assert!(body.contains(r#""state":"paused""#), "{body}");
    let (code, _) = guest.api("POST", "/v1/vm/shutdown").unwrap();
    assert_eq!(code, 200);
    guest.wait_exit(Duration::from_secs(30)).unwrap();

    let t = Instant::now();
    let mut restored =
        VmmGuest::start_with(&config(&w2), &["--restore", snap.to_str().unwrap()]).unwrap();
    let c = restored.agent.command("clock", REPLY);
    let c = restored.ok(c);
    eprintln!("restored and answering in {} ms", t.elapsed().as_millis());
    assert_eq!(
        c.get("boot_id"),
        Some(boot_id.as_str()),
        "the guest rebooted"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let m = restored.agent.command("mem status", REPLY);
        let d = restored.agent.command("disk status", REPLY);
        let (m, d) = (restored.ok(m), restored.ok(d));
        assert_eq!(m.num("errors"), Some(0), "{m:?}");
        assert_eq!(d.get("state"), Some("running"), "{d:?}");
        if m.num("seq").unwrap() > seq0 + 2 && d.num("acked").unwrap() > acked0 + 32 {
            assert_eq!(
                m.num("checksum").unwrap(),
                expected_checksum(4, &m.nums("seqs").unwrap()),
                "{m:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "workloads stuck: {m:?} {d:?}");
    }
    let r = restored.agent.command("mem stop", REPLY);
    assert_eq!(restored.ok(r).num("errors"), Some(0));
    let r = restored.agent.command("disk stop", REPLY);
    let acked = restored.ok(r).num("acked").unwrap();
    let r = restored.agent.command("disk verify", REPLY);
    let v = restored.ok(r);
    assert_eq!(v.num("verified"), Some(acked), "{v:?}");
    assert_eq!(v.num("boot_ids"), Some(1), "{v:?}");
    verify_on_host(&data, acked, None);
    let (code, _) = restored.api("POST", "/v1/vm/shutdown").unwrap();
    assert_eq!(code, 200);
    restored.wait_exit(Duration::from_secs(30)).unwrap();

    // A damaged snapshot: one byte of the state flipped.
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[4096 + 200] ^= 0x01;
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, &bytes).unwrap();
    let out = VmmGuest::command(&config(&w3))
        .args(["--restore", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
}
