//! A migration's durable record, the same at both ends: its phases, the volumes flipped so far,
//! the steps taken and the figures; plus the tuning it was asked for and the live progress
//! reported while it runs.
//!
//! Source-side phases, in order (each persisted before the action it names is taken):
//! ```text
//! created -> preparing -> precopy -> handed-over -> flipping -> flipped -> resuming -> cleanup
//!    -> completed
//!   any phase before flipped: -> rolling-back -> aborted   (the guest resumes on the source)
//! ```
//! Destination-side records use `preparing` (incoming VMM started), `precopy`, `resuming`,
//! `completed` or `aborted`.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use vmm_api::migration::MigrationStatus;

/// Which end of the migration this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The guest runs here at the start.
    Source,
    /// The guest runs here at the end.
    Destination,
}

/// Phase of a migration as migrated tracks it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Recorded, nothing done yet.
    Created,
    /// Starting the destination VMM in incoming mode.
    Preparing,
    /// The source VMM streams memory.
    Precopy,
    /// The source VMM stops the guest for the hand-over (then the destination holds all state
    /// and waits): a flip may follow.
    HandedOver,
    /// Flipping the volumes' leases at storaged.
    Flipping,
    /// Every lease belongs to the destination.
    Flipped,
    /// Resuming the guest on the destination.
    Resuming,
    /// Destination runs the guest; the source VMM is being shut down.
    Cleanup,
    /// Done: the guest runs on the destination only.
    Completed,
    /// Undoing: rolling back flipped leases, resuming the source.
    RollingBack,
    /// Undone: the guest runs on the source only.
    Aborted,
    /// Ended in a state that needs an operator (see `error`).
    Failed,
}

impl Phase {
    /// True once nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Aborted | Phase::Failed)
    }

    /// True while an operator may still abort the migration at its source (before the flip).
    pub fn abortable(self) -> bool {
        matches!(
            self,
            Phase::Created | Phase::Preparing | Phase::Precopy | Phase::HandedOver
        )
    }

    /// True from the point where the guest may only continue on the destination.
    pub fn past_point_of_no_return(self) -> bool {
        matches!(
            self,
            Phase::Flipped | Phase::Resuming | Phase::Cleanup | Phase::Completed
        )
    }

    /// The phase's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Created => "created",
            Phase::Preparing => "preparing",
            Phase::Precopy => "precopy",
            Phase::HandedOver => "handed-over",
            Phase::Flipping => "flipping",
            Phase::Flipped => "flipped",
            Phase::Resuming => "resuming",
            Phase::Cleanup => "cleanup",
            Phase::Completed => "completed",
            Phase::RollingBack => "rolling-back",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Tuning of a migration, passed to the source VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationParams {
    /// Longest pause the guest may see, in ms.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Pre-copy iterations before giving up on convergence.
    #[serde(default = "default_iterations")]
    pub max_iterations: u32,
    /// Slow the vCPUs down when the guest dirties memory faster than the link.
    #[serde(default)]
    pub throttle: bool,
}

fn default_downtime() -> u64 {
    300
}
fn default_iterations() -> u32 {
    30
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_ms: default_downtime(),
            max_iterations: default_iterations(),
            throttle: false,
        }
    }
}

/// One recorded step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Step {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Phase entered.
    pub phase: Phase,
    /// What happened.
    pub note: String,
}

/// Final figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Figures {
    /// From the request to the destination running the guest.
    pub total_ms: u64,
    /// The guest's pause: from the source's last vCPU pause to the destination's first vCPU
    /// run as the destination VMM measures it (`vmm_downtime_us`, rounded up); when it reports
    /// none, from the pause migrated saw at the source to the destination's resume ack.
    pub downtime_ms: u64,
    /// Downtime as the destination VMM measures it: from the source's last vCPU pause to its
    /// own first vCPU run (wall clocks of both hosts).
    pub vmm_downtime_ms: u64,
    /// Same, in microseconds.
    #[serde(default)]
    pub vmm_downtime_us: u64,
    /// Time spent flipping the leases at storaged.
    pub flip_ms: u64,
    /// Bytes the source VMM sent.
    pub bytes_sent: u64,
    /// When each step of the guest's pause happened.
    #[serde(default)]
    pub timeline: Timeline,
}

/// The guest's pause, step by step: wall clocks in microseconds since the epoch (each host's
/// own clock), 0 when unknown. From `paused_at_us` to `handed_over_at_us` the source VMM sends
/// the rest of the state and the migrated that flips (the destination's, or the source's when
/// the destination did not answer) learns that it arrived; to `flipped_at_us` the leases flip;
/// to `resumed_at_us` the destination VMM is told to run the guest and its first vCPU runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Timeline {
    /// The source VMM's last vCPU pause (its clock, as the destination VMM heard it).
    pub paused_at_us: u64,
    /// The migrated that flips saw the hand-over.
    pub handed_over_at_us: u64,
    /// The migrated that flips had storaged's answer to the flip (or read the flip back).
    pub flipped_at_us: u64,
    /// The destination VMM's first vCPU run (its clock).
    pub resumed_at_us: u64,
}

/// The durable record of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationRecord {
    /// Migration id (unique across hosts: instance, source and a timestamp).
    pub id: String,
    /// The instance moved.
    pub instance: String,
    /// This host's end.
    pub role: Role,
    /// Source host id.
    pub source: String,
    /// Destination host id.
    pub destination: String,
    /// REST address of the other end.
    pub peer_addr: String,
    /// Tuning.
    pub params: MigrationParams,
    /// Current phase.
    pub phase: Phase,
    /// Migration stream address of the destination VMM.
    pub stream_addr: Option<String>,
    /// The instance's storaged volumes.
    pub volumes: Vec<String>,
    /// Volumes whose lease was flipped to the destination.
    pub flipped: Vec<String>,
    /// The epoch at which the source held each volume's primary lease when the migration
    /// began: the condition of the flip, whichever side makes it, so that a flip can no longer
    /// happen once the source revoked the destination's standby leases (which moves them).
    #[serde(default)]
    pub epochs: std::collections::BTreeMap<String, u64>,
    /// Steps taken.
    pub steps: Vec<Step>,
    /// Start (ms since the epoch).
    pub started_ms: u64,
    /// End (ms since the epoch).
    pub ended_ms: Option<u64>,
    /// Why it aborted or failed.
    pub error: Option<String>,
    /// Figures (complete once `completed`).
    pub figures: Figures,
}

/// Live progress, as the source VMM reports it (not persisted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// The VMM's migration phase.
    pub vmm_phase: vmm_api::migration::Phase,
    /// Pre-copy iteration.
    pub iteration: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Bytes still to send.
    pub bytes_remaining: u64,
    /// Rate at which the guest dirties memory.
    pub dirty_rate_bytes_per_sec: u64,
    /// Downtime expected if stop-and-copy started now.
    pub expected_downtime_ms: u64,
    /// Estimated time to completion.
    pub eta_ms: Option<u64>,
    /// Time since the migration started.
    pub elapsed_ms: u64,
}

impl Progress {
    /// The progress the source VMM reports in `st`, `elapsed` into the migration, with the
    /// time to completion estimated from the average rate so far.
    pub fn of(st: &MigrationStatus, elapsed: Duration) -> Progress {
        let rate = st.bytes_sent as f64 / elapsed.as_secs_f64().max(0.001);
        Progress {
            vmm_phase: st.phase,
            iteration: st.iteration,
            bytes_sent: st.bytes_sent,
            bytes_remaining: st.bytes_remaining,
            dirty_rate_bytes_per_sec: st.dirty_rate_bytes_per_sec,
            expected_downtime_ms: st.expected_downtime_ms,
            eta_ms: (rate > 0.0).then(|| (st.bytes_remaining as f64 / rate * 1000.0) as u64),
            elapsed_ms: elapsed.as_millis() as u64,
        }
    }
}

impl MigrationRecord {
    /// The record of a migration of `instance` that starts now, `created` with nothing done
    /// yet; the caller names the hosts.
    pub fn new(
        id: String,
        instance: String,
        role: Role,
        params: MigrationParams,
        volumes: Vec<String>,
    ) -> MigrationRecord {
        MigrationRecord {
            id,
            instance,
            role,
            source: String::new(),
            destination: String::new(),
            peer_addr: String::new(),
            params,
            phase: Phase::Created,
            stream_addr: None,
            volumes,
            flipped: Vec::new(),
            epochs: Default::default(),
            steps: Vec::new(),
            started_ms: crate::now_ms(),
            ended_ms: None,
            error: None,
            figures: Figures::default(),
        }
    }

    /// Appends a step and moves to `phase`.
    pub fn step(&mut self, phase: Phase, note: impl Into<String>) {
        self.phase = phase;
        self.note(note);
        if phase.is_terminal() {
            self.ended_ms = Some(crate::now_ms());
        }
    }

    /// Appends a step that stays in the current phase.
    pub fn note(&mut self, note: impl Into<String>) {
        self.steps.push(Step {
            at_ms: crate::now_ms(),
            phase: self.phase,
            note: note.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_are_the_wire_names() {
        let names = "created preparing precopy handed-over flipping flipped resuming cleanup \
            completed rolling-back aborted failed";
        for name in names.split_whitespace() {
            let phase: Phase = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(phase.as_str(), name);
        }
    }
}
