//! `vmm run` input handling without a guest: bad input ends with status 1 and a message that
//! names the problem, never a panic.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(e2e::binary("vmm"))
        .arg("run")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vmm_rejects_bad_configuration_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--kernel or --config"), "{err}");

    let (code, err) = run(&["--kernel", "/nonexistent/vmlinux", "--vcpus", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("vcpus must be"), "{err}");

    let toml = dir.path().join("vm.toml");
    std::fs::write(&toml, "kernel = '/k'\nmemory_mib = 'lots'\n").unwrap();
    let (code, err) = run(&["--config", toml.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("parse"), "{err}");

    let (code, err) = run(&["--kernel", "/k", "--disk", "path=/a,bogus"]);
    assert_eq!(code, Some(2), "clap usage error: {err}");
    assert!(err.contains("unknown disk option"), "{err}");

    let (code, err) = run(&["--kernel", "/k", "--serial", "tcp:1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("expected stdio"), "{err}");

    if std::path::Path::new("/dev/kvm").exists() {
        // A kernel that is not an ELF file.
        let bogus = dir.path().join("vmlinux");
        std::fs::write(&bogus, b"not a kernel").unwrap();
        let (code, err) = run(&["--kernel", bogus.to_str().unwrap(), "--serial", "none"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("load kernel"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
