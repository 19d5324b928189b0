//! Live migration between two VMM processes over TCP, and the dirty-page tracking it needs.
//!
//! ```text
//!  source VMM (PUT /v1/migration/send)            destination VMM (vmm run --incoming ADDR)
//!   connect ───── preamble + HELLO ─────────────►  checks version and VM shape
//!           ◄──── HELLO reply ────────────────────
//!   dirty log on; full pass (zero pages skipped)►  pages written into guest memory
//!   iterations: fetch-and-clear the dirty log,
//!   send those pages, until the rest fits the
//!   downtime limit (and stops halving each
//!   round) or the iteration cap (the throttle
//!   slows the vCPUs if enabled)
//!   SYNC ──────────────────────────────────────►  answered once all earlier frames are in
//!           ◄──── SYNCED ──────────────────────────   memory (the pause then holds no backlog)
//!   pause vCPUs, drain block I/O, save state
//!   last dirty pages + STATE ──────────────────►  restores VM, vCPUs, devices (data path off)
//!           ◄──── READY ──────────────────────────
//!   COMMIT (pause time) ───────────────────────►  resume: "auto" runs the guest now,
//!           ◄──── RESUMED (auto only) ────────────          "wait" waits for PUT /v1/vm/resume
//! ```
//! Until COMMIT is written the source can resume at any failure (the destination then exits);
//! after it, the guest belongs to the destination and the source stays paused. The wire format
//! is in [`wire`]; the source side in [`send`], the destination side in [`receive`].

pub mod dirty;
pub mod receive;
pub mod send;
pub mod wire;

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// What `PUT /v1/migration/send` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    /// `HOST:PORT` of the destination VMM's stream listener.
    pub destination: String,
    /// Downtime budget: pre-copy ends when the rest is expected to take no longer.
    #[serde(default = "default_downtime_ms")]
    pub downtime_limit_ms: u64,
    /// Pre-copy iteration cap: then stop-and-copy happens whatever remains.
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    /// Slow the vCPUs down when the guest dirties memory faster than the link sends it.
    #[serde(default)]
    pub throttle: bool,
    /// `auto`: the destination runs the guest as soon as it has all state. `wait`: it stays
    /// paused until `PUT /v1/vm/resume` (the storage leases are flipped in between).
    #[serde(default = "default_resume")]
    pub resume: String,
}

fn default_downtime_ms() -> u64 {
    300
}
fn default_max_iterations() -> u32 {
    30
}
fn default_resume() -> String {
    "auto".into()
}

impl SendParams {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.destination.is_empty() {
            return Err("destination is empty".into());
        }
        if self.downtime_limit_ms == 0 || self.max_iterations == 0 {
            return Err("downtime_limit_ms and max_iterations must be at least 1".into());
        }
        if self.resume != "auto" && self.resume != "wait" {
            return Err(format!(
                "resume must be auto or wait, not {:?}",
                self.resume
            ));
        }
        Ok(())
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// None has started.
    #[default]
    Idle,
    /// Memory is copied while the guest runs.
    Precopy,
    /// The guest is paused and the rest is copied.
    Stopcopy,
    /// All state reached the destination; the guest is paused on both sides until the
    /// destination is told to resume (or the source to abort).
    HandedOver,
    /// The guest runs on the destination.
    Completed,
    /// It failed; `error` says why. A source runs the guest again.
    Failed,
    /// It was aborted on request; a source runs the guest again.
    Aborted,
}

/// `GET /v1/migration`: progress, then the final figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// `source`, `destination`, or empty when idle.
    pub role: String,
    /// Phase.
    pub phase: Phase,
    /// Pre-copy iteration (0 = the full pass).
    pub iteration: u64,
    /// Bytes written to (source) or read from (destination) the stream.
    pub bytes_sent: u64,
    /// Dirty bytes still to send (source).
    pub bytes_remaining: u64,
    /// Bytes of memory the guest dirtied per second during the last iteration.
    pub dirty_rate_bytes_per_sec: u64,
    /// Stop-and-copy time if it started now, at the measured transfer rate.
    pub expected_downtime_ms: u64,
    /// Percentage of time the vCPUs are held out of the guest by the throttle.
    pub throttle_percent: u64,
    /// Time since the migration started (final once it ends).
    pub total_ms: u64,
    /// From the last vCPU pause on the source to the first vCPU run on the destination, 0
    /// until known (the destination knows it after resuming; the source in `auto` mode).
    pub downtime_ms: u64,
    /// Same, in microseconds.
    pub downtime_us: u64,
    /// Pages sent (source) or received (destination) as data.
    pub pages_sent: u64,
    /// Zero pages sent as markers (dirty pages that became zero).
    pub zero_pages_sent: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// The status shared between a migration thread, the VM loop and the API.
pub type SharedStatus = Arc<Mutex<MigrationStatus>>;

/// Updates a shared status.
pub fn update(status: &SharedStatus, f: impl FnOnce(&mut MigrationStatus)) {
    match status.lock() {
        Ok(mut s) => f(&mut s),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

/// A copy of a shared status as it is now.
pub fn current(status: &SharedStatus) -> MigrationStatus {
    match status.lock() {
        Ok(s) => s.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}
