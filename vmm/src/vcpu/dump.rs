//! A readable report of a vCPU that stopped in a way the VMM cannot handle: registers,
//! segments, control registers and the instruction bytes at RIP, so an unsupported
//! instruction on an emulating host is found in a minute.

use crate::memory::GuestMem;
use kvm_ioctls::VcpuFd;
use std::fmt::Write;
use vm_memory::{Bytes, GuestAddress};

/// Bytes shown at RIP (the longest x86 instruction is 15).
const INSN_BYTES: usize = 16;

/// Formats the report. Never fails: what cannot be read is said so.
pub fn report(vcpu: &VcpuFd, mem: &GuestMem, index: u8, what: &str) -> String {
    let mut s = format!("vCPU {index}: {what}\n");
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(s, "  registers unavailable: {e}");
            return s;
        }
    };
    let _ = writeln!(
        s,
        "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}",
        regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi,
        regs.rdi, regs.rbp, regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14,
        regs.r15
    );
    let mut linear = regs.rip;
    match vcpu.get_sregs() {
        Ok(sr) => {
            let _ = writeln!(
                s,
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} apic_base={:#x}\n  cs={:#x} (base {:#x} l={} db={} dpl={}) ss={:#x} ds={:#x} tr={:#x}\n  gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.apic_base, sr.cs.selector, sr.cs.base,
                sr.cs.l, sr.cs.db, sr.cs.dpl, sr.ss.selector, sr.ds.selector, sr.tr.selector,
                sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
            );
            if sr.cs.l == 0 {
                linear = sr.cs.base.wrapping_add(regs.rip);
            }
        }
        Err(e) => {
            let _ = writeln!(s, "  special registers unavailable: {e}");
        }
    }
    // Paging may be on: let KVM walk the guest's page tables.
    let phys = match vcpu.translate_gva(linear) {
        Ok(t) if t.valid != 0 => Some(t.physical_address),
        _ => None,
    };
    match phys {
        Some(p) => {
            let mut bytes = [0u8; INSN_BYTES];
            match mem.read_slice(&mut bytes, GuestAddress(p)) {
                Ok(()) => {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    let _ = writeln!(
                        s,
                        "  code at rip (linear {linear:#x}, physical {p:#x}): {}",
                        hex.join(" ")
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "  code at physical {p:#x} unreadable: {e}");
                }
            }
        }
        None => {
            let _ = writeln!(s, "  rip linear {linear:#x} does not translate");
        }
    }
    s
}
