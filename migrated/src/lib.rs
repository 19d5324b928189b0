//! migrated: the per-host live migration agent, the coordinator of migrations between hosts,
//! and the library behind `migratectl`.
//!
//! One migrated runs on every host. It starts, tracks and stops the host's VMM processes
//! ([`agent`], [`instance`]), records every instance and every migration step durably
//! ([`store`]), serves a REST API to its peers and to local tools ([`api`]), and drives
//! migrations: the source side in [`coordinator`], the destination side in [`incoming`]. It
//! talks to the VMM through `vmm_api::client`, to storaged through `storaged_client::rest`,
//! and to other hosts through [`peer`]; its TCP API takes only requests that carry the
//! cluster's token (`vmhop_common::token`).
#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod config;
pub mod coordinator;
pub mod incoming;
pub mod instance;
pub mod migration;
pub mod peer;
pub mod store;
