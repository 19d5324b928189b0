//! Port I/O glue around vm-superio's `I8042Device`.

use crate::bus::BusDevice;
use crate::vm::VmEvent;
use std::sync::mpsc::Sender;

/// First port: 0x60 is the data port, 0x64 the status/command port.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// Delivers the reset request to the VM's control loop.
#[derive(Debug)]
pub struct ResetSignal(pub Sender<VmEvent>);

impl vm_superio::Trigger for ResetSignal {
    type E = std::sync::mpsc::SendError<VmEvent>;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(VmEvent::GuestReset)
    }
}

/// The device on the port bus.
pub struct I8042(vm_superio::I8042Device<ResetSignal>);

impl I8042 {
    /// A controller whose reset command sends [`VmEvent::GuestReset`].
    pub fn new(events: Sender<VmEvent>) -> I8042 {
        I8042(vm_superio::I8042Device::new(ResetSignal(events)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.0.write(offset as u8, data[0]) {
                tracing::warn!(error = ?e, "i8042 reset could not be delivered");
            }
        }
    }
}
