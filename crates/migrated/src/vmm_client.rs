//! migrated's calls into a VMM's Unix-socket API, in one place so that the contract with the
//! VMM is easy to read and to adjust.
//!
//! | method | path                  | body / answer                                         |
//! |--------|-----------------------|-------------------------------------------------------|
//! | GET    | /v1/vm                | `{"state": "running"|"paused", "pid": N, ...}`        |
//! | PUT    | /v1/vm/resume         | resume; on an incoming VMM also "the leases are yours"|
//! | PUT    | /v1/vm/shutdown       | end the VMM                                           |
//! | PUT    | /v1/migration/send    | [`SendRequest`] -> 202                                |
//! | GET    | /v1/migration         | [`MigrationStatus`]                                   |
//! | PUT    | /v1/migration/abort   | source resumes (valid until the destination resumed)  |
//!
//! The destination VMM is started as `vmm run --incoming ADDR:PORT --config vm.toml`: it boots
//! nothing, opens its volumes as standby, receives the stream and stays paused until
//! `PUT /v1/vm/resume`. Its `GET /v1/migration` reports `handed-over` once all state arrived.

use crate::http::{Client, HttpError, Target};
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// Deadline of one API call (a pause waits for every vCPU; the VMM allows itself 15 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A failed VMM call.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The call failed.
    #[error("VMM API")]
    Http(#[from] HttpError),
    /// The VMM has no migration API.
    #[error("the VMM at {0} has no migration API ({1}); it needs the migration stream of the VMM")]
    NoMigrationApi(String, String),
}

/// `GET /v1/vm`, the fields migrated uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `running` or `paused`.
    pub state: String,
    /// The VMM's pid.
    #[serde(default)]
    pub pid: u32,
}

/// `PUT /v1/migration/send`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// `HOST:PORT` of the destination VMM's stream listener.
    pub destination: String,
    /// Downtime budget.
    pub downtime_limit_ms: u64,
    /// Pre-copy iteration cap.
    pub max_iterations: u32,
    /// Throttle the vCPUs if the guest does not converge.
    pub throttle: bool,
    /// `wait`: the destination stays paused after the hand-over until told to resume.
    pub resume: String,
}

/// `GET /v1/migration`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationStatus {
    /// idle, precopy, stopcopy, handed-over, completed, failed or aborted.
    pub phase: String,
    /// Pre-copy iteration.
    pub iteration: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes left.
    pub bytes_remaining: u64,
    /// Dirty rate.
    pub dirty_rate_bytes_per_sec: u64,
    /// Expected downtime.
    pub expected_downtime_ms: u64,
    /// Time since the migration started.
    pub total_ms: u64,
    /// Pause time (known at the destination after its resume).
    pub downtime_ms: u64,
    /// Same, in microseconds.
    pub downtime_us: u64,
    /// Why it failed.
    pub error: Option<String>,
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

    /// The same client with a shorter deadline (probes).
    pub fn with_timeout(&self, t: Duration) -> VmmClient {
        VmmClient {
            http: self.http.with_timeout(t),
        }
    }

    async fn put(&self, path: &str) -> Result<serde_json::Value, VmmError> {
        Ok(self.http.call(Method::PUT, path, None::<&()>).await?)
    }

    /// `GET /v1/vm`.
    pub async fn info(&self) -> Result<VmInfo, VmmError> {
        Ok(self.http.call(Method::GET, "/v1/vm", None::<&()>).await?)
    }

    /// `PUT /v1/vm/resume`.
    pub async fn resume(&self) -> Result<(), VmmError> {
        self.put("/v1/vm/resume").await.map(drop)
    }

    /// `PUT /v1/vm/shutdown`.
    pub async fn shutdown(&self) -> Result<(), VmmError> {
        self.put("/v1/vm/shutdown").await.map(drop)
    }

    fn no_api(&self, e: HttpError) -> VmmError {
        match e.status() {
            Some(StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED) => {
                VmmError::NoMigrationApi(self.http.target().to_string(), e.to_string())
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

    /// `PUT /v1/migration/send`.
    pub async fn send(&self, req: &SendRequest) -> Result<(), VmmError> {
        self.http
            .call::<serde_json::Value>(Method::PUT, "/v1/migration/send", Some(req))
            .await
            .map(drop)
            .map_err(|e| self.no_api(e))
    }

    /// `PUT /v1/migration/abort`.
    pub async fn abort(&self) -> Result<(), VmmError> {
        self.http
            .call::<serde_json::Value>(Method::PUT, "/v1/migration/abort", None::<&()>)
            .await
            .map(drop)
            .map_err(|e| self.no_api(e))
    }
}
