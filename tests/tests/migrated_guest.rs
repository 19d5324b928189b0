//! A guest run through migratectl (started from the suite's booted guest) with its data disk on a storaged volume held as
//! primary by the host; migrated killed with SIGKILL and restarted re-adopts the running VMM
//! (same pid, one process, the guest never noticed) instead of starting it again; a second
//! `run` of the same name is refused; `stop` ends it and a restart leaves it stopped; a VMM
//! that died while migrated was down is reported lost and not restarted.

use e2e::migrated::{
    agent_of, vmm_processes_with, write_restored_guest_toml, Migrated, MigratedOptions,
};
use e2e::process::wait_for;
use e2e::storaged::Storaged;
use e2e::GuestTest;
use std::time::Duration;

const REPLY: Duration = Duration::from_secs(120);

#[test]
fn migrated_runs_readopts_and_stops_a_guest() {
    let Some(GuestTest { image, dir }) = GuestTest::new("migrated_runs_readopts_and_stops_a_guest")
    else {
        return;
    };
    let storaged =
        Storaged::start_with_data_volume(&dir.path().join("storaged"), "vm1-data").unwrap();
    let mut m = Migrated::start(
        &dir.path().join("host-a"),
        MigratedOptions::local(
            "host-a",
            &storaged.api.to_string(),
            &storaged.nbd.to_string(),
        ),
    )
    .unwrap();
    let guest_toml = dir.path().join("vm1.toml");
    let booted = e2e::snapshot::booted(&image).unwrap();
    write_restored_guest_toml(&guest_toml, "vm1", &image, &booted, "vm1-data").unwrap();
    let toml = guest_toml.to_str().unwrap();

    let rec = m.ctl(&["run", toml]).unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
    let pid = rec["pid"].as_u64().unwrap();
    let vm_toml = rec["work_dir"].as_str().unwrap().to_string() + "/vm.toml";
    assert_eq!(vmm_processes_with(&vm_toml), vec![pid as u32]);
    let mut agent = agent_of(&rec, &dir.path().join("serial.log")).unwrap();
    let boot_id = booted.boot_id.clone();
    agent.command("mem start 8", REPLY).unwrap();
    assert_eq!(
        storaged.lease_state("vm1-data", "host-a").as_deref(),
        Some("primary")
    );
    let text = m.ctl_raw(&["instances"]).unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("vm1") && text.contains("running") && text.contains("volume:vm1-data"),
        "{text}"
    );

    // kill -9 of migrated: the guest keeps running and is re-adopted, not started again.
    m.restart().unwrap();
    let again = m.instance("vm1").unwrap();
    assert_eq!(again["state"], "running", "{again}");
    assert_eq!(again["pid"].as_u64(), Some(pid));
    assert_eq!(vmm_processes_with(&vm_toml), vec![pid as u32]);
    assert!(
        m.log().contains("re-adopting the running VMM of vm1"),
        "{}",
        m.log()
    );
    let before = agent.command("mem status", REPLY).unwrap();
    let after = wait_for("the memory workload to advance", REPLY, || {
        let s = agent.command("mem status", REPLY).ok()?;
        (s.num("seq")? > before.num("seq")?).then_some(s)
    })
    .unwrap();
    assert_eq!(after.num("errors"), Some(0), "{after:?}");
    let clock = agent.command("clock", REPLY).unwrap();
    assert_eq!(
        clock.get("boot_id"),
        Some(boot_id.as_str()),
        "the guest rebooted"
    );

    // The name is taken while the guest runs.
    let out = m.ctl_raw(&["run", toml]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    assert_eq!(vmm_processes_with(&vm_toml), vec![pid as u32]);

    // Stop: the VMM ends; a restart of migrated leaves it stopped.
    let stopped = m.ctl(&["stop", "vm1"]).unwrap();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(vmm_processes_with(&vm_toml).is_empty());
    m.restart().unwrap();
    assert_eq!(m.instance("vm1").unwrap()["state"], "stopped");
    assert!(vmm_processes_with(&vm_toml).is_empty());

    // A VMM that dies while migrated is down is reported lost, and not restarted.
    let rec = m.ctl(&["run", toml]).unwrap();
    let pid2 = rec["pid"].as_u64().unwrap() as u32;
    m.kill9();
    // SAFETY: kill(2) on the VMM process this test just had started.
    unsafe {
        libc::kill(pid2 as libc::pid_t, libc::SIGKILL);
    }
    wait_for("the VMM to die", REPLY, || {
        e2e::migrated::process_gone(pid2).then_some(())
    })
    .unwrap();
    m.start_again().unwrap();
    let lost = m.instance("vm1").unwrap();
    assert_eq!(lost["state"], "lost", "{lost}");
    assert!(vmm_processes_with(&vm_toml).is_empty());
    assert!(m.log().contains("instance vm1 is Lost"), "{}", m.log());
}
