//! The client of a VMM's API socket: what migrated and the tests call.
//!
//! | method | path                  | body -> answer                                  |
//! |--------|-----------------------|-------------------------------------------------|
//! | GET    | /v1/vm                | -> [`VmInfo`]                                   |
//! | GET    | /v1/vm/counters       | -> [`VmCounters`]                               |
//! | POST   | /v1/vm/pause          | -> [`VmInfo`]                                   |
//! | POST   | /v1/vm/resume         | -> [`VmInfo`]; on an incoming VMM that waits, also "the leases are yours" |
//! | POST   | /v1/vm/shutdown       | -> [`VmInfo`]; the VMM exits                    |
//! | POST   | /v1/vm/snapshot       | [`SnapshotRequest`] -> [`VmInfo`]               |
//! | POST   | /v1/migration/send    | [`SendParams`] -> 202 [`MigrationStatus`]       |
//! | GET    | /v1/migration         | -> [`MigrationStatus`]; `?phase=&wait_ms=` waits for a change |
//! | POST   | /v1/migration/abort   | -> [`MigrationStatus`]; the source keeps the guest |
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 409 (not in this state), 500, or
//! 503 while the VM shuts down.

use crate::migration::{MigrationStatus, MigrationWait, Phase, SendParams};
use crate::vm::{SnapshotRequest, VmCounters, VmInfo};
use hyper::{Method, StatusCode};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use vmhop_common::http::{Client, HttpError, Target};

/// Deadline of one API call (a pause waits for every vCPU; the VMM allows itself 15 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A failed VMM call.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The call failed.
    #[error("VMM API")]
    Http(#[from] HttpError),
    /// The VMM has no migration API.
    #[error("the VMM at {0} has no migration API; it needs the migration stream of the VMM")]
    NoMigrationApi(String, #[source] HttpError),
}

impl VmmError {
    /// The HTTP status, when the VMM answered one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            VmmError::Http(e) | VmmError::NoMigrationApi(_, e) => e.status(),
        }
    }
}

/// Client for one VMM's API socket.
#[derive(Debug, Clone)]
pub struct VmmClient {
    http: Client,
}

impl VmmClient {
    /// A client for the socket at `path`.
    pub fn new(path: &Path) -> VmmClient {
        VmmClient {
            http: Client::new(Target::Unix(path.to_path_buf()), CALL_TIMEOUT),
        }
    }

    /// The same client with another deadline (probes want a short one, snapshots a long one).
    pub fn with_timeout(&self, t: Duration) -> VmmClient {
        VmmClient {
            http: self.http.with_timeout(t),
        }
    }

    async fn put_vm(&self, path: &str) -> Result<VmInfo, VmmError> {
        Ok(self.http.call(Method::POST, path, None::<&()>).await?)
    }

    /// `GET /v1/vm`.
    pub async fn info(&self) -> Result<VmInfo, VmmError> {
        Ok(self.http.call(Method::GET, "/v1/vm", None::<&()>).await?)
    }

    /// `GET /v1/vm/counters`.
    pub async fn counters(&self) -> Result<VmCounters, VmmError> {
        Ok(self
            .http
            .call(Method::GET, "/v1/vm/counters", None::<&()>)
            .await?)
    }

    /// `POST /v1/vm/pause`.
    pub async fn pause(&self) -> Result<VmInfo, VmmError> {
        self.put_vm("/v1/vm/pause").await
    }

    /// `POST /v1/vm/resume`.
    pub async fn resume(&self) -> Result<VmInfo, VmmError> {
        self.put_vm("/v1/vm/resume").await
    }

    /// `POST /v1/vm/shutdown`.
    pub async fn shutdown(&self) -> Result<VmInfo, VmmError> {
        self.put_vm("/v1/vm/shutdown").await
    }

    /// `POST /v1/vm/snapshot`: state and memory to `path`.
    pub async fn snapshot(&self, path: &Path) -> Result<VmInfo, VmmError> {
        let req = SnapshotRequest {
            path: path.to_path_buf(),
        };
        Ok(self
            .http
            .call(Method::POST, "/v1/vm/snapshot", Some(&req))
            .await?)
    }

    fn no_api(&self, e: HttpError) -> VmmError {
        match e.status() {
            Some(StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED) => {
                VmmError::NoMigrationApi(self.http.target().to_string(), e)
            }
            _ => VmmError::Http(e),
        }
    }

    /// `GET /v1/migration`; a 404/405 is [`VmmError::NoMigrationApi`].
    pub async fn migration(&self) -> Result<MigrationStatus, VmmError> {
        self.http
            .call(Method::GET, "/v1/migration", None::<&()>)
            .await
            .map_err(|e| self.no_api(e))
    }

    /// `GET /v1/migration?phase=PHASE&wait_ms=..`: the status once its phase is no longer
    /// `phase`, or as it is after `wait`; a 404/405 is [`VmmError::NoMigrationApi`].
    pub async fn migration_change(
        &self,
        phase: Phase,
        wait: Duration,
    ) -> Result<MigrationStatus, VmmError> {
        let path = format!("/v1/migration?{}", MigrationWait::query(phase, wait));
        self.http
            .with_timeout(wait + CALL_TIMEOUT)
            .call(Method::GET, &path, None::<&()>)
            .await
            .map_err(|e| self.no_api(e))
    }

    /// `POST /v1/migration/send`: starts a live migration.
    pub async fn send(&self, req: &SendParams) -> Result<MigrationStatus, VmmError> {
        self.http
            .call(Method::POST, "/v1/migration/send", Some(req))
            .await
            .map_err(|e| self.no_api(e))
    }

    /// `POST /v1/migration/abort`: the source keeps the guest (valid until the destination
    /// resumed it).
    pub async fn abort(&self) -> Result<MigrationStatus, VmmError> {
        self.http
            .call(Method::POST, "/v1/migration/abort", None::<&()>)
            .await
            .map_err(|e| self.no_api(e))
    }
}
