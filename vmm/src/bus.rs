//! Address-range dispatch of vCPU I/O exits to devices: one bus for port I/O, one for MMIO.
//! Built once before the vCPUs start, then shared read-only; each device has its own lock, so
//! vCPUs touching different devices do not serialize.

use std::sync::{Arc, Mutex};
use thiserror::Error;

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// Adds `device` at `base..base+len`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr < e.base + e.len).then(|| (&e.device, addr - e.base))
    }

    /// Dispatches a read; returns false (and fills `data` with ones, like an empty ISA bus)
    /// when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a previous holder panicked: device state stays usable, and a vCPU
/// thread must not die because another one did.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x3f8, 8)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(20))), 0x60, 5).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x3fa, 1).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 11);
        assert!(bus.read(0x64, &mut b));
        assert_eq!(b[0], 24);
        assert!(!bus.read(0x65, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x60, &[5]));
        bus.read(0x60, &mut b);
        assert_eq!(b[0], 5);
    }
}
