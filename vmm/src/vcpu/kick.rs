//! Getting a vCPU thread out of KVM_RUN promptly: a real-time signal whose handler sets
//! `kvm_run.immediate_exit`.
//!
//! The signal interrupts a KVM_RUN in progress (it returns EINTR). Setting `immediate_exit` in
//! the handler closes the race where the signal lands after the thread checked its command
//! channel but before it entered KVM_RUN: KVM checks the flag on entry and returns EINTR at
//! once. The thread clears the flag after each EINTR, then reads its commands.

use std::cell::Cell;
use std::sync::Once;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null on threads without a vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: a thread-local read (const-initialized, no lazy
    // setup or destructor) and a volatile byte store.
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer was set by this thread to its own vCPU's mapped kvm_run,
            // which stays mapped until `clear_current` runs on this same thread.
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// Installs the handler once per process.
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result
}

/// Makes the kick handler target `immediate_exit` of the calling thread's vCPU.
pub fn set_current(immediate_exit: *mut u8) {
    IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
}

/// Detaches the calling thread from its vCPU before the vCPU is dropped.
pub fn clear_current() {
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
}
