//! The test guest under our VMM: it boots to the agent over the serial socket, the memory,
//! disk and clock workloads answer correctly on a local-file data disk, the API reports the
//! VM, and a guest reboot (i8042 reset, `reboot=k`) ends the VMM with status 0.

use e2e::vmm::{json_str, Disk, VmmConfig, VmmGuest};
use e2e::workload::{check_disk, check_memory, fresh_disk, wait_booted};
use e2e::GuestTest;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const REPLY: Duration = Duration::from_secs(180);

#[test]
fn vmm_boots_guest_and_workloads_answer() {
    let Some(GuestTest { image, dir }) = GuestTest::new("vmm_boots_guest_and_workloads_answer")
    else {
        return;
    };
    let data = fresh_disk(&dir.path().join("data.img"), 64 << 20);
    let mut guest = VmmGuest::start(&VmmConfig {
        image: &image,
        root: None,
        data_disks: vec![Disk::File {
            path: data.clone(),
            read_only: false,
        }],
        mem_mib: 256,
        vcpus: 1,
        work_dir: dir.path(),
    })
    .unwrap();
    let (ready, boot_id) = wait_booted(&guest.agent, BOOT_TIMEOUT, "vmm", guest.started);
    assert_eq!(ready.num("cpus"), Some(1));

    let (code, body) = guest.api("GET", "/v1/vm").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json_str(&body, "state").as_deref(),
        Some("running"),
        "{body}"
    );
    assert!(
        body.contains("virtio_mmio.device=4K@0xd0001000:6"),
        "{body}"
    );

    let agent = &mut guest.agent;
    agent.command("ping", REPLY).unwrap();
    let c1 = agent.command("clock", REPLY).unwrap();
    assert_eq!(c1.get("boot_id"), Some(boot_id.as_str()));

    // Memory: the sequence advances with no errors and a matching checksum.
    check_memory(agent, 16);

    // Disk: records are acknowledged, the guest verifies them, and so does the host.
    check_disk(agent, &data, &boot_id);

    let c2 = agent.command("clock", REPLY).unwrap();
    assert_eq!(c2.get("boot_id"), Some(boot_id.as_str()));
    assert!(c2.num("uptime_ms").unwrap() > c1.num("uptime_ms").unwrap());

    // The guest reboots through the i8042 (reboot=k): the VMM ends cleanly.
    agent.command("reboot", REPLY).unwrap();
    let status = guest.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", guest.stderr());
    assert!(
        guest.stderr().contains("the guest reset the machine"),
        "{}",
        guest.stderr()
    );
}

#[test]
fn vmm_read_only_root_refuses_writes_and_a_locked_disk_is_refused() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vmm_read_only_root_refuses_writes_and_a_locked_disk_is_refused")
    else {
        return;
    };
    let data = fresh_disk(&dir.path().join("data.img"), 16 << 20);
    let mut guest = VmmGuest::start(&small(&image, &data, dir.path())).unwrap();
    guest.agent.wait_ready(BOOT_TIMEOUT).unwrap();
    // vda is offered read-only: the writer fails instead of changing the root image.
    let root_before = std::fs::read(&image.rootfs).unwrap();
    let r = guest.agent.command("disk start /dev/vda", REPLY);
    if r.is_ok() {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = guest.agent.command("disk status", REPLY).unwrap();
            if s.get("state") == Some("failed") {
                break;
            }
            assert_ne!(s.get("state"), Some("stopped"), "{s:?}");
            assert!(
                s.num("acked").unwrap_or(0) == 0,
                "write to a read-only disk acked: {s:?}"
            );
            assert!(
                Instant::now() < deadline,
                "writer on read-only vda neither failed nor acked: {s:?}"
            );
        }
    }
    assert_eq!(std::fs::read(&image.rootfs).unwrap(), root_before);

    // A second VMM on the same writable file is refused with a clear error.
    let dir2 = tempfile::tempdir().unwrap();
    let out = VmmGuest::command(&small(&image, &data, dir2.path()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");

    // Shutdown through the API.
    let (code, _) = guest.api("POST", "/v1/vm/shutdown").unwrap();
    assert_eq!(code, 200);
    let status = guest.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", guest.stderr());
}

fn small<'a>(
    image: &'a e2e::image::GuestImage,
    data: &std::path::Path,
    work_dir: &'a std::path::Path,
) -> VmmConfig<'a> {
    VmmConfig {
        image,
        root: None,
        data_disks: vec![Disk::File {
            path: data.to_path_buf(),
            read_only: false,
        }],
        mem_mib: 128,
        vcpus: 1,
        work_dir,
    }
}

#[test]
fn vmm_boots_guest_through_the_64_bit_boot_protocol() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("vmm_boots_guest_through_the_64_bit_boot_protocol")
    else {
        return;
    };
    let mut guest = VmmGuest::start_with(
        &VmmConfig {
            image: &image,
            root: None,
            data_disks: vec![],
            mem_mib: 128,
            vcpus: 1,
            work_dir: dir.path(),
        },
        &["--boot", "linux64"],
    )
    .unwrap();
    let ready = guest.agent.wait_ready(BOOT_TIMEOUT);
    guest.ok(ready);
    assert!(guest.stderr().contains("Linux64"), "{}", guest.stderr());
    let r = guest.agent.command("ping", REPLY);
    guest.ok(r);
    let (code, _) = guest.api("POST", "/v1/vm/shutdown").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        guest.wait_exit(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
}
