//! The contract of migrated's REST API: its routes, the bodies they take and answer, and the
//! kinds of error with their HTTP status. The server ([`crate::server`]) and the one client
//! ([`crate::client::MigratedClient`], used by peers and by `migratectl`) both build on these
//! definitions, so a route or a body is written once.
//!
//! HTTP/1.1, JSON bodies, on TCP (peers, remote `migratectl --host`) and on a Unix socket
//! (local tools). Errors are [`ErrorAnswer`] with the status of their [`ErrorKind`]; on TCP a
//! request without the cluster's token, when one is set, gets 401 ([`vmhop_common::token`]).
//! Version policy: the routes are under `/v1`; fields are only ever added (with serde
//! defaults), an incompatible change gets a new prefix.
//!
//! | method | path                              | body               | answer                |
//! |--------|-----------------------------------|--------------------|-----------------------|
//! | GET    | /v1/host                          |                    | `HostInfo`            |
//! | GET    | /v1/hosts                         |                    | `[HostEntry]`         |
//! | GET    | /v1/instances                     |                    | `[InstanceRecord]`    |
//! | POST   | /v1/instances                     | `InstanceConfig`   | 201 `InstanceRecord`  |
//! | GET    | /v1/instances/{name}              |                    | `InstanceRecord`      |
//! | DELETE | /v1/instances/{name}              |                    | `InstanceRecord` (removed; only without a VMM) |
//! | POST   | /v1/instances/{name}/stop         |                    | `StopAnswer`          |
//! | POST   | /v1/instances/{name}/migrate      | `MigrateRequest`   | 202 `MigrationRecord` |
//! | GET    | /v1/migrations                    |                    | `[MigrationInfo]`     |
//! | GET    | /v1/migrations/{id}               |                    | `MigrationInfo`       |
//! | POST   | /v1/migrations/{id}/abort         |                    | 202 `MigrationRecord` |
//! | GET    | /metrics                          |                    | Prometheus text       |
//! | POST   | /v1/incoming                      | `IncomingRequest`  | `IncomingReady` (peer)|
//! | GET    | /v1/incoming/{id}                 |                    | `MigrationRecord`     |
//! | POST   | /v1/incoming/{id}/resume          |                    | `MigrationRecord`     |
//! | POST   | /v1/incoming/{id}/abort           |                    | `MigrationRecord`     |

use crate::config::InstanceConfig;
use crate::instance::InstanceRecord;
use crate::migration::record::{MigrationParams, MigrationRecord, Progress};
use hyper::StatusCode;
use serde::{Deserialize, Serialize};

/// The routes, in the server's syntax (`{name}` is a path parameter); [`route::fill`] makes
/// a client's path of one.
pub mod route {
    /// This host's summary.
    pub const HOST: &str = "/v1/host";
    /// This host and its peers.
    pub const HOSTS: &str = "/v1/hosts";
    /// The instances (GET), or a new one (POST).
    pub const INSTANCES: &str = "/v1/instances";
    /// One instance (GET), or forget one whose VMM is gone (DELETE).
    pub const INSTANCE: &str = "/v1/instances/{name}";
    /// Stops an instance.
    pub const INSTANCE_STOP: &str = "/v1/instances/{name}/stop";
    /// Starts migrating an instance.
    pub const INSTANCE_MIGRATE: &str = "/v1/instances/{name}/migrate";
    /// The migrations this host took part in.
    pub const MIGRATIONS: &str = "/v1/migrations";
    /// One migration, with its progress.
    pub const MIGRATION: &str = "/v1/migrations/{id}";
    /// The operator aborts a migration at its source.
    pub const MIGRATION_ABORT: &str = "/v1/migrations/{id}/abort";
    /// The Prometheus metrics.
    pub const METRICS: &str = "/metrics";
    /// Prepares this host as a destination (a peer call).
    pub const INCOMING: &str = "/v1/incoming";
    /// One incoming migration's record.
    pub const INCOMING_ONE: &str = "/v1/incoming/{id}";
    /// The leases are the destination's: resume the guest there.
    pub const INCOMING_RESUME: &str = "/v1/incoming/{id}/resume";
    /// The source handed the guest over: the destination flips the leases and runs it.
    pub const INCOMING_COMPLETE: &str = "/v1/incoming/{id}/complete";
    /// The source gave up: end the incoming VMM.
    pub const INCOMING_ABORT: &str = "/v1/incoming/{id}/abort";

    /// `route` with its one parameter replaced by `arg`.
    pub fn fill(route: &str, arg: &str) -> String {
        match (route.find('{'), route.find('}')) {
            (Some(open), Some(close)) => {
                format!("{}{arg}{}", &route[..open], &route[close + 1..])
            }
            _ => route.to_string(),
        }
    }
}

/// The kind of a refused or failed request; each is answered with one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request cannot be served as written (400).
    BadRequest,
    /// No such instance or migration (404).
    NotFound,
    /// The request conflicts with the current state (409).
    Conflict,
    /// The calling host may not ask for this (403).
    Forbidden,
    /// A VMM, a peer or storaged failed (502).
    BadGateway,
    /// This migrated failed (500).
    Internal,
}

impl ErrorKind {
    /// The HTTP status of an answer of this kind.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorAnswer {
    /// The error and its causes on one line.
    pub error: String,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostInfo {
    /// Host id.
    pub host_id: String,
    /// REST address.
    pub listen: String,
    /// migrated version.
    pub version: String,
    /// Instances with a VMM on this host.
    pub active_instances: usize,
    /// Migrations in progress.
    pub active_migrations: usize,
}

/// One row of `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostEntry {
    /// Host id.
    pub host_id: String,
    /// REST address.
    pub addr: String,
    /// This host.
    pub local: bool,
    /// Answered just now.
    pub reachable: bool,
    /// What it said about itself.
    pub info: Option<HostInfo>,
    /// Why it did not answer.
    pub error: Option<String>,
    /// For this host: whether it reaches storaged.
    #[serde(default)]
    pub storaged: Option<StoragedReach>,
}

/// Whether a host reaches storaged's REST API, where the leases of its guests' volumes are
/// held, flipped and released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoragedReach {
    /// storaged's REST address as this host calls it.
    pub addr: String,
    /// Answered just now.
    pub reachable: bool,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// Answer to `POST /v1/instances/{name}/stop`: the instance, and what became of this host's
/// leases on its storaged volumes once its VMM was gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StopAnswer {
    /// The instance as it is now.
    #[serde(flatten)]
    pub record: InstanceRecord,
    /// One entry per storaged volume of the guest.
    #[serde(default)]
    pub leases: Vec<LeaseRelease>,
}

/// What became of this host's lease on one volume of a guest whose VMM is gone here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseRelease {
    /// The volume.
    pub volume: String,
    /// Released, not held, or kept.
    pub outcome: ReleaseOutcome,
    /// The state of the lease this host held (released or kept).
    pub state: Option<storaged_client::api::LeaseState>,
    /// Why it was kept.
    pub error: Option<String>,
    /// The command that releases a kept lease once storaged answers.
    pub command: Option<String>,
}

/// What became of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseOutcome {
    /// storaged ended it: another host may take the volume.
    Released,
    /// This host held no lease on the volume for this instance.
    NotHeld,
    /// storaged did not answer (or refused): the lease stays until it is revoked.
    Kept,
}

impl std::fmt::Display for LeaseRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            Some(s) => format!("{s} lease"),
            None => "lease".to_string(),
        };
        match self.outcome {
            ReleaseOutcome::Released => write!(f, "{state} released"),
            ReleaseOutcome::NotHeld => write!(f, "no lease held by this host"),
            ReleaseOutcome::Kept => write!(
                f,
                "{state} kept: {}; release it with: {}",
                self.error.as_deref().unwrap_or("storaged did not answer"),
                self.command.as_deref().unwrap_or("storaged lease revoke")
            ),
        }
    }
}

/// Body of `POST /v1/instances/{name}/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrateRequest {
    /// Destination host id (a configured peer) or its REST address.
    pub to: String,
    /// Tuning.
    #[serde(flatten)]
    pub params: MigrationParams,
}

/// `GET /v1/migrations/{id}`: the record and, while it runs, the progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationInfo {
    /// Durable record.
    #[serde(flatten)]
    pub record: MigrationRecord,
    /// Live progress.
    pub progress: Option<Progress>,
}

/// Body of the peer call `POST /v1/incoming`: prepare a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IncomingRequest {
    /// Migration id.
    pub migration: String,
    /// Source host id.
    pub source: String,
    /// Source migrated's REST address (for the destination's watch of the source).
    pub source_addr: String,
    /// The guest.
    pub config: InstanceConfig,
    /// Tuning (recorded at the destination for the operator).
    pub params: MigrationParams,
    /// The epoch at which the source holds each volume's primary lease: the condition under
    /// which the destination may take the volumes over by itself (see
    /// [`MigrationRecord::epochs`]). Without it the destination never takes over.
    #[serde(default)]
    pub epochs: std::collections::BTreeMap<String, u64>,
}

/// Answer to `POST /v1/incoming`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IncomingReady {
    /// Destination host id.
    pub host: String,
    /// Where the destination VMM listens for the stream.
    pub stream_addr: String,
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn a_route_is_filled_with_its_parameter() {
        assert_eq!(route::fill(route::INSTANCE, "vm1"), "/v1/instances/vm1");
        assert_eq!(
            route::fill(route::INCOMING_RESUME, "vm1.a.1"),
            "/v1/incoming/vm1.a.1/resume"
        );
        assert_eq!(route::fill(route::HOSTS, "x"), "/v1/hosts");
    }
}
