//! A vCPU's complete architectural state, saved from and restored into KVM.
//!
//! Order of KVM calls when saving (the vCPU is out of KVM_RUN, and so are all the others:
//! `KVM_GET_VCPU_EVENTS` is only consistent while no vCPU runs):
//! 1. `KVM_GET_MP_STATE` first: it makes the LAPIC accept pending INIT/SIPI events, which
//!    changes the LAPIC and the run state; anything read before it could be stale.
//! 2. `KVM_GET_REGS`, `KVM_GET_SREGS` (includes a pending external interrupt and the APIC base),
//!    `KVM_GET_XSAVE` (x87, SSE, AVX: the whole FPU), `KVM_GET_XCRS`, `KVM_GET_DEBUGREGS`.
//! 3. `KVM_GET_LAPIC` (reading it may fold pending state into the registers).
//! 4. `KVM_GET_TSC_KHZ`, `KVM_GET_CPUID2` (the CPUID the guest booted with).
//! 5. `KVM_GET_MSRS` with every MSR of `KVM_GET_MSR_INDEX_LIST` that this vCPU can read.
//! 6. `KVM_GET_VCPU_EVENTS` last: the other GET calls may change what is pending.
//!
//! Order when restoring (on a freshly created vCPU that has never run):
//! 1. `KVM_SET_CPUID2`: KVM derives which MSRs and XSAVE features exist from it. Skipped when
//!    the vCPU has exactly these entries already (`KVM_GET_CPUID2`), as a destination VMM built
//!    from the same configuration on the same CPU model has: the call makes KVM reset the
//!    vCPU's MMU context and took 150-200 us of a migration's downtime here.
//! 2. `KVM_SET_TSC_KHZ` if the frequency differs from this host's.
//! 3. `KVM_SET_MP_STATE`.
//! 4. `KVM_SET_REGS` before `KVM_SET_VCPU_EVENTS`: setting the registers drops pending
//!    exceptions, which the events then bring back.
//! 5. `KVM_SET_SREGS` before `KVM_SET_LAPIC`: the SREGS carry the APIC base MSR, which decides
//!    where and whether the LAPIC is enabled.
//! 6. `KVM_SET_XSAVE`, `KVM_SET_XCRS`, `KVM_SET_DEBUGREGS`.
//! 7. `KVM_SET_LAPIC` before `KVM_SET_MSRS`: the TSC deadline MSR only takes a value when the
//!    LAPIC is already in TSC-deadline mode. Within the MSRs, IA32_TSC comes before the
//!    deadline, as in KVM's list.
//! 8. `KVM_SET_VCPU_EVENTS` last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors saving or restoring a vCPU.
#[derive(Debug, Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {0}: {1}")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
    /// KVM took fewer MSRs than given.
    #[error("vCPU {0}: KVM_SET_MSRS took {1} of {2} MSRs (refused MSR {3:#x})")]
    Msrs(u8, usize, usize, u32),
    /// The MSR list could not be built.
    #[error("vCPU {0}: too many MSRs")]
    MsrList(u8),
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuSaved {
    /// vCPU index (APIC id).
    pub index: u8,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The XSAVE area: x87, SSE, AVX and the rest of the extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// TSC frequency in kHz (0 when KVM cannot say).
    pub tsc_khz: u32,
    /// The CPUID entries the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// `(index, value)` of every MSR saved.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
}

/// The MSRs of KVM's list that `fd` can read: KVM_GET_MSRS stops at the first MSR it refuses,
/// so each refused one is dropped and the rest tried again.
fn readable_msrs(index: u8, fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::new();
    for chunk in list.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let mut want = chunk.to_vec();
        while !want.is_empty() {
            let entries: Vec<kvm_msr_entry> = want
                .iter()
                .map(|&i| kvm_msr_entry {
                    index: i,
                    ..Default::default()
                })
                .collect();
            let mut msrs =
                Msrs::from_entries(&entries).map_err(|_| VcpuStateError::MsrList(index))?;
            let n = fd
                .get_msrs(&mut msrs)
                .map_err(|e| VcpuStateError::Kvm(index, "KVM_GET_MSRS", e))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            if n == want.len() {
                break;
            }
            tracing::debug!(vcpu = index, msr = want[n], "MSR not readable; not saved");
            want.drain(..=n);
        }
    }
    Ok(out)
}

/// Whether two CPUID tables hold the same entries (in any order).
fn same_cpuid(a: &[kvm_cpuid_entry2], b: &[kvm_cpuid_entry2]) -> bool {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx);
    let (mut a, mut b): (Vec<_>, Vec<_>) =
        (a.iter().map(key).collect(), b.iter().map(key).collect());
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

impl VcpuSaved {
    /// Saves the state of a vCPU that is out of KVM_RUN, while no vCPU runs. `msr_list` is
    /// KVM's MSR index list.
    pub fn save(index: u8, fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuSaved, VcpuStateError> {
        let k = |what: &'static str| move |e| VcpuStateError::Kvm(index, what, e);
        let mp_state = fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(k("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(k("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(k("KVM_GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(k("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = readable_msrs(index, fd, msr_list)?;
        let events = fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuSaved {
            index,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            tsc_khz,
            cpuid,
            msrs,
            events,
        })
    }

    /// Restores the state into a vCPU that has not run yet (see the module docs for the order).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let index = self.index;
        let k = |what: &'static str| move |e| VcpuStateError::Kvm(index, what, e);
        let current = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES);
        if !current.is_ok_and(|c| same_cpuid(c.as_slice(), &self.cpuid)) {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| {
                VcpuStateError::Kvm(index, "build CPUID", kvm_ioctls::Error::new(libc::E2BIG))
            })?;
            fd.set_cpuid2(&cpuid).map_err(k("KVM_SET_CPUID2"))?;
        }
        if self.tsc_khz != 0 && fd.get_tsc_khz().ok() != Some(self.tsc_khz) {
            fd.set_tsc_khz(self.tsc_khz).map_err(k("KVM_SET_TSC_KHZ"))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(k("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(k("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(k("KVM_SET_SREGS"))?;
        // SAFETY: the area came from KVM_GET_XSAVE of a vCPU with the same CPUID (set just
        // above), so it describes only features this vCPU has and fits `kvm_xsave`.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(k("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(k("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(k("KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::MsrList(index))?;
            let n = fd.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(VcpuStateError::Msrs(index, n, chunk.len(), chunk[n].index));
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(k("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_tables_compare_by_their_entries_in_any_order() {
        let a = [entry(0, 0, 0xd), entry(7, 0, 1), entry(7, 1, 2)];
        let reordered = [entry(7, 1, 2), entry(0, 0, 0xd), entry(7, 0, 1)];
        assert!(same_cpuid(&a, &reordered));
        let one_register = [entry(0, 0, 0xd), entry(7, 0, 1), entry(7, 1, 3)];
        assert!(!same_cpuid(&a, &one_register));
        assert!(!same_cpuid(&a, &a[..2]));
        let mut flags = a;
        flags[0].flags = 1;
        assert!(!same_cpuid(&a, &flags));
    }
}
