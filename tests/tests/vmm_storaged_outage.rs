//! A guest whose disk is a storaged volume keeps its disk through storaged's trouble, with the
//! disk workload (records written with O_DIRECT and fsync) running throughout:
//! - storaged restarted (SIGTERM, then started again on the same ports, as systemd would):
//!   the VMM holds the guest's I/O while storaged is away and retries it; the guest sees no
//!   I/O error and every acknowledged record verifies, in the guest and on the host;
//! - storaged frozen (SIGSTOP) with a request in flight while the guest is migrated: the
//!   drain before the hand-over times out, the migration fails, the guest runs on at the
//!   source, and its disk works again once storaged does (SIGCONT), every record verified.

use e2e::process::wait_for;
use e2e::snapshot::vm_config_with;
use e2e::storaged::Storaged;
use e2e::vmm::VmmGuest;
use e2e::workload::{disk_acked_past, stop_and_verify_disk, verify_on_host, REPLY};
use e2e::GuestTest;
use std::time::Duration;

/// Generous: guests are slow here, and the machine is shared.
const PROGRESS: Duration = Duration::from_secs(300);
/// The VMM gives up on a drain after 30 s (`DRAIN_TIMEOUT`); the pre-copy comes before it.
const MIGRATION_FAILS: Duration = Duration::from_secs(300);

/// Stops the writer, has the guest verify every record, and decodes each one on the host.
fn verify(guest: &mut VmmGuest, storaged: &Storaged, boot_id: &str) {
    let acked = stop_and_verify_disk(&mut guest.agent);
    verify_on_host(&storaged.volume_file("data"), acked, Some(boot_id));
}

#[test]
fn guest_io_is_held_while_storaged_restarts() {
    let Some(GuestTest { image, dir }) = GuestTest::new("guest_io_is_held_while_storaged_restarts")
    else {
        return;
    };
    let mut storaged =
        Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    let booted = e2e::snapshot::booted(&image).unwrap();
    let vm_dir = dir.path().join("vm");
    let cfg = vm_config_with(
        &image,
        &vm_dir,
        storaged.lease_disk("data", "host-a", "primary"),
    );
    let mut guest = VmmGuest::restore(&cfg, &booted).unwrap();
    let r = guest.agent.command("disk start", REPLY);
    assert_eq!(guest.ok(r).num("next"), Some(0));
    let before = disk_acked_past(&mut guest.agent, 16);

    // storaged stops (its open connections close) and stays away until the VMM holds the
    // guest's I/O for it; then it starts again where it was.
    let status = storaged.terminate().unwrap();
    assert!(status.success(), "storaged: {status}\n{}", storaged.log());
    let held = wait_for("the VMM to hold the guest's I/O", PROGRESS, || {
        guest.stderr().contains("holding guest I/O").then_some(())
    });
    guest.ok(held);
    storaged.start_again().unwrap();

    let after = disk_acked_past(&mut guest.agent, before + 64);
    eprintln!("disk writer at {before} records before the restart, {after} after");
    let log = guest.stderr();
    assert!(log.contains("storaged volume reconnected"), "{log}");
    assert!(!log.contains("virtio-blk: I/O error"), "{log}");
    verify(&mut guest, &storaged, &booted.boot_id);
}

#[test]
fn a_drain_timeout_fails_the_migration_and_the_disk_works_on() {
    let Some(GuestTest { image, dir }) =
        GuestTest::new("a_drain_timeout_fails_the_migration_and_the_disk_works_on")
    else {
        return;
    };
    let storaged = Storaged::start_with_data_volume(&dir.path().join("storaged"), "data").unwrap();
    let booted = e2e::snapshot::booted(&image).unwrap();
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    let src_cfg = vm_config_with(
        &image,
        &src_dir,
        storaged.lease_disk("data", "host-a", "primary"),
    );
    let mut guest = VmmGuest::restore(&src_cfg, &booted).unwrap();
    let r = guest.agent.command("disk start", REPLY);
    assert_eq!(guest.ok(r).num("next"), Some(0));
    let before = disk_acked_past(&mut guest.agent, 16);

    // The destination connects as standby first; then storaged hangs with the guest's next
    // request unread in its socket.
    let addr = format!("127.0.0.1:{}", e2e::free_port().unwrap());
    let dst_cfg = vm_config_with(
        &image,
        &dst_dir,
        storaged.lease_disk("data", "host-b", "standby"),
    );
    let _dst = VmmGuest::start_incoming(&dst_cfg, &addr).unwrap();
    storaged.freeze(true).unwrap();
    let in_flight = wait_for("a guest request in flight", PROGRESS, || {
        storaged.unread_requests().unwrap().then_some(())
    });
    guest.ok(in_flight);

    let params = format!(r#"{{"destination":"{addr}","resume":"wait"}}"#);
    guest.send_migration(&params).unwrap();
    let failed = guest.wait_migration(&["failed"], MIGRATION_FAILS);
    let failed = guest.ok(failed);
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("drain"), "{failed}");

    // The guest runs here; its disk answers as soon as storaged does.
    storaged.freeze(false).unwrap();
    let after = disk_acked_past(&mut guest.agent, before + 64);
    eprintln!("disk writer at {before} records before the failed migration, {after} after");
    let r = guest.agent.command("clock", REPLY);
    assert_eq!(
        guest.ok(r).get("boot_id"),
        Some(booted.boot_id.as_str()),
        "the guest rebooted"
    );
    let log = guest.stderr();
    assert!(log.contains("serving the queue again"), "{log}");
    verify(&mut guest, &storaged, &booted.boot_id);
}
