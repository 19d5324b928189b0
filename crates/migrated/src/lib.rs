//! migrated: the per-host live migration agent, the coordinator of migrations between hosts,
//! and the library behind `migratectl`.
//!
//! One migrated runs on every host. It starts, tracks and stops the host's VMM processes
//! ([`agent`], [`instance`]), records every instance and every migration step durably
//! ([`store`]), serves a REST API to its peers and to local tools ([`api`]), and drives
//! migrations: the source side in [`coordinator`], the destination side in [`incoming`]. It
//! talks to the VMM through [`vmm_client`], to storaged through [`leases`], and to other hosts
//! through [`peer`]; its TCP API takes only requests that carry the cluster's token ([`storaged::api::token`]).
#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod config;
pub mod coordinator;
pub mod http;
pub mod incoming;
pub mod instance;
pub mod leases;
pub mod migration;
pub mod peer;
pub mod store;
pub mod vmm_client;

/// An error and its causes on one line, `outer: cause: cause`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}
