//! storaged: block volumes over NBD with per-host leases.
//!
//! - [`lease`]: the lease table and its transitions (`lease::table`), applying them to live
//!   connections (`lease::flip`), the per-connection barrier a flip raises (`lease::gate`);
//! - [`volume`]: a running volume, its connections and its file; [`store`]: durable metadata;
//!   [`registry`]: the running set of volumes and how connections attach to them;
//! - [`server`]: the NBD server (handshake, transmission); [`api`]: the REST control API's
//!   routes;
//! - [`config`]: the daemon's settings; [`cluster`]: cluster mode (replicas, etcd);
//!   [`metrics`]: its Prometheus metrics (`GET /metrics`).
//!
//! The wire format, the lease-aware client and the REST API's types are in the
//! `storaged-client` crate, which is all that other processes link of storaged; this library
//! is the daemon's, linked by its binary and by tests that run a storaged in-process.
#![warn(missing_docs)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod lease;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod store;
pub mod volume;

/// The flip at its former path, which the VMM's and migrated's in-process tests use.
pub use lease::flip;
