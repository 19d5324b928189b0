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

/// `GET /v1/vm/counters`: what the VMM counted since it started (cumulative), and the guest's
/// current dirty rate. Read without the VM's control loop, so it answers during a migration's
/// stop-and-copy too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct VmCounters {
    /// vCPU exits to the VMM.
    pub exits: ExitCounters,
    /// One entry per disk, in order (vda first).
    pub disks: Vec<DiskCounters>,
    /// Bytes of memory the guest dirtied per second during the migration's last pre-copy
    /// iteration; 0 when no migration runs.
    pub dirty_rate_bytes_per_sec: u64,
}

/// vCPU exits to the VMM, by reason (summed over the vCPUs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct ExitCounters {
    /// Port I/O (the serial console, the i8042).
    pub io: u64,
    /// MMIO (virtio registers).
    pub mmio: u64,
    /// Interrupt windows, EOIs, host interrupts.
    pub other: u64,
    /// Kicks by the VMM (pause, snapshot, migration).
    pub interrupted: u64,
}

/// What one disk served.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct DiskCounters {
    /// The guest's name for it (`vda`, `vdb`, ...).
    pub device: String,
    /// Who serves its requests: `vmm` (this process) or `vhost-user` (a backend process,
    /// which counts them itself: the request counts here stay 0).
    pub served_by: String,
    /// Read requests.
    pub read_requests: u64,
    /// Write requests.
    pub write_requests: u64,
    /// Flush requests.
    pub flush_requests: u64,
    /// Discard and write-zeroes requests.
    pub discard_requests: u64,
    /// Other requests (GET_ID, unsupported types, refused requests).
    pub other_requests: u64,
    /// Requests completed with an error status.
    pub errors: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
}
