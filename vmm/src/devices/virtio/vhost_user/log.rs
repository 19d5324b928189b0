//! The dirty log a vhost-user backend writes during a migration (the protocol's
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): a bitmap in a memfd that the VMM shares with the
//! backend through `SET_LOG_BASE`. One bit per 4 KiB guest page, indexed by guest physical
//! page number: byte `p / 8`, bit `p % 8` (vhost's layout, which vhost-user-backend's
//! `BitmapMmapRegion` and libvhost-user write). The backend sets bits with atomic ORs; the
//! VMM takes them with atomic swaps, so no write between two fetches is lost.

use crate::memory::{GuestMem, PAGE_SIZE};
use crate::migration::dirty::DirtyPages;
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;
use vhost::VhostUserDirtyLogRegion;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion};

/// Errors creating the log.
#[derive(Debug, Error)]
pub enum LogError {
    /// memfd_create or sizing it failed.
    #[error("create the dirty log memfd")]
    Memfd(#[source] std::io::Error),
    /// Mapping it failed.
    #[error("map the dirty log")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Pages one bitmap word covers.
const PAGES_PER_WORD: u64 = 64;

/// A dirty log shared with one backend.
#[derive(Debug)]
pub struct DirtyLog {
    file: Arc<File>,
    map: MmapRegion<()>,
    /// Words of the bitmap (each covers [`PAGES_PER_WORD`] pages).
    words: usize,
}

impl DirtyLog {
    /// A zeroed log covering every page of `mem` (from guest address 0 to its end).
    pub fn new(mem: &GuestMem) -> Result<DirtyLog, LogError> {
        let end = mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        let pages = end.div_ceil(PAGE_SIZE as u64);
        let words = pages.div_ceil(PAGES_PER_WORD) as usize;
        // Whole pages, so that both sides can map it.
        let bytes = (words * 8).div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let fd = memfd_create(c"vhost-dirty-log", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| LogError::Memfd(e.into()))?;
        let file = Arc::new(File::from(fd));
        file.set_len(bytes as u64).map_err(LogError::Memfd)?;
        let map = MmapRegionBuilder::new(bytes)
            .with_file_offset(FileOffset::from_arc(file.clone(), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(LogError::Map)?;
        Ok(DirtyLog { file, map, words })
    }

    /// What `SET_LOG_BASE` sends: the memfd, its size and offset.
    pub fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.map.size() as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn word(&self, i: usize) -> Option<&AtomicU64> {
        if i >= self.words {
            return None;
        }
        // SAFETY: the mapping is `map.size() >= words * 8` bytes, page aligned (so every
        // 8-byte word is aligned), lives as long as `self`, and is only ever accessed
        // atomically (here and, with atomic byte ORs, by the backend).
        Some(unsafe { &*(self.map.as_ptr().add(i * 8) as *const AtomicU64) })
    }

    /// Takes the pages logged since the last call and ORs them into `into`, whose regions
    /// are laid out as [`DirtyPages`] says (every region starts on a 64-page boundary in our
    /// guest memory layout, so its words are whole words of the log).
    pub fn take_into(&self, into: &mut DirtyPages) {
        for (base, words) in into.regions.iter_mut() {
            let first = (*base / PAGE_SIZE as u64 / PAGES_PER_WORD) as usize;
            for (i, w) in words.iter_mut().enumerate() {
                let Some(word) = self.word(first + i) else {
                    break;
                };
                if word.load(Ordering::Relaxed) != 0 {
                    *w |= word.swap(0, Ordering::AcqRel);
                }
            }
        }
    }

    /// Clears the whole log (when logging starts).
    pub fn clear(&self) {
        for i in 0..self.words {
            if let Some(w) = self.word(i) {
                w.store(0, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    #[test]
    fn pages_the_backend_logs_come_out_once() {
        let (mem, _fd) = crate::memory::create_guest_memory(16).unwrap();
        let log = DirtyLog::new(&mem).unwrap();
        // The backend's side: an atomic OR of one bit per page into the byte p / 8.
        let set = |page: usize| {
            // SAFETY: within the mapping (16 MiB = 4096 pages = 512 bytes of log).
            let byte = unsafe { &*(log.map.as_ptr().add(page / 8) as *const AtomicU8) };
            byte.fetch_or(1 << (page % 8), Ordering::SeqCst);
        };
        set(3);
        set(64);
        set(4095);
        let mut d = DirtyPages {
            regions: vec![(0, vec![0; 64])],
        };
        log.take_into(&mut d);
        let pages: Vec<u64> = d.addresses().map(|a| a / PAGE_SIZE as u64).collect();
        assert_eq!(pages, vec![3, 64, 4095]);
        let mut again = DirtyPages {
            regions: vec![(0, vec![0; 64])],
        };
        log.take_into(&mut again);
        assert_eq!(again.count(), 0);
        assert_eq!(log.region().mmap_size, PAGE_SIZE as u64);
    }
}
