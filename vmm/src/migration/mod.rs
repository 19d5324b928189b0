//! Live migration between two VMM processes over TCP (in TLS with the hosts' certificates,
//! see [`transport`]), and the dirty-page tracking it needs.
//!
//! ```text
//!  source VMM (POST /v1/migration/send)            destination VMM (vmm run --incoming ADDR)
//!   connect (TLS: each proves its host) ────────►  the gate: only the expected source passes
//!           ───── preamble + HELLO ─────────────►  checks version and VM shape
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
//!   COMMIT (pause time), not waiting for READY ►
//!           ◄──── READY ──────────────────────────  (a failed load: READY says why, and the
//!                                                    destination exits without reading COMMIT)
//!                                                  COMMIT: "auto" runs the guest now,
//!           ◄──── RESUMED (auto) ─────────────────          "wait" waits for POST /v1/vm/resume
//!           ◄──── COMMITTED (wait) ───────────────
//! ```
//! Until COMMIT is written the source can resume at any failure (the destination then exits).
//! Once COMMIT is on its way the guest may be the destination's: the source stays paused, as
//! handed over once COMMITTED (or RESUMED) came, as undecided when the stream failed first
//! (but not when READY said the state did not load: that destination never reads COMMIT); an
//! undecided guest runs here again only on `POST /v1/migration/abort`, which the caller sends
//! once it knows that the destination cannot run it (migrated: once storaged fenced the
//! destination off). The wire format is in [`wire`]; the source side in [`send`], the
//! destination side in [`receive`].

pub mod dirty;
pub mod receive;
pub mod send;
pub mod transport;
pub mod wire;

use std::sync::Arc;
pub(crate) use vmm_api::migration::{
    MigrationRole, MigrationStatus, Phase, ResumeMode, SendParams,
};

/// The status shared between a migration thread, the VM loop and the API. Every change wakes
/// the API's long polls of the phase (`GET /v1/migration?phase=...`), so that migrated learns
/// of a hand-over when it happens rather than at its next poll.
#[derive(Debug, Clone)]
pub struct SharedStatus(Arc<tokio::sync::watch::Sender<MigrationStatus>>);

impl Default for SharedStatus {
    fn default() -> Self {
        SharedStatus(Arc::new(tokio::sync::watch::Sender::new(
            MigrationStatus::default(),
        )))
    }
}

impl SharedStatus {
    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<MigrationStatus> {
        self.0.subscribe()
    }
}

/// Updates a shared status and wakes whoever waits for a change.
pub fn update(status: &SharedStatus, f: impl FnOnce(&mut MigrationStatus)) {
    status.0.send_modify(f);
}

/// A copy of a shared status as it is now.
pub fn current(status: &SharedStatus) -> MigrationStatus {
    status.0.borrow().clone()
}
