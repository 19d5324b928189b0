//! Each VMM start writes a log of its own: a failed start's error quotes only that start, and
//! the logs of the starts before it are kept beside it (`vmm.log.1`, ...). No guest boots.

use e2e::migrated::{Migrated, MigratedOptions};

#[test]
fn each_vmm_start_has_a_log_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let m = Migrated::start(
        dir.path(),
        MigratedOptions::local("host-a", "127.0.0.1:9", "127.0.0.1:9"),
    )
    .unwrap();
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
