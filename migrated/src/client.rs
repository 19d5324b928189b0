//! The client of migrated's REST API ([`crate::api`]): what one migrated calls on its peers
//! (over TCP, with the cluster's token, in mutual TLS when the host has a certificate) and
//! what `migratectl` calls on the local migrated (Unix socket) or on a remote one.

use crate::api::{
    route, HostEntry, HostInfo, IncomingReady, IncomingRequest, MigrateRequest, MigrationInfo,
    StopAnswer,
};
use crate::config::InstanceConfig;
use crate::instance::InstanceRecord;
use crate::migration::record::MigrationRecord;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use vmhop_common::http::{Client, HttpError, HttpTls, Prepared, Target};
use vmhop_common::token::Token;

/// Deadline of ordinary peer calls.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of `POST /v1/incoming` (the destination starts a VMM and waits for its API).
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(90);

/// A client for one migrated.
#[derive(Debug, Clone)]
pub struct MigratedClient {
    http: Client,
}

impl MigratedClient {
    /// A client for the migrated at `target` whose calls fail after `timeout`, sending `token`,
    /// in TLS with `tls` (a TCP target only).
    pub fn new(
        target: Target,
        timeout: Duration,
        token: Option<Token>,
        tls: Option<HttpTls>,
    ) -> MigratedClient {
        MigratedClient {
            http: Client::new(target, timeout).with_token(token).with_tls(tls),
        }
    }

    /// A client for the peer at `addr` (`host:port`), sending the cluster's `token`; in TLS
    /// the peer must prove the host id `tls` names.
    pub fn peer(addr: &str, token: Option<&Token>, tls: Option<HttpTls>) -> MigratedClient {
        MigratedClient::new(
            Target::Tcp(addr.to_string()),
            PEER_TIMEOUT,
            token.cloned(),
            tls,
        )
    }

    /// The same client with another deadline.
    pub fn with_timeout(&self, t: Duration) -> MigratedClient {
        MigratedClient {
            http: self.http.with_timeout(t),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        self.http.call(Method::GET, path, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, HttpError> {
        self.http.call(Method::POST, path, body).await
    }

    /// `DELETE /v1/instances/{name}`: forgets an instance whose VMM is gone.
    pub async fn remove(&self, name: &str) -> Result<InstanceRecord, HttpError> {
        self.http
            .call(
                Method::DELETE,
                &route::fill(route::INSTANCE, name),
                None::<&()>,
            )
            .await
    }

    /// `GET /metrics`: the Prometheus exposition.
    pub async fn metrics(&self) -> Result<String, HttpError> {
        let (status, body) = self.http.raw(Method::GET, route::METRICS, None).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        match status.is_success() {
            true => Ok(text),
            false => Err(HttpError::Status {
                target: self.http.target().to_string(),
                status,
                message: text,
                details: None,
            }),
        }
    }

    /// `GET /v1/host`.
    pub async fn host(&self) -> Result<HostInfo, HttpError> {
        self.get(route::HOST).await
    }

    /// `GET /v1/hosts`.
    pub async fn hosts(&self) -> Result<Vec<HostEntry>, HttpError> {
        self.get(route::HOSTS).await
    }

    /// `GET /v1/instances`.
    pub async fn instances(&self) -> Result<Vec<InstanceRecord>, HttpError> {
        self.get(route::INSTANCES).await
    }

    /// `GET /v1/instances/{name}`.
    pub async fn instance(&self, name: &str) -> Result<InstanceRecord, HttpError> {
        self.get(&route::fill(route::INSTANCE, name)).await
    }

    /// `POST /v1/instances`: starts a guest (answers once its VMM answers).
    pub async fn run(&self, config: &InstanceConfig) -> Result<InstanceRecord, HttpError> {
        self.post(route::INSTANCES, Some(config)).await
    }

    /// `POST /v1/instances/{name}/stop`.
    pub async fn stop(&self, name: &str) -> Result<StopAnswer, HttpError> {
        self.post(&route::fill(route::INSTANCE_STOP, name), None::<&()>)
            .await
    }

    /// `POST /v1/instances/{name}/migrate`: answers once the migration is recorded.
    pub async fn migrate(
        &self,
        name: &str,
        req: &MigrateRequest,
    ) -> Result<MigrationRecord, HttpError> {
        self.post(&route::fill(route::INSTANCE_MIGRATE, name), Some(req))
            .await
    }

    /// `GET /v1/migrations`.
    pub async fn migrations(&self) -> Result<Vec<MigrationInfo>, HttpError> {
        self.get(route::MIGRATIONS).await
    }

    /// `GET /v1/migrations/{id}` (also the destination's watch of the source).
    pub async fn migration(&self, id: &str) -> Result<MigrationInfo, HttpError> {
        self.get(&route::fill(route::MIGRATION, id)).await
    }

    /// `POST /v1/incoming`, with the longer deadline of a VMM start.
    pub async fn prepare_incoming(
        &self,
        req: &IncomingRequest,
    ) -> Result<IncomingReady, HttpError> {
        self.with_timeout(PREPARE_TIMEOUT)
            .post(route::INCOMING, Some(req))
            .await
    }

    /// `GET /v1/incoming/{id}`.
    pub async fn incoming(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.get(&route::fill(route::INCOMING_ONE, id)).await
    }

    /// `GET /v1/incoming/{id}?wait_ms=` on `conn` (from [`Self::prepare`]) when there is one:
    /// the record once the migration ended at the destination, or as it is after `wait`.
    /// The client's deadline must exceed `wait`.
    pub async fn incoming_ended_on(
        &self,
        conn: Option<Prepared>,
        id: &str,
        wait: Duration,
    ) -> Result<MigrationRecord, HttpError> {
        let path = format!(
            "{}?wait_ms={}",
            route::fill(route::INCOMING_ONE, id),
            wait.as_millis()
        );
        match conn {
            Some(c) => c.call(Method::GET, &path, None::<&()>).await,
            None => self.get(&path).await,
        }
    }

    /// `POST /v1/incoming/{id}/resume`.
    pub async fn resume_incoming(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.post(&route::fill(route::INCOMING_RESUME, id), None::<&()>)
            .await
    }

    /// A connection opened ahead of a call whose latency matters (see [`Prepared`]).
    pub async fn prepare(&self) -> Result<Prepared, HttpError> {
        self.http.prepare().await
    }

    /// [`Self::resume_incoming`] on `conn` (from [`Self::prepare`]) when there is one.
    pub async fn resume_incoming_on(
        &self,
        conn: Option<Prepared>,
        id: &str,
    ) -> Result<MigrationRecord, HttpError> {
        match conn {
            Some(c) => {
                let path = route::fill(route::INCOMING_RESUME, id);
                c.call(Method::POST, &path, None::<&()>).await
            }
            None => self.resume_incoming(id).await,
        }
    }

    /// `POST /v1/incoming/{id}/complete`: answers once the guest runs at the destination, or
    /// why it does not.
    pub async fn complete_incoming(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.post(&route::fill(route::INCOMING_COMPLETE, id), None::<&()>)
            .await
    }

    /// `POST /v1/migrations/{id}/abort`: the operator aborts a migration at its source.
    pub async fn abort(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.post(&route::fill(route::MIGRATION_ABORT, id), None::<&()>)
            .await
    }

    /// `POST /v1/incoming/{id}/abort` (a peer call: the source gave up).
    pub async fn abort_incoming(&self, id: &str) -> Result<MigrationRecord, HttpError> {
        self.post(&route::fill(route::INCOMING_ABORT, id), None::<&()>)
            .await
    }
}
