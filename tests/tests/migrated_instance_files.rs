//! Each VMM start writes a log of its own: a failed start's error quotes only that start, and
//! the logs of the starts before it are kept beside it (`vmm.log.1`, ...); `migratectl rm`
//! forgets an instance whose VMM is gone, with its directory. No guest boots.

use e2e::migrated::{Migrated, MigratedOptions};

#[test]
fn each_vmm_start_has_a_log_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let m = Migrated::start(dir.path(), MigratedOptions::without_storaged("host-a")).unwrap();
    let guest = dir.path().join("vm.toml");
    let write = |kernel: &str| {
        let toml = format!("name = 'vm1'\nkernel = '{kernel}'\nmemory_mib = 64\n");
        std::fs::write(&guest, toml).unwrap();
    };
    write("/nonexistent/first");
    let out = m.ctl_raw(&["run", guest.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    write("/nonexistent/second");
    let out = m.ctl_raw(&["run", guest.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/second"), "{err}");
    assert!(
        !err.contains("/nonexistent/first"),
        "an older start's log: {err}"
    );

    let work = m.state_dir.join("instances").join("vm1");
    let log = std::fs::read_to_string(work.join("vmm.log")).unwrap();
    assert!(
        log.contains("/nonexistent/second") && !log.contains("first"),
        "{log}"
    );
    let before = std::fs::read_to_string(work.join("vmm.log.1")).unwrap();
    assert!(before.contains("/nonexistent/first"), "{before}");
}

#[test]
fn migratectl_rm_forgets_an_instance_whose_vmm_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let m = Migrated::start(dir.path(), MigratedOptions::without_storaged("host-a")).unwrap();
    let guest = dir.path().join("vm.toml");
    let toml = "name = 'vm1'\nkernel = '/nonexistent/vmlinux'\nmemory_mib = 64\n";
    std::fs::write(&guest, toml).unwrap();
    assert!(!m
        .ctl_raw(&["run", guest.to_str().unwrap()])
        .unwrap()
        .status
        .success());
    assert_eq!(m.instance("vm1").unwrap()["state"], "failed");
    let work = m.state_dir.join("instances").join("vm1");
    assert!(work.join("vmm.log").exists());

    let out = m.ctl_raw(&["rm", "vm1"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("vm1 removed (it was failed)"));
    assert_eq!(m.ctl(&["instances"]).unwrap(), serde_json::json!([]));
    assert!(!work.exists(), "the instance's directory stays");
    let out = m.ctl_raw(&["rm", "vm1"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vm1 not found"),
        "{out:?}"
    );
}
