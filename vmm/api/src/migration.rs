//! `POST /v1/migration/send` and `GET /v1/migration`: what a live migration is asked to do and
//! how far it got. The phases are those of `vmm/src/migration/mod.rs`'s sequence diagram.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What `POST /v1/migration/send` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// When the destination runs the guest.
    #[serde(default)]
    pub resume: ResumeMode,
    /// The host id the destination's certificate must prove; the stream runs in TLS with the
    /// VM's `tls_dir`, and without this the destination is checked against the IP address of
    /// `destination`. Only with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_host: Option<String>,
}

/// When the destination runs the guest it received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResumeMode {
    /// As soon as it has all state.
    #[default]
    Auto,
    /// Only on `POST /v1/vm/resume` (the storage leases are flipped in between).
    Wait,
}

impl std::fmt::Display for ResumeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResumeMode::Auto => "auto",
            ResumeMode::Wait => "wait",
        })
    }
}

/// The default downtime budget, in milliseconds.
pub fn default_downtime_ms() -> u64 {
    300
}

/// The default pre-copy iteration cap.
pub fn default_max_iterations() -> u32 {
    30
}

/// Send parameters that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SendParamsError {
    /// No destination.
    #[error("destination is empty")]
    NoDestination,
    /// A zero budget or cap.
    #[error("downtime_limit_ms and max_iterations must be at least 1")]
    Zero,
}

impl SendParams {
    /// Parameters for a migration to `destination` with the defaults.
    pub fn new(destination: impl Into<String>) -> SendParams {
        SendParams {
            destination: destination.into(),
            downtime_limit_ms: default_downtime_ms(),
            max_iterations: default_max_iterations(),
            throttle: false,
            resume: ResumeMode::default(),
            destination_host: None,
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), SendParamsError> {
        if self.destination.is_empty() {
            return Err(SendParamsError::NoDestination);
        }
        if self.downtime_limit_ms == 0 || self.max_iterations == 0 {
            return Err(SendParamsError::Zero);
        }
        Ok(())
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// It failed; `error` says why. A source runs the guest again, unless it failed after
    /// COMMIT was on its way unconfirmed (the destination may hold the guest): then it stays
    /// paused until `POST /v1/migration/abort`.
    Failed,
    /// It was aborted on request; a source runs the guest again.
    Aborted,
}

impl Phase {
    /// The phase's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Precopy => "precopy",
            Phase::Stopcopy => "stopcopy",
            Phase::HandedOver => "handed-over",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Aborted => "aborted",
        }
    }

    /// Whether the migration has ended (completed, failed or aborted).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Aborted)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The longest wait a long poll of the migration's phase may ask for.
pub const MAX_WAIT_MS: u64 = 60_000;

/// `GET /v1/migration?phase=P&wait_ms=N`: answer once the phase is no longer `phase`, or after
/// `wait_ms` (at most [`MAX_WAIT_MS`]) with the status as it is then. Without `phase` the
/// status is answered at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MigrationWait {
    /// The phase the caller knows: the answer waits for another one.
    pub phase: Option<Phase>,
    /// How long to wait at most, in milliseconds (0 without `phase`).
    #[serde(default)]
    pub wait_ms: u64,
}

impl MigrationWait {
    /// The query string of a wait for a phase other than `phase`, up to `wait`.
    pub fn query(phase: Phase, wait: std::time::Duration) -> String {
        format!("phase={phase}&wait_ms={}", wait.as_millis())
    }
}

/// Which side of a migration a VMM is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationRole {
    /// No migration.
    #[default]
    None,
    /// It sends the guest.
    Source,
    /// It receives the guest.
    Destination,
}

/// `GET /v1/migration`: progress, then the final figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct MigrationStatus {
    /// Source, destination, or none when idle.
    pub role: MigrationRole,
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
    /// Destination, once it resumed: when the source's vCPUs paused for the last time (the
    /// source's wall clock, microseconds since the epoch), 0 until known.
    pub paused_at_us: u64,
    /// Destination, once it resumed: when its first vCPU ran (its wall clock, microseconds
    /// since the epoch), 0 until known.
    pub resumed_at_us: u64,
    /// Pages sent (source) or received (destination) as data.
    pub pages_sent: u64,
    /// Zero pages sent as markers (dirty pages that became zero).
    pub zero_pages_sent: u64,
    /// Why it failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_params_take_defaults_and_refuse_bad_values() {
        let p: SendParams = serde_json::from_str(r#"{"destination":"10.0.0.2:7000"}"#).unwrap();
        assert_eq!(p, SendParams::new("10.0.0.2:7000"));
        p.validate().unwrap();
        let p: SendParams =
            serde_json::from_str(r#"{"destination":"d:1","resume":"wait"}"#).unwrap();
        assert_eq!(p.resume, ResumeMode::Wait);
        assert!(
            serde_json::from_str::<SendParams>(r#"{"destination":"d:1","resume":"later"}"#)
                .is_err()
        );
        let mut p = SendParams::new("");
        assert_eq!(p.validate(), Err(SendParamsError::NoDestination));
        p.destination = "d:1".into();
        p.max_iterations = 0;
        assert_eq!(p.validate(), Err(SendParamsError::Zero));
    }

    #[test]
    fn phases_are_kebab_case_on_the_wire() {
        for p in [
            Phase::Idle,
            Phase::Precopy,
            Phase::Stopcopy,
            Phase::HandedOver,
            Phase::Completed,
            Phase::Failed,
            Phase::Aborted,
        ] {
            let s = serde_json::to_string(&p).unwrap();
            assert_eq!(s, format!("\"{}\"", p.as_str()));
        }
        assert_eq!(format!("{:<12}|", Phase::Precopy), "precopy     |");
        let st: MigrationStatus = serde_json::from_str(r#"{"phase":"stopcopy"}"#).unwrap();
        assert_eq!(st.phase, Phase::Stopcopy);
        assert_eq!(st.role, MigrationRole::None);
    }
}
