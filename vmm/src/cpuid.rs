//! The CPU policy: what CPUID the guest sees.
//!
//! Start from `KVM_GET_SUPPORTED_CPUID` (what this host's KVM can virtualize), then:
//! 1. **Topology is ours.** Leaf 0x1 EBX carries the vCPU's initial APIC id and the logical
//!    processor count; leaves 0xB/0x1F report one thread per core and `vcpus` cores in one
//!    package, with the x2APIC id in EDX; leaf 0x4 reports `vcpus` cores per package. These must
//!    agree with the MP table, or the guest brings up the wrong CPUs.
//! 2. **Say we are a hypervisor** (leaf 0x1 ECX bit 31), so the guest uses the KVM paravirt
//!    leaves 0x4000_00xx (kvm-clock, PV EOI) that KVM already filled in.
//! 3. **Hide what the VMM does not emulate**: MONITOR/MWAIT (no idle emulation; the guest would
//!    spin or fault), VMX/SVM (no nesting offered), the architectural PMU (leaf 0xA: no PMU
//!    virtualization is configured), and the thermal/power leaf 0x6 bits beyond ARAT.
//! 4. **KVM paravirt features: the clock and interrupt ones only** (leaf 0x4000_0001 EAX):
//!    kvm-clock, no-op I/O delay, steal time, PV EOI, async page faults and the stable-clock
//!    bit, the same set QEMU gives its `kvm64` model. The hypercall-based optimizations (PV
//!    IPIs, PV TLB flush, sched yield, unhalt/kick) are hidden: observed on an emulating host
//!    (kvm_pvm), a secondary vCPU that issues the send-IPI hypercall never gets past it and the
//!    boot vCPU then spins forever waiting for it; plain IPIs through the in-kernel LAPIC work.
//! 5. **AMD topology leaves agree with 1-3**: 0x8000_0008 ECX (cores per package, APIC id
//!    bits) and 0x8000_001E (extended APIC id, core id, node), which AMD guests read instead
//!    of leaf 0xB.
//!
//! Everything else passes through. On a host with hardware virtualization this is what the
//! guest sees. On an emulating host (kvm_pvm), KVM overrides leaf 7 and forces some leaf-1 bits
//! regardless of what is set here; the guest kernel then hides the features its CPL0 code cannot
//! use (`pvm_native`). Migration between different hosts will need a common baseline computed
//! from both hosts' supported CPUID; that is a later extension of this module.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use thiserror::Error;

/// Errors applying the policy.
#[derive(Debug, Error)]
pub enum CpuidError {
    /// The adjusted table could not be rebuilt.
    #[error("build the CPUID table")]
    Build(#[source] vmm_sys_util::fam::Error),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

/// KVM PV features offered (bit numbers from linux/kvm_para.h): CLOCKSOURCE (0),
/// NOP_IO_DELAY (1), CLOCKSOURCE2 (3), ASYNC_PF (4), STEAL_TIME (5), PV_EOI (6),
/// CLOCKSOURCE_STABLE_BIT (24).
const KVM_FEATURES_OFFERED: u32 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 24);

const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_SVM: u32 = 1 << 2;
const POWER_EAX_ARAT: u32 = 1 << 2;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The CPUID table for vCPU `index` of `count`.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    // Bits needed to number `count` cores: the shift of the core level in leaf 0xB.
    let core_shift = 32 - (count32.max(1) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count32 & 0xff) << 16);
                e.ecx &= !(ECX_MONITOR | ECX_VMX);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1
                // (private caches: one thread).
                e.eax &= 0x0000_3fff;
                e.eax |= (count32 - 1) << 26;
            }
            LEAF_POWER => {
                e.eax &= POWER_EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = count32;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0001 => e.ecx &= !EXT_ECX_SVM,
            LEAF_KVM_FEATURES => e.eax &= KVM_FEATURES_OFFERED,
            LEAF_AMD_SIZES => {
                // ECX[15:12]: APIC id bits for the core; ECX[7:0]: cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_shift << 12) | (count32 - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id;
                // EBX[15:8]: threads per core - 1 (one); EBX[7:0]: core id.
                e.ebx = apic_id & 0xff;
                // ECX[10:8]: nodes per package - 1 (one); ECX[7:0]: node id.
                e.ecx = 0;
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(CpuidError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xffff_ffff,
            ecx: ECX_MONITOR | ECX_VMX | 1,
            edx: 0,
            eax: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn topology_matches_the_vcpu() {
        let supported = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        let c = vcpu_cpuid(&supported, 1, 2).unwrap();
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 1, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 2, "logical count");
        assert_eq!(e[0].ecx & (ECX_MONITOR | ECX_VMX), 0);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ecx & 1, 1, "other bits pass through");
        assert_eq!(e[2].ebx, 2);
        assert_eq!(e[2].eax, 1, "two cores need one bit");
        assert_eq!(e[1].edx, 1, "x2APIC id");
    }
}
