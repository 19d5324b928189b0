//! storaged: block volumes over NBD with per-host leases.
//!
//! - [`lease`]: the lease table and its transitions; [`flip`]: applying them to live connections;
//!   [`gate`]: the per-connection barrier a flip raises;
//! - [`volume`], [`store`], [`registry`]: volume files, durable metadata, the running set;
//! - [`server`]: the NBD server; [`api`]: the REST control API's routes;
//! - [`config`]: the daemon's settings.
//!
//! The wire format, the lease-aware client and the REST API's types are in the
//! `storaged-client` crate, which is all that other processes link of storaged; this library
//! is the daemon's, linked by its binary and by tests that run a storaged in-process.
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod flip;
pub mod gate;
pub mod lease;
pub mod registry;
pub mod server;
pub mod store;
pub mod volume;
