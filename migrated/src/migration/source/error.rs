//! Why a migration was refused or did not complete at the source, and how the API answers it.

use crate::agent::AgentError;
use crate::api::ErrorKind;
use crate::instance::InstanceState;
use crate::migration::record::Phase;
use storaged_client::api::LeaseState;
use thiserror::Error;
use vmhop_common::http::HttpError;
use vmm_api::client::VmmError;
use vmm_api::migration::Phase as VmmPhase;

/// Why a migration was refused or did not complete at the source.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The tuning asks for nothing.
    #[error("downtime_ms and max_iterations must be at least 1")]
    NoBudget,
    /// The destination is neither a configured peer nor an address.
    #[error("unknown host {to:?}: not a configured peer ({peers}) nor an address")]
    UnknownHost {
        /// What was asked for.
        to: String,
        /// The configured peers, comma-separated.
        peers: String,
    },
    /// The destination is this host.
    #[error("{0} is this host")]
    ThisHost(String),
    /// Only a running instance that no migration owns can migrate.
    #[error("instance {name} is {}{}: only a running instance can migrate", .state.words(),
        .migration.as_ref().map(|m| format!(" (migration {m})")).unwrap_or_default())]
    NotRunning {
        /// The instance.
        name: String,
        /// Its state.
        state: InstanceState,
        /// The migration that owns it.
        migration: Option<String>,
    },
    /// The agent's records failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The destination's migrated did not answer.
    #[error("destination {host} ({addr}) unreachable")]
    Unreachable {
        /// Destination host id (empty when it was given as an address).
        host: String,
        /// Its REST address.
        addr: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// Another host answers at the destination's address.
    #[error("{addr} answers as host {answered}, not {expected}")]
    WrongHost {
        /// The address.
        addr: String,
        /// Who answered.
        answered: String,
        /// Who was expected.
        expected: String,
    },
    /// The source VMM is in another migration.
    #[error("the source VMM is already migrating (phase {0})")]
    VmmBusy(VmmPhase),
    /// A call to the source VMM failed.
    #[error("the source VMM")]
    Vmm(#[source] VmmError),
    /// The destination could not start its incoming VMM.
    #[error("destination {host} could not prepare")]
    PrepareFailed {
        /// Destination host id.
        host: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The record reached pre-copy without the destination's stream address.
    #[error("no stream address")]
    NoStreamAddr,
    /// The source VMM reports that the stream failed or was aborted.
    #[error("the source VMM reports the stream {phase}: {reason}")]
    StreamFailed {
        /// The VMM's phase.
        phase: VmmPhase,
        /// The VMM's reason.
        reason: String,
    },
    /// The source VMM died or stopped answering.
    #[error("lost the source VMM")]
    VmmLost(#[source] VmmError),
    /// The destination abandoned the migration (its recorded reason).
    #[error("the destination gave up: {0}")]
    DestinationGaveUp(String),
    /// The destination stopped answering before any lease moved.
    #[error("destination {host} lost before the flip")]
    DestinationLost {
        /// Destination host id.
        host: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The destination said that it runs the guest, but storaged does not show it holding
    /// every volume.
    #[error("the destination says that it runs the guest, but storaged does not show it holding every volume")]
    DestinationClaims,
    /// The guest's leases could not be read.
    #[error("reading the leases of the guest's volumes")]
    Leases(#[source] HttpError),
    /// This host does not hold a volume of the guest as primary.
    #[error("volume {volume}: this host holds {}, not the primary lease",
        .state.map_or("no lease".to_string(), |s| format!("a {s} lease")))]
    NotPrimary {
        /// The volume.
        volume: String,
        /// What this host holds.
        state: Option<LeaseState>,
    },
    /// The migration was recorded without the lease epochs its flip is conditional on.
    #[error("no lease epochs recorded for the flip")]
    NoEpochs,
    /// storaged refused to flip the volumes' leases to the destination.
    #[error("flip refused")]
    FlipRefused(#[source] HttpError),
    /// The flip's answer did not come (or only some of the volumes' masters made it), and the
    /// leases show that it did not happen on every volume.
    #[error("the flip was not confirmed, and the destination does not hold every volume")]
    FlipUnconfirmed(#[source] HttpError),
    /// The destination did not confirm that the guest runs there.
    #[error("the destination did not confirm the resume")]
    ResumeUnconfirmed(#[source] HttpError),
    /// The destination abandoned the migration after the flip (its VMM is gone): it will never
    /// run the guest, whose only copy is the paused source.
    #[error("the destination abandoned the migration after the flip: {0}")]
    DestinationAbandoned(String),
    /// The source VMM outlived its shutdown.
    #[error("the source VMM (pid {0:?}) did not end; its leases stay deactivated")]
    VmmStays(Option<u32>),
    /// migrated restarted in a phase from which the migration cannot go on.
    #[error("migrated restarted during {0}")]
    Restarted(Phase),
    /// A rollback was under way (its recorded reason).
    #[error("{0}")]
    RollingBack(String),
    /// storaged refused to end the destination's standby leases although the destination is
    /// primary on none of the volumes: this host does not hold them all.
    #[error("storaged refused to fence the destination off; the source stays paused")]
    FenceRefused(#[source] HttpError),
    /// The destination holds some of the volumes and their flips cannot be undone.
    #[error("but the destination holds volumes {0} and storaged refused to roll them back; the source stays paused")]
    DestinationHolds(String, #[source] HttpError),
    /// An operator asked to abort the migration (`migratectl abort`).
    #[error("aborted by the operator")]
    AbortRequested,
    /// An abort was asked of a migration this host is the destination of.
    #[error(
        "migration {id} comes into this host: abort it on its source host {source_host} ({addr})"
    )]
    AbortAtDestination {
        /// The migration.
        id: String,
        /// Its source host.
        source_host: String,
        /// The source host's REST address, as far as this host knows it.
        addr: String,
    },
    /// An abort was asked of a migration that can no longer be aborted.
    #[error("migration {id} is {phase}: {why}")]
    AbortTooLate {
        /// The migration.
        id: String,
        /// Its phase.
        phase: Phase,
        /// Why it cannot be aborted.
        why: &'static str,
    },
}

impl SourceError {
    /// What kind of failure this is, for the API's answer.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::NoBudget | SourceError::UnknownHost { .. } | SourceError::ThisHost(_) => {
                ErrorKind::BadRequest
            }
            SourceError::NotRunning { .. }
            | SourceError::VmmBusy(_)
            | SourceError::AbortRequested
            | SourceError::AbortAtDestination { .. }
            | SourceError::AbortTooLate { .. } => ErrorKind::Conflict,
            SourceError::Agent(e) => e.kind(),
            SourceError::NoStreamAddr
            | SourceError::Restarted(_)
            | SourceError::RollingBack(_)
            | SourceError::NoEpochs => ErrorKind::Internal,
            SourceError::NotPrimary { .. } => ErrorKind::Conflict,
            SourceError::Unreachable { .. }
            | SourceError::WrongHost { .. }
            | SourceError::Vmm(_)
            | SourceError::PrepareFailed { .. }
            | SourceError::StreamFailed { .. }
            | SourceError::VmmLost(_)
            | SourceError::DestinationGaveUp(_)
            | SourceError::DestinationClaims
            | SourceError::DestinationLost { .. }
            | SourceError::Leases(_)
            | SourceError::FlipRefused(_)
            | SourceError::FlipUnconfirmed(_)
            | SourceError::ResumeUnconfirmed(_)
            | SourceError::DestinationAbandoned(_)
            | SourceError::VmmStays(_)
            | SourceError::FenceRefused(_)
            | SourceError::DestinationHolds(..) => ErrorKind::BadGateway,
        }
    }
}
