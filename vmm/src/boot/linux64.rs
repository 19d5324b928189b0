//! The 64-bit Linux boot protocol: a `boot_params` zero page with an e820 map, the command
//! line and the initramfs, and identity-mapped page tables so the vCPU can start in long mode
//! at the ELF entry (startup_64).

use super::{BootError, EntryPoint, MapEntry, CMDLINE_ADDR};
use crate::memory::GuestMem;
use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress};

/// Where `boot_params` goes.
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// PML4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// The one PDPT.
pub const PDPTE_ADDR: u64 = 0xa000;
/// The one page directory: 512 x 2 MiB pages identity-map the first GiB.
pub const PDE_ADDR: u64 = 0xb000;

/// `setup_header.boot_flag`.
const BOOT_FLAG: u16 = 0xaa55;
/// `setup_header.header` ("HdrS").
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags`: the kernel was loaded high.
const LOADED_HIGH: u8 = 0x01;
/// `kernel_alignment` the kernel was built for (2 MiB), reported back.
const KERNEL_ALIGNMENT: u32 = 0x20_0000;

/// Page-table entry bits: present, writable, and (in the PD) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_LARGE: u64 = 0x80;

/// Writes `boot_params` and the boot page tables.
pub fn write_boot_params(
    mem: &GuestMem,
    map: &[MapEntry],
    initrd: Option<(GuestAddress, u64)>,
    cmdline_len: usize,
    entry: GuestAddress,
) -> Result<EntryPoint, BootError> {
    let mut params = boot_params::default();
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, e) in map.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &BootParams::new(&params, GuestAddress(BOOT_PARAMS_ADDR)),
        mem,
    )
    .map_err(BootError::Configurator)?;

    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| BootError::Write("page tables", e))
    };
    w(PDPTE_ADDR | PTE_PRESENT_RW, PML4_ADDR)?;
    w(PDE_ADDR | PTE_PRESENT_RW, PDPTE_ADDR)?;
    for i in 0..512u64 {
        w((i << 21) | PTE_PRESENT_RW | PDE_LARGE, PDE_ADDR + i * 8)?;
    }
    Ok(EntryPoint::Linux64 {
        entry,
        boot_params: GuestAddress(BOOT_PARAMS_ADDR),
    })
}
