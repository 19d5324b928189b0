//! The VM-wide state KVM holds: the in-kernel PIT, kvmclock and irqchip (two 8259 PICs and the
//! I/O APIC).
//!
//! Order of KVM calls: saving reads `KVM_GET_PIT2`, `KVM_GET_CLOCK` and `KVM_GET_IRQCHIP` (PIC
//! master, PIC slave, I/O APIC) while no vCPU runs; restoring sets them in the same order,
//! after the memory and before any vCPU state (a vCPU's LAPIC state refers to interrupts the
//! I/O APIC routes).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors saving or restoring the VM-wide KVM state.
#[derive(Debug, Error)]
pub enum KvmStateError {
    /// A VM-level KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// The in-kernel devices of the VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The I/O APIC.
    pub ioapic: kvm_irqchip,
}

impl KvmVmState {
    /// Reads the state (no vCPU may run).
    pub fn save(vm: &VmFd) -> Result<KvmVmState, KvmStateError> {
        let pit = vm
            .get_pit2()
            .map_err(|e| KvmStateError::Kvm("KVM_GET_PIT2", e))?;
        let clock = vm
            .get_clock()
            .map_err(|e| KvmStateError::Kvm("KVM_GET_CLOCK", e))?;
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map(|_| c)
                .map_err(|e| KvmStateError::Kvm("KVM_GET_IRQCHIP", e))
        };
        Ok(KvmVmState {
            pit,
            clock,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Loads the state into a VM whose vCPUs have not run.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        vm.set_pit2(&self.pit)
            .map_err(|e| KvmStateError::Kvm("KVM_SET_PIT2", e))?;
        // Only the clock value: flags such as KVM_CLOCK_REALTIME would ask KVM to add the time
        // that passed in between, which a paused guest should not see as a jump.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| KvmStateError::Kvm("KVM_SET_CLOCK", e))?;
        for c in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(c)
                .map_err(|e| KvmStateError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}
