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

/// A snapshot's header: where its parts lie in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Guest memory of the saved VM.
    pub memory_mib: u64,
    /// Where the state envelope starts.
    pub state_off: u64,
    /// Its length.
    pub state_len: u64,
    /// Where the memory image starts (page aligned).
    pub mem_off: u64,
    /// Its length (`memory_mib` MiB).
    pub mem_len: u64,
}

impl Header {
    /// The header's bytes (a whole 4 KiB block).
    pub fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER as usize);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            self.memory_mib,
            self.state_off,
            self.state_len,
            self.mem_off,
            self.mem_len,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        debug_assert_eq!(h.len(), HEADER_FIELDS);
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h.resize(HEADER as usize, 0);
        h
    }

    /// Reads the header at the start of `bytes` and checks that its parts fit the `size`
    /// bytes of the file at `path`. Every field comes from the file, so no sum of them is
    /// trusted to fit.
    pub fn decode(bytes: &[u8], size: u64, path: &Path) -> Result<Header, SnapshotError> {
        let p = || path.to_path_buf();
        let Some(h) = bytes.get(..HEADER_FIELDS + 4) else {
            return Err(SnapshotError::Magic(
                p(),
                bytes.iter().take(8).copied().collect(),
            ));
        };
        if &h[..8] != MAGIC {
            return Err(SnapshotError::Magic(p(), h[..8].to_vec()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(SnapshotError::Version(p(), version));
        }
        let crc = u32::from_le_bytes(h[56..60].try_into().expect("4 bytes"));
        if crc32fast::hash(&h[..HEADER_FIELDS]) != crc {
            return Err(SnapshotError::HeaderChecksum(p()));
        }
        let hd = Header {
            memory_mib: u64_at(16),
            state_off: u64_at(24),
            state_len: u64_at(32),
            mem_off: u64_at(40),
            mem_len: u64_at(48),
        };
        let fits = |off: u64, len: u64| off.checked_add(len).is_some_and(|end| end <= size);
        if hd.memory_mib.checked_mul(1 << 20) != Some(hd.mem_len)
            || !hd.mem_off.is_multiple_of(PAGE_SIZE as u64)
            || !fits(hd.mem_off, hd.mem_len)
        {
            return Err(SnapshotError::Layout {
                path: p(),
                offset: hd.mem_off,
                len: hd.mem_len,
                size,
            });
        }
        if hd.state_len > MAX_STATE {
            return Err(SnapshotError::StateSize(p(), hd.state_len));
        }
        if !fits(hd.state_off, hd.state_len) {
            return Err(SnapshotError::Layout {
                path: p(),
                offset: hd.state_off,
                len: hd.state_len,
                size,
            });
        }
        Ok(hd)
    }
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
    let h = Header {
        memory_mib: st.shape.memory_mib,
        state_off: HEADER,
        state_len: envelope.len() as u64,
        mem_off: mem_offset,
        mem_len,
    }
    .encode();

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
    let size = f.metadata().map_err(io("stat", path))?.len();
    let Header {
        memory_mib: mib,
        state_off,
        state_len,
        mem_off,
        mem_len,
    } = Header::decode(&h, size, path)?;
    if mib != memory_mib {
        return Err(SnapshotError::Memory(path.to_path_buf(), mib, memory_mib));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(mem_off: u64, mem_len: u64, state_off: u64, state_len: u64) -> Vec<u8> {
        Header {
            memory_mib: mem_len >> 20,
            state_off,
            state_len,
            mem_off,
            mem_len,
        }
        .encode()
    }

    #[test]
    fn a_header_whose_parts_do_not_fit_the_file_is_refused() {
        let p = Path::new("s");
        let size = (2 << 20) + (128 << 20);
        let good = header(2 << 20, 128 << 20, HEADER, 1000);
        let h = Header::decode(&good, size, p).unwrap();
        assert_eq!(
            (h.mem_off, h.mem_len, h.memory_mib),
            (2 << 20, 128 << 20, 128)
        );
        // Offsets that wrap around when added to the lengths: they must not pass as fitting.
        let wraps = header(u64::MAX - 4095, 128 << 20, HEADER, 1000);
        assert!(matches!(
            Header::decode(&wraps, size, p),
            Err(SnapshotError::Layout { .. })
        ));
        let state_wraps = header(2 << 20, 128 << 20, u64::MAX - 10, 1000);
        assert!(matches!(
            Header::decode(&state_wraps, size, p),
            Err(SnapshotError::Layout { .. })
        ));
        // Memory larger than the file, a memory size that is not the shape's, a short file.
        assert!(Header::decode(&good, size - 1, p).is_err());
        let mut odd = Header::decode(&good, size, p).unwrap();
        odd.memory_mib = u64::MAX;
        assert!(Header::decode(&odd.encode(), size, p).is_err());
        assert!(matches!(
            Header::decode(&good[..20], size, p),
            Err(SnapshotError::Magic(..))
        ));
        let mut bad = good.clone();
        bad[30] ^= 1;
        assert!(matches!(
            Header::decode(&bad, size, p),
            Err(SnapshotError::HeaderChecksum(_))
        ));
    }
}
