//! The PVH boot protocol: `hvm_start_info` with the memory map and the initramfs as module 0.
//! The vCPU starts in flat 32-bit protected mode with paging off (see `vcpu::regs`).

use super::{BootError, EntryPoint, MapEntry, CMDLINE_ADDR};
use crate::memory::GuestMem;
use linux_loader::configurator::{pvh::PvhBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

/// `hvm_start_info.magic` ("xEn3" with the high bit of the last byte set).
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Where `hvm_start_info` goes.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Where the module list goes.
pub const MODLIST_ADDR: u64 = 0x6040;
/// Where the memory map goes.
pub const MEMMAP_ADDR: u64 = 0x7000;

/// Writes the start info, module list and memory map.
pub fn write_start_info(
    mem: &GuestMem,
    map: &[MapEntry],
    initrd: Option<(GuestAddress, u64)>,
    entry: GuestAddress,
) -> Result<EntryPoint, BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = MODLIST_ADDR;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMem>(&params, mem)
        .map_err(BootError::Configurator)?;
    Ok(EntryPoint::Pvh {
        entry,
        start_info: GuestAddress(START_INFO_ADDR),
    })
}
