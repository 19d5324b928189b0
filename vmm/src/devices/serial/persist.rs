//! COM1's saved state: the 8250 UART's registers and its receive FIFO. The interrupt line,
//! the input events and the console output stay those of the device restored into.

use super::device::{InputEvents, SerialDevice};
use crate::devices::{IrqError, IrqLine};
use crate::persist::Persist;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::SerialState as UartState;
use vm_superio::Serial;

/// Errors restoring the UART.
#[derive(Debug, Error)]
pub enum SerialStateError {
    /// The interrupt or FIFO eventfd could not be duplicated for the new UART.
    #[error("duplicate the UART's eventfd")]
    CloneEventFd(#[source] std::io::Error),
    /// vm-superio refused the saved registers.
    #[error("restore the UART")]
    Uart(#[source] vm_superio::serial::Error<IrqError>),
}

/// The 8250 UART's registers and receive FIFO.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl Persist for SerialDevice {
    type State = SerialState;
    type Error = SerialStateError;

    fn save(&self) -> Result<SerialState, SerialStateError> {
        let s = self.serial.state();
        Ok(SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore(&mut self, saved: &SerialState) -> Result<(), SerialStateError> {
        let state = UartState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let irq = self.serial.interrupt_evt();
        let irq = IrqLine {
            evt: irq
                .evt
                .try_clone()
                .map_err(SerialStateError::CloneEventFd)?,
            gsi: irq.gsi,
        };
        let events = InputEvents {
            fifo_empty: self
                .serial
                .events()
                .fifo_empty
                .try_clone()
                .map_err(SerialStateError::CloneEventFd)?,
        };
        let out = self.serial.writer().clone();
        self.serial =
            Serial::from_state(&state, irq, events, out).map_err(SerialStateError::Uart)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::serial::ConsoleOut;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn uart() -> SerialDevice {
        let (tx, _rx) = std::sync::mpsc::channel();
        SerialDevice::new(
            IrqLine {
                evt: EventFd::new(EFD_NONBLOCK).unwrap(),
                gsi: 4,
            },
            InputEvents {
                fifo_empty: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            ConsoleOut(tx),
            true,
        )
    }

    #[test]
    fn registers_and_pending_input_round_trip() {
        let mut a = uart();
        a.write(3, &[0x03]); // LCR: 8 bits
        a.write(7, &[0x5a]); // SCR
        assert_eq!(a.enqueue_input(b"hi"), 2);
        let saved = a.save().unwrap();
        assert_eq!(saved.scratch, 0x5a);
        assert_eq!(saved.in_buffer, b"hi");

        let mut b = uart();
        b.restore(&saved).unwrap();
        assert_eq!(b.save().unwrap(), saved);
        let mut byte = [0u8];
        b.read(0, &mut byte);
        assert_eq!(byte[0], b'h', "the restored FIFO delivers the saved input");

        let too_much = SerialState {
            in_buffer: vec![0; 1 << 16],
            ..saved
        };
        assert!(matches!(
            uart().restore(&too_much),
            Err(SerialStateError::Uart(_))
        ));
    }
}
