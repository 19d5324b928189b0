//! migrated: the per-host live migration agent, the coordinator of migrations between hosts,
//! and the library behind `migratectl`.
//!
//! One migrated runs on every host. It starts, tracks and stops the host's guests ([`agent`],
//! [`instance`]) and their VMM processes ([`vmm_process`]), records every instance and every migration step durably
//! ([`store`]), picks up where it left off after a restart ([`recovery`]), serves a REST API
//! ([`api`] for the contract, [`server`] for the routes) to its peers and to local tools, and
//! drives migrations ([`migration`]: the [`migration::source`] and
//! [`migration::destination`] sides and their shared [`migration::record`]). It talks to the
//! VMM through `vmm_api::client`, to storaged through `storaged_client::rest`, and to other
//! hosts through [`client`]; it counts what it does in [`metrics`] (`GET /metrics`) and releases the leases a guest no
//! longer needs here ([`release`]); its TCP API takes only requests that carry the cluster's token
//! (`vmhop_common::token`).
//!
//! Modules depend one way: `config`, `instance`, `store`, `api` and `migration::record` are
//! plain data, `vmm_process` the steps on one VMM process; `agent` owns the records and
//! sequences the VMM processes; the two migration sides use the agent; `recovery` and `server` sit on top and are the only callers of the sides.
#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod client;
pub mod config;
pub mod disk_backend;
pub mod instance;
pub mod metrics;
pub mod migration;
pub mod recovery;
pub mod release;
pub mod scope;
pub mod server;
pub mod store;
pub mod vmm_process;

/// Milliseconds since the Unix epoch (the records' timestamps).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch (the timeline of a migration's pause).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
