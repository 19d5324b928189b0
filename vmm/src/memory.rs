//! Guest physical memory: memfd-backed regions with a dirty bitmap, and the guest physical
//! address map (RAM, the MMIO hole below 4 GiB, the device windows).
//!
//! The memory is a memfd so that it has a file descriptor: a later local migration or a
//! vhost-user backend can map the same pages. Each region carries an [`AtomicBitmap`] that
//! vm-memory sets on every write made through the [`vm_memory::Bytes`] interface; KVM's own
//! dirty log covers only the guest's writes.

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::sync::Arc;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, GuestUsize};

/// Guest memory with a per-page dirty bitmap: the only type through which the VMM writes.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Guest page size for dirty tracking.
pub const PAGE_SIZE: usize = 4096;
/// Start of the hole below 4 GiB that holds device MMIO, the IOAPIC and the LAPIC.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole: RAM continues here.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// Base of the virtio-mmio device windows (inside the hole, clear of IOAPIC/LAPIC).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Address the kernel expects for the first I/O APIC (also in the MP table).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Address of the local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (three pages) sits just below the BIOS area at the top of the hole (Intel only;
/// KVM requires it before the first KVM_RUN).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Errors while creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The memory size is zero or not page aligned.
    #[error("guest memory size {0} MiB is not usable")]
    BadSize(u64),
    /// memfd_create failed.
    #[error("memfd_create")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("size the memfd")]
    Truncate(#[source] std::io::Error),
    /// mmap of a region failed.
    #[error("map guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// Regions overlap or are out of order.
    #[error("assemble guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// The memory file could not be opened or sized.
    #[error("guest memory file {0}")]
    File(std::path::PathBuf, #[source] std::io::Error),
    /// Another process holds the memory file's lock (another VMM runs on it).
    #[error("guest memory file {0} is in use by another process (its lock is held)")]
    FileInUse(std::path::PathBuf),
}

/// The RAM ranges `(guest address, size)` for `mem_bytes` of memory: below the MMIO hole, and
/// the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// Creates `mib` MiB of guest memory in one memfd, mapped shared, with a dirty bitmap per
/// region. Returns the memory and the memfd.
pub fn create_guest_memory(mib: u64) -> Result<(Arc<GuestMem>, Arc<File>), MemoryError> {
    let bytes = check_size(mib)?;
    let fd = memfd_create(c"guest-mem", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| MemoryError::Memfd(e.into()))?;
    let file = Arc::new(File::from(fd));
    file.set_len(bytes).map_err(MemoryError::Truncate)?;
    let mem = map_regions(mib, &file, 0, libc::MAP_SHARED)?;
    Ok((mem, file))
}

/// Guest memory in the file at `path`, mapped shared (see `VmConfig::memory_file`): opened or
/// created, extended to `mib` MiB if shorter (with `emptied`, emptied first: all zero, as a
/// migration's destination needs), and locked (`flock`) for as long as the memory is mapped.
/// Returns the memory and the file.
pub fn open_guest_memory_file(
    mib: u64,
    path: &std::path::Path,
    emptied: bool,
) -> Result<(Arc<GuestMem>, Arc<File>), MemoryError> {
    let bytes = check_size(mib)?;
    let failed = |e| MemoryError::File(path.to_path_buf(), e);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(failed)?;
    // Released when the last descriptor of this open file closes: the mappings hold it.
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => MemoryError::FileInUse(path.to_path_buf()),
        std::fs::TryLockError::Error(e) => failed(e),
    })?;
    if emptied {
        file.set_len(0).map_err(failed)?;
    }
    if file.metadata().map_err(failed)?.len() < bytes {
        file.set_len(bytes).map_err(failed)?;
    }
    let file = Arc::new(file);
    let mem = map_regions(mib, &file, 0, libc::MAP_SHARED)?;
    Ok((mem, file))
}

/// Guest memory mapped privately (copy on write) from `file` at `offset`, where a snapshot
/// keeps the guest's RAM: pages are read from the file only when first touched.
pub fn map_guest_memory_from_file(
    mib: u64,
    file: &Arc<File>,
    offset: u64,
) -> Result<Arc<GuestMem>, MemoryError> {
    check_size(mib)?;
    map_regions(mib, file, offset, libc::MAP_PRIVATE)
}

fn check_size(mib: u64) -> Result<u64, MemoryError> {
    let bytes = mib.checked_mul(1 << 20).ok_or(MemoryError::BadSize(mib))?;
    if bytes == 0 || bytes > (1 << 46) {
        return Err(MemoryError::BadSize(mib));
    }
    Ok(bytes)
}

fn map_regions(
    mib: u64,
    file: &Arc<File>,
    offset: u64,
    share: libc::c_int,
) -> Result<Arc<GuestMem>, MemoryError> {
    let bytes = mib << 20;
    let mut regions = Vec::new();
    let mut file_offset = offset;
    for (addr, size) in ram_ranges(bytes) {
        let size_usize = size as usize;
        let bitmap = AtomicBitmap::new(
            size_usize,
            std::num::NonZeroUsize::new(PAGE_SIZE).expect("page size"),
        );
        let region = MmapRegionBuilder::new_with_bitmap(size_usize, bitmap)
            .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(share | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Mmap)?;
        regions.push(Arc::new(
            GuestRegionMmap::new(region, addr).ok_or(MemoryError::BadSize(mib))?,
        ));
        file_offset += size;
    }
    let mem = GuestMem::from_arc_regions(regions).map_err(MemoryError::Regions)?;
    Ok(Arc::new(mem))
}

/// Registers every region of `mem` with KVM as memory slot 0, 1, ..., with KVM's dirty log on
/// or off. Called once at build and again to switch the dirty log.
pub fn register_slots(
    vm_fd: &kvm_ioctls::VmFd,
    mem: &GuestMem,
    log_dirty: bool,
) -> Result<(), kvm_ioctls::Error> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the mapping is owned by `mem`, which the VM keeps alive (and the vCPUs and
        // devices hold references to) for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(r) }?;
    }
    Ok(())
}

/// Copies `len` bytes of `src` from `src_offset` into guest memory at `addr`, which must lie
/// in one region, and marks them dirty. Where the region maps a file shared (the memfd, a
/// memory file) the kernel copies file to file (`sendfile`): no page faults on the mapping,
/// about half the time of a read into it (6.6 MiB of kernel: ~3 ms against ~6 ms). A file that
/// takes no writes (hugetlbfs) or a private mapping gets the bytes read into the mapping.
/// The guest memory file's position is moved: nothing else uses it.
pub fn fill_from_file(
    mem: &GuestMem,
    addr: GuestAddress,
    src: &File,
    src_offset: u64,
    len: usize,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let outside = || Error::new(ErrorKind::InvalidInput, "outside guest RAM");
    let (region, at) = mem.to_region_addr(addr).ok_or_else(outside)?;
    at.0.checked_add(len as u64)
        .filter(|&end| end <= region.len())
        .ok_or_else(outside)?;
    if let Some(fo) = region.file_offset() {
        if region.flags() & libc::MAP_SHARED != 0 {
            match send_file(fo.file(), fo.start() + at.0, src, src_offset, len) {
                Ok(()) => {
                    region.bitmap().mark_dirty(at.0 as usize, len);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
    }
    read_into(mem, addr, src, src_offset, len)
}

/// `sendfile` loop: `len` bytes of `src` at `src_offset` to `dst` at `dst_offset`.
fn send_file(
    dst: &File,
    dst_offset: u64,
    src: &File,
    src_offset: u64,
    len: usize,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::AsRawFd;
    lseek(dst, dst_offset as i64, Whence::SeekSet)?;
    let mut from = libc::off_t::try_from(src_offset)
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "source offset too large"))?;
    let mut left = len;
    while left > 0 {
        // SAFETY: both descriptors are open for the call; `from` is a valid off_t the kernel
        // updates (the source's own position is left alone).
        let n = unsafe { libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut from, left) };
        match n {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => left -= n as usize,
        }
    }
    Ok(())
}

/// Reads `len` bytes of `src` at `src_offset` into guest memory at `addr` through the mapping
/// (the writes mark the pages dirty).
fn read_into(
    mem: &GuestMem,
    addr: GuestAddress,
    src: &File,
    src_offset: u64,
    len: usize,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK.min(len)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        src.read_exact_at(&mut buf[..n], src_offset + done as u64)?;
        mem.write_slice(&buf[..n], GuestAddress(addr.0 + done as u64))
            .map_err(std::io::Error::other)?;
        done += n;
    }
    Ok(())
}

/// Total RAM in bytes.
pub fn ram_size(mem: &GuestMem) -> GuestUsize {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

/// Data extents `(offset, length)` of `len` bytes of `file` from `start` (SEEK_DATA/SEEK_HOLE),
/// relative to `start`; the whole range when the file cannot say.
pub fn data_extents(file: &File, start: u64, len: u64) -> Vec<(u64, u64)> {
    let end = start + len;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let data = match lseek(file, at as i64, Whence::SeekData) {
            Ok(data) => data as u64,
            Err(Errno::ENXIO) => break, // no data after `at`
            Err(_) => return vec![(0, len)],
        };
        if data >= end {
            break;
        }
        let hole = lseek(file, data as i64, Whence::SeekHole).map_or(end, |h| (h as u64).min(end));
        out.push((data - start, hole - data));
        at = hole;
    }
    out
}

/// Pagemap bits (Documentation/admin-guide/mm/pagemap.rst): present, swapped, file-backed.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// Bytes per /proc/self/pagemap entry.
const PM_ENTRY: usize = 8;

/// Extents of a privately mapped snapshot region that may hold data: the file's data extents,
/// and every page the guest wrote since the restore (an anonymous copy, present or swapped,
/// as /proc/self/pagemap tells). Everything else reads as the file's holes: zero.
pub fn private_extents(file: &File, start: u64, host_addr: u64, len: u64) -> Vec<(u64, u64)> {
    let pages = (len / PAGE_SIZE as u64) as usize;
    let mut maybe = vec![false; pages];
    for (off, n) in data_extents(file, start, len) {
        let first = (off / PAGE_SIZE as u64) as usize;
        let last = (off + n).div_ceil(PAGE_SIZE as u64) as usize;
        maybe[first..last.min(pages)].fill(true);
    }
    let mut entries = vec![0u8; pages * PM_ENTRY];
    let read = File::open("/proc/self/pagemap").and_then(|pm| {
        use std::os::unix::fs::FileExt;
        pm.read_exact_at(&mut entries, host_addr / PAGE_SIZE as u64 * PM_ENTRY as u64)
    });
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read /proc/self/pagemap; scanning all guest memory");
        return vec![(0, len)];
    }
    for (i, e) in entries.chunks_exact(PM_ENTRY).enumerate() {
        let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        if e & PM_SWAPPED != 0 || (e & PM_PRESENT != 0 && e & PM_FILE == 0) {
            maybe[i] = true;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, _) in maybe.iter().enumerate().filter(|(_, m)| **m) {
        let at = (i * PAGE_SIZE) as u64;
        match out.last_mut() {
            Some((o, n)) if *o + *n == at => *n += PAGE_SIZE as u64,
            _ => out.push((at, PAGE_SIZE as u64)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn vmm_writes_are_marked_dirty() {
        let (mem, _fd) = create_guest_memory(4).unwrap();
        let region = mem.find_region(GuestAddress(0x5000)).unwrap();
        assert!(!region.bitmap().is_addr_set(0x5000));
        mem.write_slice(&[1, 2, 3], GuestAddress(0x5ffe)).unwrap();
        assert!(region.bitmap().is_addr_set(0x5000));
        assert!(region.bitmap().is_addr_set(0x6000));
        assert!(!region.bitmap().is_addr_set(0x7000));
    }

    #[test]
    fn memory_above_the_hole_starts_at_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_HOLE_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
    }

    #[test]
    fn guest_memory_in_a_file_holds_its_bytes_and_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
        let (mem, file) = open_guest_memory_file(16, &path, false).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 16 << 20, "extended");
        let mut buf = [0u8; 8];
        mem.read_slice(&mut buf, GuestAddress(4096)).unwrap();
        assert_eq!(buf, [0x5a; 8], "the file's bytes");
        mem.read_slice(&mut buf, GuestAddress(2 << 20)).unwrap();
        assert_eq!(buf, [0; 8], "zero beyond the file's old end");
        mem.write_slice(&[7u8; 8], GuestAddress(0)).unwrap();
        let mut head = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut head, 0).unwrap();
        assert_eq!(head, [7; 8], "the guest's writes go to the file");
        // A second VMM on the same file is refused while this one maps it.
        match open_guest_memory_file(16, &path, true) {
            Err(MemoryError::FileInUse(p)) => assert_eq!(p, path),
            other => panic!("{:?}", other.map(drop)),
        }
        drop((mem, file));
        // Emptied, as for an incoming guest: all zero.
        let (mem, _file) = open_guest_memory_file(16, &path, true).unwrap();
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(buf, [0; 8]);
    }

    #[test]
    fn data_extents_skip_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1; PAGE_SIZE], 256 << 10).unwrap();
        let ext = data_extents(&f, 0, 1 << 20);
        assert!(ext
            .iter()
            .any(|&(o, n)| o <= 256 << 10 && o + n >= (256 << 10) + 4096));
        assert!(
            ext.iter().map(|&(_, n)| n).sum::<u64>() < 1 << 20,
            "{ext:?}"
        );
        assert!(data_extents(&f, 512 << 10, 512 << 10).is_empty());
    }
}
