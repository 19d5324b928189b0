//! A guest that stops on something the VMM cannot handle ends the VMM with a non-zero status
//! and a report of the vCPU: registers and the instruction bytes at RIP. The guest is a tiny
//! hand-made PVH ELF kernel whose first instruction is `int3` with no usable IDT: an emulating
//! KVM (kvm_pvm) cannot run it at CPL0 (KVM internal error, status 4); hardware KVM delivers
//! it, finds no IDT entry and triple-faults (status 3).

use std::process::Command;
use std::time::Duration;

/// int3; hlt; jmp -3.
const CODE: &[u8] = &[0xcc, 0xf4, 0xeb, 0xfd];

#[test]
fn vmm_reports_an_unhandled_guest_stop_with_registers_and_code() {
    if !e2e::kvm_available("vmm_reports_an_unhandled_guest_stop_with_registers_and_code") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("int3.elf");
    std::fs::write(&kernel, e2e::tiny::pvh_kernel(CODE)).unwrap();
    let mut child = Command::new(e2e::binary("vmm"))
        .args(["run", "--memory", "32", "--serial", "none", "--kernel"])
        .arg(&kernel)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = e2e::process::wait_for("vmm to stop", Duration::from_secs(120), || {
        child.try_wait().ok().flatten()
    });
    if status.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(matches!(code, Some(3) | Some(4)), "status {code:?}: {err}");
    assert!(err.contains("rip="), "{err}");
    assert!(err.contains("cr0="), "{err}");
    if code == Some(4) {
        assert!(err.contains("KVM internal error"), "{err}");
        assert!(
            err.contains(&format!("rip={:#018x}", e2e::tiny::ENTRY)),
            "{err}"
        );
        assert!(err.contains("physical 0x200000): cc f4 eb fd"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}
