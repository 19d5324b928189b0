//! storaged: block volumes over NBD with per-host leases.
//!
//! - [`protocol`]: the NBD wire format and the project's lease extension;
//! - [`lease`]: the lease table and its transitions; [`flip`]: applying them to live connections;
//! - [`volume`], [`store`], [`registry`]: volume files, durable metadata, the running set;
//! - [`server`]: the NBD server; [`api`]: the REST control API and its client;
//! - [`client`]: the lease-aware async NBD client used by the VMM and the tests;
//! - [`config`], [`logging`]: daemon settings and log setup (also used by migrated).
//!
//! A lease-aware client sends the project option [`protocol::NBD_OPT_LEASE`] (0x4C45_4153)
//! before `NBD_OPT_GO`; a standby connection asks for promotion with
//! [`protocol::NBD_CMD_LEASE_FLIP`]. Both are specified in [`protocol`].
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod config;
pub mod flip;
pub mod gate;
pub mod lease;
pub mod logging;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod store;
pub mod volume;
