//! Dirty-page tracking: KVM's dirty log for every memory slot (the guest's writes) OR-ed with
//! the bitmap that [`crate::memory::GuestMem`] keeps of the VMM's own writes (virtio used
//! rings, block read data, status bytes) and with the dirty log of every vhost-user backend
//! (the same kinds of writes, made by another process). Missing either of the last two would
//! lose data written into the guest on the last pass.

use crate::devices::virtio::vhost_user::{DirtyLogging, VhostUserError};
use crate::memory::{GuestMem, PAGE_SIZE};
use kvm_ioctls::VmFd;
use std::ops::Deref;
use std::sync::Arc;
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Errors of dirty tracking.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// KVM's dirty log could not be switched or read.
    #[error("KVM's dirty log")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A vhost-user backend's dirty log could not be switched on.
    #[error("disk {0}: the vhost-user backend's dirty log")]
    Backend(usize, #[source] VhostUserError),
}

/// One bit per guest page of each region, in region order; bit `i` of word `w` is page
/// `w * 64 + i` of the region.
#[derive(Debug, Clone, Default)]
pub struct DirtyPages {
    /// Per region: `(guest address of the region, bitmap words)`.
    pub regions: Vec<(u64, Vec<u64>)>,
}

impl DirtyPages {
    /// Number of pages set.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, w)| w.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// ORs `other` (same layout) into this set.
    pub fn merge(&mut self, other: &DirtyPages) {
        if self.regions.is_empty() {
            *self = other.clone();
            return;
        }
        for ((_, a), (_, b)) in self.regions.iter_mut().zip(&other.regions) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= *y;
            }
        }
    }

    /// Guest addresses of the set pages, in order.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(base, words)| {
            words.iter().enumerate().flat_map(move |(w, &bits)| {
                let mut bits = bits;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let i = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    Some(base + (w as u64 * 64 + i) * PAGE_SIZE as u64)
                })
            })
        })
    }
}

/// Dirty tracking of a VM's memory.
pub struct DirtyLog {
    vm_fd: Arc<VmFd>,
    mem: Arc<GuestMem>,
    /// The vhost-user disks' logs, with their disk index.
    backends: Vec<(usize, DirtyLogging)>,
}

impl DirtyLog {
    /// Tracking over `mem`, registered with `vm_fd` as slots 0.. in region order, and of the
    /// writes of the vhost-user `backends` (with their disk index).
    pub fn new(
        vm_fd: Arc<VmFd>,
        mem: Arc<GuestMem>,
        backends: Vec<(usize, DirtyLogging)>,
    ) -> DirtyLog {
        DirtyLog {
            vm_fd,
            mem,
            backends,
        }
    }

    /// Turns KVM's dirty log and the backends' on and forgets the VMM's earlier writes: from
    /// now on every write to guest memory is recorded.
    pub fn start(&self) -> Result<(), DirtyError> {
        crate::memory::register_slots(&self.vm_fd, &self.mem, true).map_err(DirtyError::Kvm)?;
        for region in self.mem.iter() {
            region.deref().bitmap().reset();
        }
        for (disk, b) in &self.backends {
            b.start().map_err(|e| DirtyError::Backend(*disk, e))?;
        }
        Ok(())
    }

    /// Turns the dirty logs off (a backend that cannot be told keeps logging, harmlessly).
    pub fn stop(&self) -> Result<(), DirtyError> {
        for (disk, b) in &self.backends {
            if let Err(e) = b.stop() {
                tracing::warn!(disk, error = %vmhop_common::error::chain(&e),
                    "turning a vhost-user backend's dirty log off");
            }
        }
        crate::memory::register_slots(&self.vm_fd, &self.mem, false).map_err(DirtyError::Kvm)
    }

    /// The pages written since the last call (or [`Self::start`]), and clears them.
    pub fn fetch_and_clear(&self) -> Result<DirtyPages, DirtyError> {
        let mut regions = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut words = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(DirtyError::Kvm)?;
            let own = region.deref().bitmap().get_and_reset();
            for (w, o) in words.iter_mut().zip(own) {
                *w |= o;
            }
            regions.push((region.start_addr().0, words));
        }
        let mut pages = DirtyPages { regions };
        for (_, b) in &self.backends {
            b.take_into(&mut pages);
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_bits() {
        let d = DirtyPages {
            regions: vec![(0, vec![0b101, 0]), (1 << 32, vec![1 << 63])],
        };
        let a: Vec<u64> = d.addresses().collect();
        assert_eq!(a, vec![0, 2 * 4096, (1 << 32) + 63 * 4096]);
        assert_eq!(d.count(), 3);
        let mut m = DirtyPages::default();
        m.merge(&d);
        m.merge(&DirtyPages {
            regions: vec![(0, vec![0b10, 1]), (1 << 32, vec![0])],
        });
        assert_eq!(m.count(), 5);
    }
}
