//! Linux boot: load the kernel (ELF vmlinux) and initramfs, write the command line, the memory
//! map and the MP table, and describe how the boot vCPU must be started. The kernel is loaded
//! on its own ([`load_kernel`]) so that it can be copied while the VM is being built.
//!
//! Low guest memory layout (all below 1 MiB, none of it overlapping the kernel, which linux-loader
//! (`elf.rs`) places at its ELF physical addresses, at or above [`HIMEM_START`]):
//!
//! | address   | what                                                  |
//! |-----------|-------------------------------------------------------|
//! | 0x0500    | GDT for the boot vCPU (PVH: flat 32-bit; 64-bit: long mode) |
//! | 0x0520    | empty IDT                                             |
//! | 0x6000    | PVH `hvm_start_info`, then its module list at 0x6040   |
//! | 0x7000    | PVH memory map, or the 64-bit protocol's `boot_params` |
//! | 0x9000    | 64-bit protocol: identity page tables (PML4, PDPT, PD)  |
//! | 0x20000   | kernel command line                                   |
//! | 0x9fc00   | MP floating pointer + MP configuration table (EBDA)   |
//!
//! The MP table is written for every vCPU count: without ACPI it is how the guest finds its
//! CPUs and the I/O APIC at all, and a guest that sees no I/O APIC routes the virtio
//! interrupts through the legacy PIC only.

pub mod elf;
pub mod linux64;
pub mod mptable;
pub mod pvh;

use crate::memory::{ram_ranges, GuestMem, MMIO_HOLE_START};
use linux_loader::cmdline::Cmdline;
use std::fs::File;
use std::path::Path;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_api::config::BootProtocol;

/// Start of high memory: the kernel is loaded at or above this.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the EBDA, where the MP table goes; RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9_fc00;
/// Guest address of the boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Guest address of the boot IDT.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// Guest address of the command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line x86 Linux accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;

/// Errors while preparing the guest for boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The kernel file could not be read.
    #[error("load kernel {0}")]
    ReadKernel(String, #[source] std::io::Error),
    /// The kernel is not an ELF file this VMM can load.
    #[error("load kernel {0}: {1} (an uncompressed ELF vmlinux is expected)")]
    BadKernel(String, &'static str),
    /// A kernel segment could not be copied into guest memory.
    #[error("load kernel segment of {len} bytes at {paddr:#x}")]
    KernelSegment {
        /// Guest physical address of the segment.
        paddr: u64,
        /// Its size in the file.
        len: u64,
        /// Why: the file ends early (unexpected end of file), the segment lies outside guest
        /// RAM (invalid input), or the copy failed.
        #[source]
        source: std::io::Error,
    },
    /// PVH was asked for but the kernel has no PVH note.
    #[error("the kernel has no PVH entry note (build it with CONFIG_PVH) ")]
    NoPvhEntry,
    /// The initramfs could not be read or does not fit.
    #[error("initramfs {0}")]
    Initramfs(String, #[source] std::io::Error),
    /// The initramfs does not fit in low memory beside the kernel.
    #[error("initramfs of {0} bytes does not fit in guest memory")]
    InitramfsTooBig(u64),
    /// The command line is too long or malformed.
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("write the command line")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// Writing boot structures into guest memory failed.
    #[error("write {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// linux-loader could not write the boot parameters.
    #[error("write boot parameters")]
    Configurator(#[source] linux_loader::configurator::Error),
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode at `entry`, EBX = address of `hvm_start_info`.
    Pvh {
        /// PVH entry point from the ELF note.
        entry: GuestAddress,
        /// Address of `hvm_start_info`.
        start_info: GuestAddress,
    },
    /// 64-bit long mode at `entry`, RSI = address of `boot_params`.
    Linux64 {
        /// The ELF entry (startup_64).
        entry: GuestAddress,
        /// Address of `boot_params` (the zero page).
        boot_params: GuestAddress,
    },
}

/// A region of the guest physical memory map handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type: 1 RAM, 2 reserved.
    pub kind: u32,
}

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The memory map the kernel gets: low RAM up to the EBDA, the EBDA and BIOS area reserved,
/// then RAM from 1 MiB (and above 4 GiB if there is that much).
pub fn memory_map(mem: &GuestMem) -> Vec<MapEntry> {
    let total: u64 = crate::memory::ram_size(mem);
    let mut map = vec![
        MapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (addr, size) in ram_ranges(total) {
        let start = addr.0.max(HIMEM_START);
        let end = addr.0 + size;
        if end > start {
            map.push(MapEntry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// The kernel and its surroundings, loaded.
#[derive(Debug)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts.
    pub entry: EntryPoint,
    /// The final command line, with the devices appended.
    pub cmdline: String,
}

/// Loads the kernel at `path` into guest memory (the first step of a boot; the rest is
/// [`load`]).
pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<elf::Kernel, BootError> {
    elf::load(mem, path)
}

/// Loads everything else the `kernel` needs into guest memory. `devices` are the virtio-mmio
/// windows `(base, size, irq)` to announce on the command line.
pub fn load(
    mem: &GuestMem,
    kernel: elf::Kernel,
    initramfs: Option<&Path>,
    base_cmdline: &str,
    devices: &[(u64, u64, u32)],
    vcpus: u8,
    protocol: BootProtocol,
) -> Result<LoadedKernel, BootError> {
    let mut cmdline = Cmdline::try_from(base_cmdline, CMDLINE_MAX).map_err(BootError::Cmdline)?;
    for &(base, size, irq) in devices {
        cmdline
            .add_virtio_mmio_device(size, GuestAddress(base), irq, None)
            .map_err(BootError::Cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(BootError::LoadCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();

    let initrd = match initramfs {
        Some(path) => Some(load_initramfs(mem, path, kernel.end)?),
        None => None,
    };
    mptable::write(mem, vcpus)?;

    let map = memory_map(mem);
    let entry = match (protocol, kernel.pvh_entry) {
        (BootProtocol::Pvh | BootProtocol::Auto, Some(entry)) => {
            pvh::write_start_info(mem, &map, initrd, entry)?
        }
        (BootProtocol::Pvh, None) => return Err(BootError::NoPvhEntry),
        (BootProtocol::Linux64 | BootProtocol::Auto, _) => {
            linux64::write_boot_params(mem, &map, initrd, cmdline_len, kernel.entry)?
        }
    };
    Ok(LoadedKernel {
        entry,
        cmdline: cmdline
            .as_cstring()
            .map_err(BootError::Cmdline)?
            .to_string_lossy()
            .into(),
    })
}

/// Places the initramfs at the top of low RAM (below the MMIO hole), page aligned, above the
/// kernel. Returns `(address, size)`.
fn load_initramfs(
    mem: &GuestMem,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let err = |e| BootError::Initramfs(path.display().to_string(), e);
    let mut f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let low_end = mem.last_addr().0.min(MMIO_HOLE_START - 1) + 1;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitramfsTooBig(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::Write("initramfs", e))?;
    Ok((GuestAddress(addr), size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn memory_map_reserves_the_ebda_and_bios_area() {
        let (mem, _) = create_guest_memory(64).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map[0].size, EBDA_START);
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 64 << 20);
    }
}
