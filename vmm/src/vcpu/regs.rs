//! The architectural state a vCPU starts with.
//!
//! Order of KVM calls for each vCPU (the order matters):
//! 1. `KVM_SET_CPUID2` first: KVM derives which MSRs exist and the guest's physical address
//!    width from CPUID, so MSR and register writes before it can be refused or misread.
//! 2. `KVM_SET_MSRS` (boot defaults).
//! 3. `KVM_SET_FPU` (x87 control word and MXCSR reset values).
//! 4. `KVM_SET_LAPIC`: LINT0 as ExtINT and LINT1 as NMI, as firmware would leave them.
//! 5. Boot vCPU only: `KVM_SET_SREGS` then `KVM_SET_REGS` for the entry point. Application
//!    processors keep KVM's reset state: the in-kernel LAPIC holds them in wait-for-SIPI until
//!    the guest starts them.

use crate::boot::linux64::PML4_ADDR;
use crate::boot::{EntryPoint, BOOT_GDT_ADDR, BOOT_IDT_ADDR};
use crate::memory::GuestMem;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// Errors while setting the initial state.
#[derive(Debug, Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing the GDT failed.
    #[error("write the boot GDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE: fast string operations enabled, as firmware leaves it.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRR default type: MTRRs enabled, default memory type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values a vCPU starts with.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Sets MSRs, FPU and LAPIC (steps 2-4 above).
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| RegsError::Kvm("build MSR list", kvm_ioctls::Error::new(libc::EINVAL)))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        // KVM stops at the first MSR it refuses; the rest are left at reset values.
        tracing::warn!(
            refused = entries[set].index,
            "KVM refused a boot MSR; later ones keep KVM's reset values"
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))?;

    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        // Delivery mode is bits 8..=10.
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))?;
    Ok(())
}

/// A GDT entry from flags, base and limit (the packed x86 descriptor format).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The segment register state a GDT entry describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets segment and control registers, then the general registers, for `entry` (step 5).
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMem, entry: EntryPoint) -> Result<(), RegsError> {
    let long_mode = matches!(entry, EntryPoint::Linux64 { .. });
    // Null, code, data, TSS. Code is 64-bit (L) for the 64-bit protocol, 32-bit (D) for PVH.
    let code_flags: u16 = if long_mode { 0xa09b } else { 0xc09b };
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + i as u64 * 8))
            .map_err(RegsError::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(RegsError::Gdt)?;

    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if long_mode {
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { entry, start_info } => {
            regs.rip = entry.0;
            regs.rbx = start_info.0;
        }
        EntryPoint::Linux64 { entry, boot_params } => {
            regs.rip = entry.0;
            regs.rsi = boot_params.0;
            // A stack below the boot structures, in case the entry uses one before its own.
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
    }
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(
            (code.type_, code.db, code.l, code.g, code.s),
            (0xb, 1, 0, 1, 1)
        );
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.db, code64.l), (0, 1));
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(
            (tss.type_, tss.s, tss.limit, tss.selector),
            (0xb, 0, 0x67, 0x18)
        );
    }
}
