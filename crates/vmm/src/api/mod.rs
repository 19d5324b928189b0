//! The VMM's control API: HTTP/1.1 with JSON bodies on a Unix socket. The contract is
//! `crates/vmm/openapi.yaml`.
//!
//! | method | path              | does                                   |
//! |--------|-------------------|----------------------------------------|
//! | GET    | /v1/vm            | VM info and state                      |
//! | PUT    | /v1/vm/pause      | pause all vCPUs (idempotent)           |
//! | PUT    | /v1/vm/resume     | resume them (idempotent)               |
//! | PUT    | /v1/vm/shutdown   | end the VM; the VMM exits with 0       |
//!
//! Every success returns the VM info after the action; errors return `{"error": "..."}`.
//! Handlers only forward requests to the VM's control loop and wait for its answer.

mod server;

pub use server::bind;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors starting the API server.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket could not be bound.
    #[error("bind {0}")]
    Bind(String, #[source] std::io::Error),
}

/// A request for the control loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiRequest {
    /// Report info.
    Info,
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// End the VM.
    Shutdown,
}

/// The control loop's answer.
#[derive(Debug, Clone)]
pub enum ApiResponse {
    /// Success, with the VM's info after the action.
    Info(VmInfo),
    /// Failure.
    Error(String),
}

/// `GET /v1/vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's name.
    pub name: String,
    /// `running` or `paused`.
    pub state: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest memory.
    pub memory_mib: u64,
    /// Kernel path.
    pub kernel: String,
    /// The kernel command line as passed (with the devices).
    pub cmdline: String,
    /// Disks in order (vda first).
    pub disks: Vec<DiskInfo>,
    /// Time since the VMM started.
    pub uptime_ms: u64,
    /// The VMM's process id.
    pub pid: u32,
}

/// One disk in [`VmInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Path or storaged URL.
    pub name: String,
    /// Offered read-only.
    pub read_only: bool,
}
