//! vmm: a minimal KVM virtual machine monitor.
//!
//! One process runs one guest: guest memory ([`memory`]), one thread per vCPU ([`vcpu`]), the
//! Linux boot path ([`boot`]), legacy devices and virtio-mmio block devices ([`devices`]), and an
//! HTTP+JSON API on a Unix socket ([`api`]). [`vm::Vm`] builds all of it from a
//! [`vmm_api::config::VmConfig`] and drives it until the guest or an operator ends it.
//!
//! [`fuzz`] drives the parsers of bytes from other parties (a migration's source, a saved
//! state, a snapshot file) as the fuzzer does.
//!
//! Every write the VMM makes into guest memory goes through [`memory::GuestMem`], whose regions
//! carry a dirty bitmap: a migration must re-send pages the VMM wrote as well as those the guest
//! wrote, and KVM's dirty log only sees the latter.
#![warn(missing_docs)]

pub mod api;
pub mod boot;
pub mod bus;
pub mod cpuid;
pub mod devices;
pub mod fuzz;
pub mod memory;
pub mod migration;
pub mod persist;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
