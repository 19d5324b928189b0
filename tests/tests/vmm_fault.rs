//! A guest that stops on something the VMM cannot handle ends the VMM with a non-zero status
//! and a report of the vCPU: registers and the instruction bytes at RIP. The guest is a tiny
//! hand-made PVH ELF kernel whose first instruction is `int3` with no usable IDT: an emulating
//! KVM (kvm_pvm) cannot run it at CPL0 (KVM internal error, status 4); hardware KVM delivers
//! it, finds no IDT entry and triple-faults (status 3).

use std::process::Command;
use std::time::Duration;

/// Guest physical address the code is loaded at and entered at.
const ENTRY: u64 = 0x20_0000;
/// int3; hlt; jmp -3.
const CODE: &[u8] = &[0xcc, 0xf4, 0xeb, 0xfd];

fn tiny_pvh_kernel() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const NOTE_AT: usize = EHDR + 2 * PHDR;
    const NOTE_LEN: usize = 12 + 4 + 4;
    const CODE_AT: usize = 256;
    let mut f = vec![0u8; CODE_AT + CODE.len()];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // ELF version
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 0x3e); // x86-64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, ENTRY);
    put64(&mut f, 32, EHDR as u64); // program headers right after
    put16(&mut f, 52, EHDR as u16);
    put16(&mut f, 54, PHDR as u16);
    put16(&mut f, 56, 2);
    // PT_LOAD of the code.
    let p = EHDR;
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 5);
    put64(&mut f, p + 8, CODE_AT as u64);
    put64(&mut f, p + 16, ENTRY);
    put64(&mut f, p + 24, ENTRY);
    put64(&mut f, p + 32, CODE.len() as u64);
    put64(&mut f, p + 40, CODE.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    // PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY.
    let p = EHDR + PHDR;
    put32(&mut f, p, 4);
    put32(&mut f, p + 4, 4);
    put64(&mut f, p + 8, NOTE_AT as u64);
    put64(&mut f, p + 32, NOTE_LEN as u64);
    put64(&mut f, p + 40, NOTE_LEN as u64);
    put64(&mut f, p + 48, 4);
    put32(&mut f, NOTE_AT, 4); // namesz
    put32(&mut f, NOTE_AT + 4, 4); // descsz
    put32(&mut f, NOTE_AT + 8, 18); // XEN_ELFNOTE_PHYS32_ENTRY
    f[NOTE_AT + 12..NOTE_AT + 16].copy_from_slice(b"Xen\0");
    put32(&mut f, NOTE_AT + 16, ENTRY as u32);
    f[CODE_AT..].copy_from_slice(CODE);
    f
}

#[test]
fn vmm_reports_an_unhandled_guest_stop_with_registers_and_code() {
    if !e2e::kvm_available("vmm_reports_an_unhandled_guest_stop_with_registers_and_code") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("int3.elf");
    std::fs::write(&kernel, tiny_pvh_kernel()).unwrap();
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
        assert!(err.contains(&format!("rip={ENTRY:#018x}")), "{err}");
        assert!(err.contains("physical 0x200000): cc f4 eb fd"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}
