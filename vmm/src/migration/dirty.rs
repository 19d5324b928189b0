//! Dirty-page tracking: KVM's dirty log for every memory slot (the guest's writes) OR-ed with
//! the bitmap that [`crate::memory::GuestMem`] keeps of the VMM's own writes (virtio used
//! rings, block read data, status bytes). Missing the second half would lose data the VMM
//! wrote into the guest on the last pass.

use crate::memory::{GuestMem, PAGE_SIZE};
use kvm_ioctls::VmFd;
use std::ops::Deref;
use std::sync::Arc;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
}

impl DirtyLog {
    /// Tracking over `mem`, registered with `vm_fd` as slots 0.. in region order.
    pub fn new(vm_fd: Arc<VmFd>, mem: Arc<GuestMem>) -> DirtyLog {
        DirtyLog { vm_fd, mem }
    }

    /// Turns KVM's dirty log on for every slot and forgets the VMM's earlier writes: from
    /// now on every write to guest memory is recorded.
    pub fn start(&self) -> Result<(), kvm_ioctls::Error> {
        crate::memory::register_slots(&self.vm_fd, &self.mem, true)?;
        for region in self.mem.iter() {
            region.deref().bitmap().reset();
        }
        Ok(())
    }

    /// Turns KVM's dirty log off.
    pub fn stop(&self) -> Result<(), kvm_ioctls::Error> {
        crate::memory::register_slots(&self.vm_fd, &self.mem, false)
    }

    /// The pages written since the last call (or [`Self::start`]), and clears them.
    pub fn fetch_and_clear(&self) -> Result<DirtyPages, kvm_ioctls::Error> {
        let mut regions = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let mut words = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)?;
            let own = region.deref().bitmap().get_and_reset();
            for (w, o) in words.iter_mut().zip(own) {
                *w |= o;
            }
            regions.push((region.start_addr().0, words));
        }
        Ok(DirtyPages { regions })
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
