//! Loading an uncompressed ELF `vmlinux` into guest memory: each `PT_LOAD` segment's file
//! bytes go to its physical address (`p_paddr`), copied by the kernel from the file straight
//! into the guest memory file ([`crate::memory::fill_from_file`]), and a `PT_NOTE` segment may
//! carry the PVH entry point (a Xen note of type `XEN_ELFNOTE_PHYS32_ENTRY`).
//!
//! The headers are read with a few positioned reads (the ELF header, the program header
//! table, each note segment whole); the checks are those linux-loader made when it loaded the
//! kernel: magic, little endian, program header size and offset, entry at or above high
//! memory.

use super::{BootError, HIMEM_START};
use crate::memory::{fill_from_file, GuestMem};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::GuestAddress;

/// `e_ident` magic.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// `e_ident[EI_CLASS]`: 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]`: little endian.
const ELFDATA2LSB: u8 = 1;
/// Size of the ELF64 header.
const EHDR_SIZE: usize = 64;
/// Size of one ELF64 program header.
const PHDR_SIZE: usize = 56;
/// Program header type: a loadable segment.
const PT_LOAD: u32 = 1;
/// Program header type: notes.
const PT_NOTE: u32 = 4;
/// Size of a note header (`n_namesz`, `n_descsz`, `n_type`).
const NHDR_SIZE: usize = 12;
/// Note names and descriptors are padded to this.
const NOTE_ALIGN: usize = 4;
/// The note type that holds the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The name of the Xen notes.
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// Largest note segment read (a vmlinux has a few hundred bytes of notes).
const NOTES_MAX: u64 = 1 << 20;

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// The ELF entry (`e_entry`): where the 64-bit boot protocol starts.
    pub entry: GuestAddress,
    /// The PVH entry point, when the kernel has one.
    pub pvh_entry: Option<GuestAddress>,
    /// End of the highest segment in memory (`p_paddr + p_memsz`).
    pub end: u64,
}

/// One program header, the fields the loader uses.
struct Segment {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Opens the kernel at `path` and loads it into `mem`.
pub fn load(mem: &GuestMem, path: &Path) -> Result<Kernel, BootError> {
    let name = || path.display().to_string();
    let file = File::open(path).map_err(|e| BootError::OpenKernel(name(), e))?;
    let bad = |why| BootError::BadKernel(name(), why);
    let read = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => bad("the file ends inside its headers"),
            _ => BootError::ReadKernel(name(), e),
        })
    };
    let mut ehdr = [0u8; EHDR_SIZE];
    read(&mut ehdr, 0)?;
    if ehdr[..4] != ELF_MAGIC || ehdr[4] != ELFCLASS64 {
        return Err(bad("not a 64-bit ELF file"));
    }
    if ehdr[5] != ELFDATA2LSB {
        return Err(bad("big-endian ELF"));
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = usize::from(u16_at(&ehdr, 54));
    let phnum = usize::from(u16_at(&ehdr, 56));
    if phentsize != PHDR_SIZE {
        return Err(bad("program header size is not 56"));
    }
    if phoff < EHDR_SIZE as u64 {
        return Err(bad("program headers overlap the ELF header"));
    }
    if entry < HIMEM_START {
        return Err(bad("entry point below 1 MiB"));
    }
    let mut table = vec![0u8; phnum * PHDR_SIZE];
    read(&mut table, phoff)?;
    let segments = table.chunks_exact(PHDR_SIZE).map(|p| Segment {
        kind: u32_at(p, 0),
        offset: u64_at(p, 8),
        paddr: u64_at(p, 24),
        filesz: u64_at(p, 32),
        memsz: u64_at(p, 40),
    });

    let mut kernel = Kernel {
        entry: GuestAddress(entry),
        pvh_entry: None,
        end: 0,
    };
    for seg in segments {
        match seg.kind {
            PT_LOAD if seg.filesz > 0 => {
                let len = usize::try_from(seg.filesz).map_err(|_| bad("segment too large"))?;
                fill_from_file(mem, GuestAddress(seg.paddr), &file, seg.offset, len).map_err(
                    |e| BootError::KernelSegment {
                        paddr: seg.paddr,
                        len: seg.filesz,
                        source: e,
                    },
                )?;
                let end = seg
                    .paddr
                    .checked_add(seg.memsz)
                    .ok_or_else(|| bad("segment end overflows"))?;
                kernel.end = kernel.end.max(end);
            }
            PT_NOTE if kernel.pvh_entry.is_none() => {
                if seg.filesz > NOTES_MAX {
                    return Err(bad("note segment too large"));
                }
                let mut notes = vec![0u8; seg.filesz as usize];
                read(&mut notes, seg.offset)?;
                kernel.pvh_entry = pvh_entry(&notes).map(|a| GuestAddress(u64::from(a)));
            }
            _ => {}
        }
    }
    Ok(kernel)
}

/// The PVH entry point among `notes` (a note segment's bytes), if there is one.
fn pvh_entry(notes: &[u8]) -> Option<u32> {
    let pad = |n: usize| n.div_ceil(NOTE_ALIGN) * NOTE_ALIGN;
    let mut at = 0;
    while at + NHDR_SIZE <= notes.len() {
        let namesz = u32_at(notes, at) as usize;
        let descsz = u32_at(notes, at + 4) as usize;
        let kind = u32_at(notes, at + 8);
        let name_at = at + NHDR_SIZE;
        let desc_at = name_at.checked_add(pad(namesz))?;
        let next = desc_at.checked_add(pad(descsz))?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY
            && notes.get(name_at..name_at + namesz) == Some(XEN_NOTE_NAME)
            && descsz >= 4
        {
            return notes.get(desc_at..desc_at + 4).map(|d| u32_at(d, 0));
        }
        at = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const PADDR: u64 = 0x100_0000;
    const PVH: u32 = 0x100_0600;

    /// A minimal vmlinux: one PT_LOAD segment of `code` at 16 MiB (memsz one page more), and a
    /// note segment with a foreign note then the PVH entry.
    fn vmlinux(code: &[u8]) -> Vec<u8> {
        let mut notes = Vec::new();
        for (name, kind, desc) in [(&b"GNU\0"[..], 3u32, 0u32), (XEN_NOTE_NAME, 18, PVH)] {
            notes.extend((name.len() as u32).to_le_bytes());
            notes.extend(4u32.to_le_bytes());
            notes.extend(kind.to_le_bytes());
            notes.extend(name);
            notes.extend(desc.to_le_bytes());
        }
        let phoff = EHDR_SIZE as u64;
        let notes_at = phoff + 2 * PHDR_SIZE as u64;
        let code_at = 0x1000u64;
        let mut f = vec![0u8; EHDR_SIZE];
        f[..4].copy_from_slice(&ELF_MAGIC);
        f[4] = ELFCLASS64;
        f[5] = ELFDATA2LSB;
        f[24..32].copy_from_slice(&PADDR.to_le_bytes());
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        for (kind, off, paddr, filesz, memsz) in [
            (
                PT_LOAD,
                code_at,
                PADDR,
                code.len() as u64,
                code.len() as u64 + 4096,
            ),
            (PT_NOTE, notes_at, 0, notes.len() as u64, 0),
        ] {
            let mut p = [0u8; PHDR_SIZE];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
            f.extend(p);
        }
        f.extend(&notes);
        f.resize(code_at as usize, 0);
        f.extend(code);
        f
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn segments_land_at_their_physical_address_marked_dirty() {
        let code: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
        let f = file_with(&vmlinux(&code));
        let (mem, _fd) = create_guest_memory(32).unwrap();
        let k = load(&mem, f.path()).unwrap();
        assert_eq!(k.entry, GuestAddress(PADDR));
        assert_eq!(k.pvh_entry, Some(GuestAddress(u64::from(PVH))));
        assert_eq!(k.end, PADDR + code.len() as u64 + 4096);
        let mut back = vec![0u8; code.len()];
        mem.read_slice(&mut back, GuestAddress(PADDR)).unwrap();
        assert_eq!(back, code);
        let region = mem.find_region(GuestAddress(PADDR)).unwrap();
        assert!(region.bitmap().is_addr_set(PADDR as usize));
        assert!(region.bitmap().is_addr_set(PADDR as usize + 3 * 4096));
        assert!(!region.bitmap().is_addr_set(PADDR as usize + 4 * 4096));
    }

    #[test]
    fn private_memory_is_filled_through_the_mapping() {
        let code = vec![0xa5u8; 8192];
        let f = file_with(&vmlinux(&code));
        let (mem, fd) = create_guest_memory(32).unwrap();
        let private = crate::memory::map_guest_memory_from_file(32, &fd, 0).unwrap();
        load(&private, f.path()).unwrap();
        let mut back = vec![0u8; code.len()];
        private.read_slice(&mut back, GuestAddress(PADDR)).unwrap();
        assert_eq!(back, code);
        mem.read_slice(&mut back, GuestAddress(PADDR)).unwrap();
        assert_eq!(
            back,
            vec![0; 8192],
            "the file under a private mapping is untouched"
        );
    }

    #[test]
    fn a_short_kernel_is_a_clear_error() {
        let mut image = vmlinux(&[0x90; 8192]);
        image.truncate(image.len() - 100);
        let f = file_with(&image);
        let (mem, _fd) = create_guest_memory(32).unwrap();
        let e = load(&mem, f.path()).unwrap_err();
        assert!(
            matches!(&e, BootError::KernelSegment { source, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof),
            "{e:?}"
        );
        assert_eq!(
            vmhop_common::error::chain(&e),
            "load kernel segment of 8192 bytes at 0x1000000: unexpected end of file"
        );
    }

    #[test]
    fn a_segment_outside_guest_memory_is_refused() {
        let f = file_with(&vmlinux(&[0x90; 8192]));
        let (mem, _fd) = create_guest_memory(8).unwrap();
        let e = load(&mem, f.path()).unwrap_err();
        assert!(
            matches!(&e, BootError::KernelSegment { source, .. }
                if source.kind() == std::io::ErrorKind::InvalidInput),
            "{e:?}"
        );
    }

    #[test]
    fn missing_and_non_elf_kernels_are_clear_errors() {
        let (mem, _fd) = create_guest_memory(8).unwrap();
        let e = load(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(e, BootError::OpenKernel(..)), "{e:?}");
        let f = file_with(b"not a kernel");
        let e = load(&mem, f.path()).unwrap_err();
        assert!(matches!(e, BootError::BadKernel(_, _)), "{e:?}");
        assert!(e.to_string().contains("ends inside its headers"), "{e}");
        let f = file_with(&[0u8; 4096]);
        let e = load(&mem, f.path()).unwrap_err();
        assert!(
            matches!(e, BootError::BadKernel(_, "not a 64-bit ELF file")),
            "{e:?}"
        );
    }

    #[test]
    fn notes_without_a_pvh_entry_give_none() {
        let mut n = Vec::new();
        n.extend(4u32.to_le_bytes());
        n.extend(4u32.to_le_bytes());
        n.extend(17u32.to_le_bytes());
        n.extend(XEN_NOTE_NAME);
        n.extend(1u32.to_le_bytes());
        assert_eq!(pvh_entry(&n), None);
        assert_eq!(pvh_entry(&n[..7]), None, "truncated");
    }
}
