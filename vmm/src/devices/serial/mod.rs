//! COM1: vm-superio's 8250 UART on ports 0x3f8..0x3ff, IRQ 4, and its connection to the
//! outside (stdio, a file or a Unix socket).

mod console;
mod device;
mod persist;

pub use console::{start_console, ConsoleError};
pub use device::{ConsoleOut, InputEvents, SerialDevice, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};
pub use persist::{SerialState, SerialStateError};
