//! The Intel MultiProcessor Specification 1.4 table: the guest's only description of its CPUs,
//! the I/O APIC and the interrupt routing when there is no ACPI.
//!
//! Layout at [`super::EBDA_START`]: the 16-byte floating pointer structure, then the
//! configuration table header and its entries: one processor entry per vCPU (APIC id = vCPU
//! index, matching CPUID), one ISA bus, one I/O APIC (id = vCPU count), an interrupt entry per
//! I/O APIC pin, and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1). ISA IRQ 0
//! is routed to pin 2, as KVM's default GSI routing does for the in-kernel PIT.

use super::{BootError, EBDA_START};
use crate::memory::{GuestMem, IOAPIC_ADDR, LAPIC_ADDR};
use vm_memory::{Bytes, GuestAddress};

/// Floating pointer signature.
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
/// Configuration table signature.
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
/// Specification revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Local APIC version reported for each CPU (an integrated xAPIC).
const LAPIC_VERSION: u8 = 0x14;
/// I/O APIC version.
const IOAPIC_VERSION: u8 = 0x11;
/// Pins of KVM's in-kernel I/O APIC.
pub const IOAPIC_PINS: u8 = 24;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags: conforming polarity and trigger mode (ISA defaults: edge, active high).
const INT_FLAGS_CONFORMING: u16 = 0;
/// Destination "all local APICs" for local interrupt entries.
const ALL_LAPICS: u8 = 0xff;
/// CPU signature/feature fields of processor entries: family 6, FPU and APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Writes the MP table for `vcpus` CPUs.
pub fn write(mem: &GuestMem, vcpus: u8) -> Result<(), BootError> {
    let table = build(vcpus);
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(|e| BootError::Write("MP table", e))
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table bytes, floating pointer first.
pub fn build(vcpus: u8) -> Vec<u8> {
    const MPF_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = vcpus;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // ISA IRQ 2 is the PIC cascade and has no device; IRQ 0 arrives on pin 2.
        if irq == 2 {
            continue;
        }
        let pin = if irq == 0 { 2 } else { irq };
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[0, irq, ioapic_id, pin]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.push(ENTRY_LOCAL_INTERRUPT);
        entries.push(kind);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[0, 0, ALL_LAPICS, lint]);
        count += 1;
    }

    let table_addr = EBDA_START as u32 + MPF_LEN as u32;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MPC_SIGNATURE);
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(MP_SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"VMHOP   ");
    header.extend_from_slice(b"VMM         ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_LEN);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = a configuration table is present
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    mpf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_lengths_are_valid() {
        for vcpus in [1, 2, 32] {
            let t = build(vcpus);
            assert_eq!(&t[0..4], MPF_SIGNATURE);
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let table = &t[16..];
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert!(t.len() <= (super::super::HIMEM_START - EBDA_START) as usize);
            // Fits in the EBDA's 1 KiB.
            assert!(t.len() <= 1024, "{vcpus} vCPUs: {} bytes", t.len());
        }
    }
}
