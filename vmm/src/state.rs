//! The VM's saved state: plain versioned data in an envelope with magic, version and checksum.
//! The migration stream carries one envelope at the end; a snapshot file holds one beside the
//! memory image.
//!
//! ```text
//! envelope = magic "VMHOPST\0" | u32 version | u32 0 | u64 payload length | u32 CRC-32 of the
//!            payload | u32 0 | payload (JSON of VmState)
//! ```
//! The payload is JSON: KVM structures appear as byte arrays (kvm-bindings' own encoding), the
//! rest as named fields, so a state can be read with standard tools when something goes wrong.
//!
//! Order of KVM calls for the VM-wide state: saving reads `KVM_GET_PIT2`, `KVM_GET_CLOCK` and
//! `KVM_GET_IRQCHIP` (PIC master, PIC slave, I/O APIC) while no vCPU runs; restoring sets them
//! in the same order, after the memory and before any vCPU state (a vCPU's LAPIC state refers
//! to interrupts the I/O APIC routes).

use crate::vcpu::state::VcpuSaved;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Magic at the start of a state envelope.
pub const STATE_MAGIC: &[u8; 8] = b"VMHOPST\0";
/// Version of the state format this VMM writes and reads.
pub const STATE_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;

/// Errors with saved state.
#[derive(Debug, Error)]
pub enum StateError {
    /// Not a state envelope.
    #[error("not a VM state (bad magic {0:02x?})")]
    Magic(Vec<u8>),
    /// A state of another version.
    #[error("VM state version {0}; this VMM reads version {STATE_VERSION}")]
    Version(u32),
    /// Shorter than its header says.
    #[error("VM state truncated: {0} of {1} bytes")]
    Truncated(usize, usize),
    /// The checksum does not match.
    #[error("VM state checksum mismatch (stored {0:#010x}, computed {1:#010x})")]
    Checksum(u32, u32),
    /// The payload does not decode.
    #[error("VM state does not decode")]
    Decode(#[source] serde_json::Error),
    /// The payload could not be encoded.
    #[error("encode VM state")]
    Encode(#[source] serde_json::Error),
    /// The state is for a different VM shape.
    #[error("VM state does not fit this VM: {0}")]
    Mismatch(String),
    /// A VM-level KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// The VM's shape, checked on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Disk count.
    pub disks: usize,
}

/// Everything about a paused VM except its memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The VM's shape.
    pub shape: Shape,
    /// In-kernel VM devices.
    pub kvm: KvmVmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuSaved>,
    /// COM1.
    pub serial: SerialSaved,
    /// Each virtio-mmio disk, in order.
    pub disks: Vec<TransportSaved>,
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
    pub fn save(vm: &VmFd) -> Result<KvmVmState, StateError> {
        let pit = vm
            .get_pit2()
            .map_err(|e| StateError::Kvm("KVM_GET_PIT2", e))?;
        let clock = vm
            .get_clock()
            .map_err(|e| StateError::Kvm("KVM_GET_CLOCK", e))?;
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map(|_| c)
                .map_err(|e| StateError::Kvm("KVM_GET_IRQCHIP", e))
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
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_pit2(&self.pit)
            .map_err(|e| StateError::Kvm("KVM_SET_PIT2", e))?;
        // Only the clock value: flags such as KVM_CLOCK_REALTIME would ask KVM to add the time
        // that passed in between, which a paused guest should not see as a jump.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| StateError::Kvm("KVM_SET_CLOCK", e))?;
        for c in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(c)
                .map_err(|e| StateError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}

/// The 8250 UART's registers and receive FIFO.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSaved {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// One virtqueue's position and layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSaved {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available entry the device will read.
    pub next_avail: u16,
    /// Next used entry the device will write.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in use.
    pub event_idx: bool,
}

/// A virtio-mmio transport's registers, its queues and whether the device is active.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSaved {
    /// The virtio device id (checked on restore).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// DRIVER_OK was accepted and the device runs its data path.
    pub activated: bool,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues.
    pub queues: Vec<QueueSaved>,
}

/// Wraps `state` in an envelope.
pub fn encode(state: &VmState) -> Result<Vec<u8>, StateError> {
    let payload = serde_json::to_vec(state).map_err(StateError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks an envelope and decodes the state.
pub fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
    if bytes.len() < HEADER_LEN {
        return Err(StateError::Truncated(bytes.len(), HEADER_LEN));
    }
    if &bytes[..8] != STATE_MAGIC {
        return Err(StateError::Magic(bytes[..8].to_vec()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != STATE_VERSION {
        return Err(StateError::Version(version));
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")) as usize;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() < len {
        return Err(StateError::Truncated(bytes.len(), HEADER_LEN + len));
    }
    let payload = &payload[..len];
    let stored = u32_at(24);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(StateError::Checksum(stored, computed));
    }
    serde_json::from_slice(payload).map_err(StateError::Decode)
}

impl VmState {
    /// Checks the state against the VM it is restored into.
    pub fn check_shape(&self, shape: &Shape) -> Result<(), StateError> {
        if &self.shape != shape {
            return Err(StateError::Mismatch(format!(
                "saved {:?}, this VM {:?}",
                self.shape, shape
            )));
        }
        if self.vcpus.len() != usize::from(shape.vcpus) || self.disks.len() != shape.disks {
            return Err(StateError::Mismatch(format!(
                "{} vCPU and {} disk states for {:?}",
                self.vcpus.len(),
                self.disks.len(),
                shape
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            shape: Shape {
                memory_mib: 64,
                vcpus: 0,
                disks: 1,
            },
            kvm: KvmVmState {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            vcpus: Vec::new(),
            serial: SerialSaved::default(),
            disks: vec![TransportSaved {
                device_type: 2,
                activated: true,
                queues: vec![QueueSaved {
                    next_avail: 7,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&sample()).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back.disks, sample().disks);
        assert_eq!(back.shape, sample().shape);
    }

    #[test]
    fn refuses_corruption_version_and_truncation() {
        let bytes = encode(&sample()).unwrap();
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x40;
        assert!(matches!(decode(&bad), Err(StateError::Checksum(..))));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(decode(&v2), Err(StateError::Version(2))));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(StateError::Truncated(..))
        ));
        assert!(matches!(
            decode(b"nonsense, not a state at all....."),
            Err(StateError::Magic(_))
        ));
        let s = sample();
        let other = Shape {
            memory_mib: 128,
            ..s.shape.clone()
        };
        assert!(s.check_shape(&other).is_err());
        assert!(s.check_shape(&s.shape).is_ok());
    }
}
