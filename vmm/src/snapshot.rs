//! Snapshots: a paused VM's state and memory in one file, restored by `vmm run --restore`.
//!
//! ```text
//! offset 0     header, 4 KiB: "VMHOPSNP" | u32 version | u32 0 | u64 memory MiB |
//!              u64 state offset | u64 state length | u64 memory offset | u64 memory length |
//!              u32 CRC-32 of the bytes before it
//! offset 4096  the state envelope (crate::persist)
//! memory offset (page aligned)  guest RAM, regions back to back; zero pages are holes
//! ```
//! Restoring maps the memory image privately (copy on write), so pages are read from the file
//! only when the guest touches them, and the file is never written. The file must stay as it
//! is while a VM restored from it runs (deleting or replacing it is fine: the mapping keeps
//! the old inode; writing into it is not). The file is written under
//! a temporary name, fsynced and renamed, so a crash never leaves a partial snapshot behind
//! under the final name.

use crate::memory::{self, GuestMem, PAGE_SIZE};
use crate::persist::{self, PersistError, VmState};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MAGIC: &[u8; 8] = b"VMHOPSNP";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
/// Bytes of the header's fields (the CRC-32 follows them).
const HEADER_FIELDS: usize = 56;
/// The largest state envelope a snapshot may hold.
const MAX_STATE: u64 = 64 << 20;
const CHUNK: usize = 256 * PAGE_SIZE;

/// Errors writing or reading a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// File I/O.
    #[error("{0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// Not a snapshot.
    #[error("{0} is not a vmhop snapshot: magic {1:02x?}")]
    Magic(PathBuf, Vec<u8>),
    /// A snapshot of another version.
    #[error("{0} is not a vmhop snapshot: version {1}; this VMM reads version {VERSION}")]
    Version(PathBuf, u32),
    /// A damaged header.
    #[error("{0} is not a vmhop snapshot: header checksum mismatch")]
    HeaderChecksum(PathBuf),
    /// The memory image does not fit the file.
    #[error(
        "{path} is not a vmhop snapshot: memory at {offset} ({len} bytes) does not fit a \
         {size}-byte file"
    )]
    Layout {
        /// The file.
        path: PathBuf,
        /// Where the header says the memory starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's size.
        size: u64,
    },
    /// A state larger than any VM's.
    #[error("{0} is not a vmhop snapshot: state of {1} bytes")]
    StateSize(PathBuf, u64),
    /// A snapshot of another VM shape.
    #[error("{0} holds {1} MiB of memory; this VM has {2} MiB")]
    Memory(PathBuf, u64, u64),
    /// The state inside.
    #[error("{0}")]
    State(PathBuf, #[source] PersistError),
    /// Guest memory.
    #[error("guest memory")]
    Guest(#[source] memory::MemoryError),
    /// Reading guest memory.
    #[error("read guest memory")]
    ReadGuest(#[source] vm_memory::GuestMemoryError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |e| SnapshotError::Io(what, path.to_path_buf(), e)
}

/// Writes `st` and the memory of a paused VM to `path`.
pub fn write(path: &Path, st: &VmState, mem: &GuestMem) -> Result<(), SnapshotError> {
    let t = std::time::Instant::now();
    let envelope = persist::encode(st).map_err(|e| SnapshotError::State(path.to_path_buf(), e))?;
    let mem_offset = (HEADER + envelope.len() as u64).next_multiple_of(2 << 20);
    let mem_len = memory::ram_size(mem);
    let mut h = Vec::with_capacity(HEADER as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    for v in [
        st.shape.memory_mib,
        HEADER,
        envelope.len() as u64,
        mem_offset,
        mem_len,
    ] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert_eq!(h.len(), HEADER_FIELDS);
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.resize(HEADER as usize, 0);

    let tmp = path.with_extension("partial");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(&h).map_err(io("write", &tmp))?;
    f.write_all(&envelope).map_err(io("write", &tmp))?;
    f.set_len(mem_offset + mem_len).map_err(io("size", &tmp))?;
    let mut buf = vec![0u8; CHUNK];
    let mut file_at = mem_offset;
    let mut data_pages = 0u64;
    for region in mem.iter() {
        let mut at = 0u64;
        while at < region.len() {
            let n = ((region.len() - at) as usize).min(CHUNK);
            mem.read_slice(&mut buf[..n], GuestAddress(region.start_addr().0 + at))
                .map_err(SnapshotError::ReadGuest)?;
            for (i, page) in buf[..n].chunks(PAGE_SIZE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    f.write_all_at(page, file_at + at + (i * PAGE_SIZE) as u64)
                        .map_err(io("write", &tmp))?;
                    data_pages += 1;
                }
            }
            at += n as u64;
        }
        file_at += region.len();
    }
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename to", path))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", dir))?;
    }
    tracing::info!(
        path = %path.display(),
        data_mib = (data_pages * PAGE_SIZE as u64) >> 20,
        ms = t.elapsed().as_millis() as u64,
        "snapshot written"
    );
    Ok(())
}

/// Guest memory restored from a snapshot.
pub struct Restored {
    /// The memory.
    pub mem: Arc<GuestMem>,
    /// Its memfd when it was copied into one (`shared`), `None` when it maps the file.
    pub memfd: Option<Arc<File>>,
    /// The saved state.
    pub state: VmState,
}

/// Opens a snapshot for a VM of `memory_mib`: the state, and the memory mapped lazily from
/// the file, or, when it must be `shared` with another process (a vhost-user backend maps
/// guest memory), copied into a fresh memfd (the file's data extents only).
pub fn open(path: &Path, memory_mib: u64, shared: bool) -> Result<Restored, SnapshotError> {
    let mut f = File::open(path).map_err(io("open", path))?;
    let mut h = vec![0u8; HEADER as usize];
    f.read_exact(&mut h).map_err(io("read", path))?;
    if &h[..8] != MAGIC {
        return Err(SnapshotError::Magic(path.to_path_buf(), h[..8].to_vec()));
    }
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(SnapshotError::Version(path.to_path_buf(), version));
    }
    let crc = u32::from_le_bytes(h[56..60].try_into().expect("4 bytes"));
    if crc32fast::hash(&h[..HEADER_FIELDS]) != crc {
        return Err(SnapshotError::HeaderChecksum(path.to_path_buf()));
    }
    let (mib, state_off, state_len, mem_off, mem_len) =
        (u64_at(16), u64_at(24), u64_at(32), u64_at(40), u64_at(48));
    if mib != memory_mib {
        return Err(SnapshotError::Memory(path.to_path_buf(), mib, memory_mib));
    }
    let size = f.metadata().map_err(io("stat", path))?.len();
    if mem_len != mib << 20 || mem_off % PAGE_SIZE as u64 != 0 || mem_off + mem_len > size {
        return Err(SnapshotError::Layout {
            path: path.to_path_buf(),
            offset: mem_off,
            len: mem_len,
            size,
        });
    }
    if state_len > MAX_STATE {
        return Err(SnapshotError::StateSize(path.to_path_buf(), state_len));
    }
    let mut envelope = vec![0u8; state_len as usize];
    f.read_exact_at(&mut envelope, state_off)
        .map_err(io("read", path))?;
    let state =
        persist::decode(&envelope).map_err(|e| SnapshotError::State(path.to_path_buf(), e))?;
    if !shared {
        let mem = memory::map_guest_memory_from_file(mib, &Arc::new(f), mem_off)
            .map_err(SnapshotError::Guest)?;
        return Ok(Restored {
            mem,
            memfd: None,
            state,
        });
    }
    let (mem, memfd) = memory::create_guest_memory(mib).map_err(SnapshotError::Guest)?;
    let mut buf = vec![0u8; CHUNK];
    for (off, len) in memory::data_extents(&f, mem_off, mem_len) {
        let mut at = 0;
        while at < len {
            let n = ((len - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], mem_off + off + at)
                .map_err(io("read", path))?;
            memfd
                .write_all_at(&buf[..n], off + at)
                .map_err(io("copy guest memory from", path))?;
            at += n as u64;
        }
    }
    Ok(Restored {
        mem,
        memfd: Some(memfd),
        state,
    })
}
