//! vmm: a minimal KVM virtual machine monitor.
#![warn(missing_docs)]
