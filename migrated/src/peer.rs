//! Calls to another host's migrated over its REST API (see [`crate::api`] for the routes).

use crate::migration::{IncomingReady, IncomingRequest, MigrationRecord};
use hyper::Method;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use vmhop_common::http::{Client, HttpError, Target};
use vmhop_common::token::Token;

/// Deadline of ordinary peer calls.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of `POST /v1/incoming` (the destination starts a VMM and waits for its API).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(90);

/// `GET /v1/host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// A client for one peer.
#[derive(Debug, Clone)]
pub struct Peer {
    http: Client,
}

impl Peer {
    /// A client for the peer at `addr` (`host:port`), sending the cluster's `token`.
    pub fn new(addr: &str, token: Option<&Token>) -> Peer {
        Peer {
            http: Client::new(Target::Tcp(addr.to_string()), PEER_TIMEOUT)
                .with_token(token.cloned()),
        }
    }

    /// The same peer with another deadline.
    pub fn with_timeout(&self, t: Duration) -> Peer {
        Peer {
            http: self.http.with_timeout(t),
        }
    }

    /// `GET /v1/host`.
    pub async fn host(&self) -> Result<HostInfo, HttpError> {
        self.http.call(Method::GET, "/v1/host", None::<&()>).await
    }

    /// `POST /v1/incoming`.
    pub async fn prepare(&self, req: &IncomingRequest) -> Result<IncomingReady, HttpError> {
        self.http
            .with_timeout(PREPARE_TIMEOUT)
            .call(Method::POST, "/v1/incoming", Some(req))
            .await
    }

    /// `GET /v1/incoming/{id}`.
    pub async fn incoming(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.http
            .call(Method::GET, &format!("/v1/incoming/{id}"), None::<&()>)
            .await
    }

    /// `POST /v1/incoming/{id}/resume`.
    pub async fn resume(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.http
            .call(
                Method::POST,
                &format!("/v1/incoming/{id}/resume"),
                None::<&()>,
            )
            .await
    }

    /// `POST /v1/incoming/{id}/abort`.
    pub async fn abort(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.http
            .call(
                Method::POST,
                &format!("/v1/incoming/{id}/abort"),
                None::<&()>,
            )
            .await
    }

    /// `GET /v1/migrations/{id}` (the source's record, watched by the destination).
    pub async fn migration(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.http
            .call(Method::GET, &format!("/v1/migrations/{id}"), None::<&()>)
            .await
    }
}
