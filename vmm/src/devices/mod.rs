//! Devices: the legacy ones on port I/O (8250 UART, i8042 for the reset line) and the
//! virtio-mmio block devices.

pub mod i8042;
pub mod serial;
pub mod virtio;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Errors from interrupt lines.
#[derive(Debug, Error)]
pub enum IrqError {
    /// Writing the eventfd failed.
    #[error("signal interrupt eventfd")]
    Signal(#[source] std::io::Error),
}

/// An interrupt line: an eventfd registered with KVM as an irqfd for one GSI, so raising it is
/// one write and no VM exit.
#[derive(Debug)]
pub struct IrqLine {
    /// The registered eventfd.
    pub evt: EventFd,
    /// The GSI (I/O APIC pin) it raises.
    pub gsi: u32,
}

impl IrqLine {
    /// Raises the interrupt (an edge on the GSI).
    pub fn raise(&self) -> Result<(), IrqError> {
        self.evt.write(1).map_err(IrqError::Signal)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = IrqError;
    fn trigger(&self) -> Result<(), IrqError> {
        self.raise()
    }
}
