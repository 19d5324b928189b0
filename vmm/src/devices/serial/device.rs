//! The UART on the port bus.
//!
//! Output bytes leave the vCPU thread through a channel (a slow console reader must never stall
//! a vCPU); input bytes are pushed into the UART's receive FIFO by the console threads, which
//! wait on [`InputEvents`] when the FIFO is full.

use super::super::IrqLine;
use crate::bus::BusDevice;
use std::io::Write;
use std::sync::mpsc::Sender;
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

/// COM1's first port.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// COM1's eight registers.
pub const COM1_PORT_LEN: u64 = 8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;

/// The UART's transmit side: every byte goes to the console output thread.
#[derive(Debug, Clone)]
pub struct ConsoleOut(pub Sender<Vec<u8>>);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A closed console discards output rather than failing the guest's write.
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tells the input side when the guest has drained the receive FIFO.
#[derive(Debug)]
pub struct InputEvents {
    /// Signalled whenever the FIFO becomes empty.
    pub fifo_empty: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.fifo_empty.write(1);
    }
}

/// COM1.
pub struct SerialDevice {
    pub(super) serial: Serial<IrqLine, InputEvents, ConsoleOut>,
    /// Whether input is taken. A VM that restores a saved guest keeps its input out until the
    /// saved UART is loaded, so that no byte typed before that is overwritten and lost.
    input_open: bool,
}

impl SerialDevice {
    /// A UART raising `irq`, writing to `out`, reporting FIFO space through `events`; it takes
    /// input from the start when `input_open`, otherwise once [`Self::open_input`] is called.
    pub fn new(
        irq: IrqLine,
        events: InputEvents,
        out: ConsoleOut,
        input_open: bool,
    ) -> SerialDevice {
        SerialDevice {
            serial: Serial::with_events(irq, events, out),
            input_open,
        }
    }

    /// Starts taking input, waking any console thread that waits to deliver some.
    pub fn open_input(&mut self) {
        self.input_open = true;
        let _ = self.serial.events().fifo_empty.write(1);
    }

    /// Puts as much of `bytes` into the receive FIFO as fits; returns how many (none while the
    /// input is not open yet).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if !self.input_open {
            return 0;
        }
        let n = bytes.len().min(self.serial.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = ?e, "serial input dropped");
                n
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!(error = ?e, "serial write");
            }
        }
    }
}
