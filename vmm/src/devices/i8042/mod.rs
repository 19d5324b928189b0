//! The i8042 keyboard controller, present only for its CPU reset line: a guest booted with
//! `reboot=k` resets through it, and the VMM ends with a clear status instead of
//! triple-faulting into an emulation failure.

mod device;
mod persist;
pub use device::{ResetSignal, I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use persist::I8042State;
