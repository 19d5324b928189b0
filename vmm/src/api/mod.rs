//! The VMM's control API: HTTP/1.1 with JSON bodies on a Unix socket. The contract is
//! `vmm/openapi.yaml`; its request and answer types are in the `vmm-api` crate.
//!
//! | method | path              | does                                   |
//! |--------|-------------------|----------------------------------------|
//! | GET    | /v1/vm            | VM info and state                      |
//! | GET    | /v1/vm/counters   | exits, disk requests, dirty rate       |
//! | POST   | /v1/vm/pause      | pause all vCPUs (idempotent)           |
//! | POST   | /v1/vm/resume     | resume them (idempotent)               |
//! | POST   | /v1/vm/shutdown   | end the VM; the VMM exits with 0       |
//! | POST   | /v1/vm/snapshot   | `{"path"}`: state + memory to a file   |
//! | POST   | /v1/migration/send| start a live migration (202)           |
//! | GET    | /v1/migration     | migration progress and final figures;  |
//! |        |                   | `?phase=P&wait_ms=N`: once not in P    |
//! | POST   | /v1/migration/abort | stop it; the source keeps the guest  |
//!
//! The vm endpoints return the VM info after the action, the migration ones the migration
//! status; errors return `{"error": "..."}` with 400 (bad request), 409 (not in this state)
//! or 500.
//! Handlers only forward requests to the VM's control loop and wait for its answer, except
//! the counters, which are read from the atomics the vCPUs and disks keep ([`Counters`]), and
//! the long poll of the migration's phase, which waits on the shared status without the loop
//! (the loop is busy saving the guest during a stop-and-copy).

mod server;

pub use server::{bind, ApiDoc, ErrorBody, Failed, Refused, Unanswered};

use thiserror::Error;

/// Errors starting the API server.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket could not be bound.
    #[error("bind {0}")]
    Bind(String, #[source] std::io::Error),
}

/// Where `GET /v1/vm/counters` reads from, without the control loop.
#[derive(Clone)]
pub struct Counters {
    /// The vCPUs' shared state (their exit counts).
    pub vcpus: std::sync::Arc<crate::vcpu::VcpuShared>,
    /// Each disk's guest name and, when the VMM serves it, its counters.
    pub disks: Vec<(String, Option<std::sync::Arc<vmm_disk::DiskStats>>)>,
    /// The migration's status (its dirty rate).
    pub migration: crate::migration::SharedStatus,
}

impl Counters {
    /// The counters now.
    pub fn read(&self) -> vmm_api::vm::VmCounters {
        let disks = self
            .disks
            .iter()
            .map(|(device, stats)| match stats {
                Some(s) => s.snapshot(device),
                None => vmm_api::vm::DiskCounters {
                    device: device.clone(),
                    served_by: "vhost-user".into(),
                    ..Default::default()
                },
            })
            .collect();
        let migration = crate::migration::current(&self.migration);
        let migrating = migration.phase == vmm_api::migration::Phase::Precopy;
        vmm_api::vm::VmCounters {
            exits: self.vcpus.exits.snapshot(),
            disks,
            dirty_rate_bytes_per_sec: if migrating {
                migration.dirty_rate_bytes_per_sec
            } else {
                0
            },
        }
    }
}

/// A request for the control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// Report info.
    Info,
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// End the VM.
    Shutdown,
    /// Write a snapshot (the VM keeps its run state).
    Snapshot(std::path::PathBuf),
    /// Start a live migration.
    MigrationSend(vmm_api::migration::SendParams),
    /// Report the migration status.
    MigrationStatus,
    /// Abort the migration.
    MigrationAbort,
}

/// The control loop's answer.
#[derive(Debug)]
pub enum ApiResponse {
    /// Success, with the VM's info after the action.
    Info(vmm_api::vm::VmInfo),
    /// The migration status.
    Migration(vmm_api::migration::MigrationStatus),
    /// A migration was started (202).
    Accepted(vmm_api::migration::MigrationStatus),
    /// The request failed: 409 when the error is a refusal in the VM's current state
    /// ([`crate::vm::VmError::is_refusal`]), else 500.
    Failed(crate::vm::VmError),
}
