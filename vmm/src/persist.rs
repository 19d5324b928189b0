//! The VM's saved state: the [`Persist`] pair every device implements beside its code, and the
//! envelope with magic, version and checksum that carries the whole. The migration stream
//! carries one envelope at the end; a snapshot file holds one beside the memory image.
//!
//! ```text
//! envelope = magic "VMHOPST\0" | u32 version | u32 0 | u64 payload length | u32 CRC-32 of the
//!            payload | u32 0 | payload (JSON of VmState)
//! ```
//! The payload is JSON: KVM structures appear as byte arrays (kvm-bindings' own encoding), the
//! rest as named fields, so a state can be read with standard tools when something goes wrong.
//!
//! Version policy: one [`STATE_VERSION`] for the whole state, checked on load; any change to
//! a device's state struct bumps it (a VMM reads only its own version). Version 2 added each
//! device's own part: the i8042's (empty) and each disk's block device (the features it
//! offered and its size, checked on restore) inside its transport's state.
//!
//! Where each part is saved and restored, with the order of its KVM calls:
//! [`crate::vm::kvm_state`] (PIT, clock, irqchip: before any vCPU), [`crate::vcpu::state`]
//! (each vCPU), then the devices: [`crate::devices::serial`], [`crate::devices::i8042`] and
//! each disk's [`crate::devices::virtio::mmio`] transport with its
//! [`crate::devices::virtio::disk`] device. A disk's state is what the guest saw
//! ([`crate::devices::virtio::block::BlockState`]) whether the VMM or a vhost-user backend
//! serves it, so the kind may differ between the saving and the restoring VMM; a vhost-user
//! disk's ring positions are those its backend reported at GET_VRING_BASE.

use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialState;
use crate::devices::virtio::block::BlockState;
use crate::devices::virtio::mmio::TransportState;
use crate::vcpu::state::VcpuSaved;
use crate::vm::kvm_state::KvmVmState;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Magic at the start of a state envelope.
pub const STATE_MAGIC: &[u8; 8] = b"VMHOPST\0";
/// Version of the state format this VMM writes and reads.
pub const STATE_VERSION: u32 = 2;
/// Bytes of the envelope's header.
const HEADER_LEN: usize = 32;

/// A device whose state is saved and restored. Neither method has a default: a device that
/// forgets its state does not compile.
pub trait Persist {
    /// The saved state: plain serde data, defined in the device's module.
    type State: Serialize + DeserializeOwned;
    /// Why saving or restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The device's state; its data path is quiesced.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Loads `state` into a device the guest has not touched yet (its data path stays
    /// stopped).
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// Errors with the envelope.
#[derive(Debug, Error)]
pub enum PersistError {
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
    /// The state is for a VM of another shape.
    #[error("VM state does not fit this VM: saved {saved:?}, this VM {this:?}")]
    Shape {
        /// The saved VM's.
        saved: Shape,
        /// This VM's.
        this: Shape,
    },
    /// The state's parts do not match its own shape.
    #[error("VM state has {vcpus} vCPU and {disks} disk states for {shape:?}")]
    Parts {
        /// vCPU states.
        vcpus: usize,
        /// Disk states.
        disks: usize,
        /// The shape it claims.
        shape: Shape,
    },
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
    pub serial: SerialState,
    /// The i8042 controller.
    pub i8042: I8042State,
    /// Each virtio-mmio disk, in order.
    pub disks: Vec<TransportState<BlockState>>,
}

/// Wraps `state` in an envelope.
pub fn encode(state: &VmState) -> Result<Vec<u8>, PersistError> {
    let payload = serde_json::to_vec(state).map_err(PersistError::Encode)?;
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
pub fn decode(bytes: &[u8]) -> Result<VmState, PersistError> {
    if bytes.len() < HEADER_LEN {
        return Err(PersistError::Truncated(bytes.len(), HEADER_LEN));
    }
    if &bytes[..8] != STATE_MAGIC {
        return Err(PersistError::Magic(bytes[..8].to_vec()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != STATE_VERSION {
        return Err(PersistError::Version(version));
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let payload = &bytes[HEADER_LEN..];
    let Some(payload) = usize::try_from(len).ok().and_then(|n| payload.get(..n)) else {
        let claimed = usize::try_from(len).map_or(usize::MAX, |n| n.saturating_add(HEADER_LEN));
        return Err(PersistError::Truncated(bytes.len(), claimed));
    };
    let stored = u32_at(24);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(PersistError::Checksum(stored, computed));
    }
    serde_json::from_slice(payload).map_err(PersistError::Decode)
}

impl VmState {
    /// Checks the state against the VM it is restored into.
    pub fn check_shape(&self, shape: &Shape) -> Result<(), PersistError> {
        if &self.shape != shape {
            return Err(PersistError::Shape {
                saved: self.shape.clone(),
                this: shape.clone(),
            });
        }
        if self.vcpus.len() != usize::from(shape.vcpus) || self.disks.len() != shape.disks {
            return Err(PersistError::Parts {
                vcpus: self.vcpus.len(),
                disks: self.disks.len(),
                shape: shape.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::QueueState;

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
            serial: SerialState::default(),
            i8042: I8042State {},
            disks: vec![TransportState {
                device_type: 2,
                activated: true,
                queues: vec![QueueState {
                    next_avail: 7,
                    ..Default::default()
                }],
                device: BlockState {
                    features: 1 << 32,
                    size: 1 << 20,
                },
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
        assert!(matches!(decode(&bad), Err(PersistError::Checksum(..))));
        let mut v2 = bytes.clone();
        v2[8] = 1;
        assert!(matches!(decode(&v2), Err(PersistError::Version(1))));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(PersistError::Truncated(..))
        ));
        assert!(matches!(
            decode(b"nonsense, not a state at all....."),
            Err(PersistError::Magic(_))
        ));
        // Found by the fuzzer: a length near 2^64 overflowed while the error was made.
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        assert!(matches!(decode(&huge), Err(PersistError::Truncated(..))));
        let s = sample();
        let other = Shape {
            memory_mib: 128,
            ..s.shape.clone()
        };
        assert!(s.check_shape(&other).is_err());
        assert!(s.check_shape(&s.shape).is_ok());
    }
}
