//! The guest's disks on storaged volumes, held as primary through the lease-aware client:
//! the disk workload's records (written by the suite's restored guest) survive a VMM restart
//! (new process, same volumes, same host) whose guest boots from the root volume, and a second
//! VMM from another host asking for the same volume as primary is refused with a clear error
//! before its guest runs.

use e2e::storaged::Storaged;
use e2e::vmm::{Disk, VmmConfig, VmmGuest};
use e2e::GuestTest;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const REPLY: Duration = Duration::from_secs(180);

fn volume(s: &Storaged, name: &str, host: &str, ro: bool) -> Disk {
    Disk::Storaged(format!(
        "{},volume={name},host={host}{}",
        s.nbd,
        if ro { ",ro" } else { "" }
    ))
}

#[test]
fn vmm_disks_on_storaged_volumes_survive_restart_and_are_fenced() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vmm_disks_on_storaged_volumes_survive_restart_and_are_fenced")
    else {
        return;
    };
    let storaged = Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    // The root volume is filled anonymously (before any primary exists), then used leased.
    storaged.create_volume_from("root", &image.rootfs).unwrap();

    let run_dir = |n: &str| {
        let d = dir.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let (first_dir, second_dir, rival_dir) = (run_dir("vm1"), run_dir("vm2"), run_dir("rival"));
    let cfg1 = config(&image, &storaged, &first_dir, "host-a");

    // First boot: write records.
    let booted = e2e::snapshot::booted(&image).unwrap();
    let mut guest = VmmGuest::restore(&cfg1, &booted).unwrap();
    let r = guest.agent.command("disk start", REPLY);
    assert_eq!(guest.ok(r).num("next"), Some(0));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = guest.agent.command("disk status", REPLY);
        let s = guest.ok(r);
        assert_eq!(s.get("state"), Some("running"), "{s:?}");
        if s.num("acked").unwrap() >= 64 {
            break;
        }
        assert!(Instant::now() < deadline, "disk writer too slow: {s:?}");
    }
    let r = guest.agent.command("disk stop", REPLY);
    let acked = guest.ok(r).num("acked").unwrap();

    // Another host asking for the data volume as primary is refused, and its guest never runs.
    let out = VmmGuest::command(&config(&image, &storaged, &rival_dir, "host-b"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("storaged://") && err.contains("lease conflict"),
        "{err}"
    );
    assert!(!err.contains("first KVM_RUN"), "{err}");
    // The first guest is unaffected.
    let r = guest.agent.command("ping", REPLY);
    guest.ok(r);

    // End the first VMM through the API, then start a new process on the same volumes.
    let (code, body) = guest.api("POST", "/v1/vm/shutdown").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        guest.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
    drop(guest);

    // The new VMM boots the guest from the root volume.
    let mut guest = VmmGuest::start(&config(&image, &storaged, &second_dir, "host-a")).unwrap();
    let ready = guest.agent.wait_ready(BOOT_TIMEOUT);
    let ready = guest.ok(ready);
    assert_ne!(
        ready.get("boot_id"),
        Some(booted.boot_id.as_str()),
        "a new boot"
    );
    let r = guest.agent.command("disk verify", REPLY);
    let v = guest.ok(r);
    assert_eq!(v.num("verified"), Some(acked), "{v:?}");
    assert_eq!(
        v.num("boot_ids"),
        Some(1),
        "all written by the first boot: {v:?}"
    );
    let r = guest.agent.command("disk start", REPLY);
    assert_eq!(
        guest.ok(r).num("next"),
        Some(acked),
        "the writer continues after them"
    );
    let r = guest.agent.command("disk stop", REPLY);
    guest.ok(r);
}

fn config<'a>(
    image: &'a e2e::image::GuestImage,
    storaged: &Storaged,
    work_dir: &'a std::path::Path,
    host: &str,
) -> VmmConfig<'a> {
    VmmConfig {
        image,
        root: Some(volume(storaged, "root", host, true)),
        data_disks: vec![volume(storaged, "data", host, false)],
        mem_mib: e2e::snapshot::MEM_MIB,
        vcpus: 1,
        work_dir,
    }
}
