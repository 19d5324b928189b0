//! The VMM's API contract, with no KVM in it: what the `vmm` binary serves on its Unix socket
//! and what migrated and the tests send it. Both sides use these types, so a change to the
//! contract is a compile error on both (the OpenAPI description is `vmm/openapi.yaml`).
//!
//! - [`config`]: the VM to run (`vmm run --config vm.toml`, or flags);
//! - [`vm`]: the VM's info, state and counters, snapshot requests;
//! - [`migration`]: what a live migration is asked to do and how far it got;
//! - [`client`]: the API's client.
#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod migration;
pub mod vm;
