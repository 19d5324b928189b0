//! `GET /v1/vm` and the VM actions: the VM's info and run state, snapshot requests.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs are running.
    Running,
    /// vCPUs are paused.
    Paused,
}

/// `GET /v1/vm`, and the answer of the VM actions (pause, resume, shutdown, snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmInfo {
    /// The VM's name.
    pub name: String,
    /// Running or paused.
    pub state: RunState,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskInfo {
    /// Path or storaged URL.
    pub name: String,
    /// Offered read-only.
    pub read_only: bool,
}

/// `POST /v1/vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where the snapshot file goes (replaced if it exists).
    #[schema(value_type = String)]
    pub path: PathBuf,
}
