//! The client of storaged's REST API (the routes are in [`crate::api`]): what storaged's CLI,
//! migrated and the tests use to manage volumes and leases. Every call has a deadline.

use crate::api::{
    ArmedFlip, FlipReport, FlipRequest, GroupFlipReport, GroupFlipRequest, GroupRevokeRequest,
    GroupRollbackRequest, LeaseState, LeaseView, RevokeRequest, RollbackRequest, VolumeAccess,
    VolumeConfig, VolumeInfo,
};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use vmhop_common::http::{Client, HttpError, Prepared, Target};
use vmhop_common::token::Token;

/// Default deadline of one call (a flip waits for the old primary's admitted requests).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What `POST /v1/volumes/{id}/flip` answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FlipAnswer {
    /// An armed flip (202): it completes on the standby's first data command or at its
    /// deadline.
    Armed(ArmedFlip),
    /// The flip is done.
    Done(FlipReport),
}

/// A client of one storaged's REST API.
#[derive(Debug, Clone)]
pub struct StoragedApi {
    http: Client,
}

impl StoragedApi {
    /// A client for the API at `addr` (`host:port`), sending the cluster's `token` when
    /// storaged requires one.
    pub fn new(addr: &str, token: Option<Token>) -> StoragedApi {
        StoragedApi {
            http: Client::new(Target::Tcp(addr.to_string()), DEFAULT_TIMEOUT).with_token(token),
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> StoragedApi {
        StoragedApi {
            http: self.http.with_timeout(timeout),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        self.http.call(Method::GET, path, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, HttpError> {
        self.http.call(Method::POST, path, body).await
    }

    /// `GET /v1/health`: whether storaged answers.
    pub async fn health(&self) -> Result<(), HttpError> {
        self.get::<serde_json::Value>("/v1/health").await.map(drop)
    }

    /// Every volume.
    pub async fn volumes(&self) -> Result<Vec<VolumeInfo>, HttpError> {
        self.get("/v1/volumes").await
    }

    /// Creates a volume.
    pub async fn create_volume(&self, cfg: &VolumeConfig) -> Result<VolumeInfo, HttpError> {
        self.post("/v1/volumes", Some(cfg)).await
    }

    /// Creates a volume replicated on several nodes (cluster mode).
    pub async fn create_replicated_volume(
        &self,
        req: &crate::cluster::ReplicatedVolumeRequest,
    ) -> Result<crate::cluster::Placement, HttpError> {
        self.post("/v1/cluster/volumes", Some(req)).await
    }

    /// A replicated volume's placement, in-sync set and master (cluster mode).
    pub async fn replicated_volume(
        &self,
        name: &str,
    ) -> Result<crate::cluster::ReplicatedVolumeView, HttpError> {
        self.get(&format!("/v1/cluster/volumes/{name}")).await
    }

    /// One volume.
    pub async fn volume(&self, name: &str) -> Result<VolumeInfo, HttpError> {
        self.get(&format!("/v1/volumes/{name}")).await
    }

    /// Replaces who may use a volume (its anonymous policy and its host list).
    pub async fn set_access(
        &self,
        name: &str,
        access: &VolumeAccess,
    ) -> Result<VolumeInfo, HttpError> {
        self.http
            .call(
                Method::PUT,
                &format!("/v1/volumes/{name}/access"),
                Some(access),
            )
            .await
    }

    /// Deletes a volume without open connections (its data is removed).
    pub async fn delete_volume(&self, name: &str) -> Result<(), HttpError> {
        self.http
            .call::<serde_json::Value>(Method::DELETE, &format!("/v1/volumes/{name}"), None::<&()>)
            .await
            .map(drop)
    }

    /// The lease table of a volume.
    pub async fn leases(&self, volume: &str) -> Result<LeaseView, HttpError> {
        self.get(&format!("/v1/volumes/{volume}/leases")).await
    }

    /// Flips a volume's lease (promotes a standby; the old primary is deactivated), now or
    /// armed.
    pub async fn flip(&self, volume: &str, req: &FlipRequest) -> Result<FlipAnswer, HttpError> {
        self.post(&format!("/v1/volumes/{volume}/flip"), Some(req))
            .await
    }

    /// Promotes `host`'s standby lease on `volume` now and returns the flip's report.
    pub async fn flip_to(&self, volume: &str, host: &str) -> Result<FlipReport, HttpError> {
        let req = FlipRequest {
            to: Some(host.to_string()),
            ..FlipRequest::default()
        };
        self.post(&format!("/v1/volumes/{volume}/flip"), Some(&req))
            .await
    }

    /// Undoes the flip that made `req.primary` primary at `req.epoch` (refused if the volume
    /// moved on since).
    pub async fn rollback(
        &self,
        volume: &str,
        req: &RollbackRequest,
    ) -> Result<FlipReport, HttpError> {
        self.post(&format!("/v1/volumes/{volume}/rollback"), Some(req))
            .await
    }

    /// Cancels the flip armed on `volume` (with `migration`, only if that migration armed it);
    /// nothing armed is no error.
    pub async fn cancel_flip(
        &self,
        volume: &str,
        migration: Option<&str>,
    ) -> Result<LeaseView, HttpError> {
        let query = migration
            .map(|m| format!("?migration={m}"))
            .unwrap_or_default();
        self.http
            .call(
                Method::DELETE,
                &format!("/v1/volumes/{volume}/flip{query}"),
                None::<&()>,
            )
            .await
    }

    /// Flips a set of volumes as one decision (see [`GroupFlipRequest`]).
    pub async fn flip_group(&self, req: &GroupFlipRequest) -> Result<GroupFlipReport, HttpError> {
        self.post("/v1/leases/flip", Some(req)).await
    }

    /// A connection opened ahead of a call whose latency matters (see [`Prepared`]).
    pub async fn prepare(&self) -> Result<Prepared, HttpError> {
        self.http.prepare().await
    }

    /// [`Self::flip_group`] on `conn` (from [`Self::prepare`]) when there is one.
    pub async fn flip_group_on(
        &self,
        conn: Option<Prepared>,
        req: &GroupFlipRequest,
    ) -> Result<GroupFlipReport, HttpError> {
        match conn {
            Some(c) => c.call(Method::POST, "/v1/leases/flip", Some(req)).await,
            None => self.flip_group(req).await,
        }
    }

    /// Ends a host's standby leases on a set of volumes as one decision (see
    /// [`GroupRevokeRequest`]); answers the volumes' lease views after it.
    pub async fn revoke_group(
        &self,
        req: &GroupRevokeRequest,
    ) -> Result<Vec<LeaseView>, HttpError> {
        self.post("/v1/leases/revoke", Some(req)).await
    }

    /// Undoes the flips of a set of volumes as one decision (see [`GroupRollbackRequest`]).
    pub async fn rollback_group(
        &self,
        req: &GroupRollbackRequest,
    ) -> Result<GroupFlipReport, HttpError> {
        self.post("/v1/leases/rollback", Some(req)).await
    }

    /// The lease views of `volumes`, read one after the other.
    pub async fn leases_of(&self, volumes: &[String]) -> Result<Vec<LeaseView>, HttpError> {
        let mut out = Vec::with_capacity(volumes.len());
        for v in volumes {
            out.push(self.leases(v).await?);
        }
        Ok(out)
    }

    /// Ends a host's lease on a volume (with `only_if`, only a lease in that state: storaged
    /// decides under the volume's lease lock and refuses otherwise).
    pub async fn revoke(&self, volume: &str, req: &RevokeRequest) -> Result<LeaseView, HttpError> {
        self.post(&format!("/v1/volumes/{volume}/leases/revoke"), Some(req))
            .await
    }

    /// Ends every lease `host` holds on `volume`; with `only_if`, only a lease in that state.
    pub async fn revoke_host(
        &self,
        volume: &str,
        host: &str,
        only_if: Option<LeaseState>,
    ) -> Result<LeaseView, HttpError> {
        let req = RevokeRequest {
            host: host.to_string(),
            only_if,
        };
        self.revoke(volume, &req).await
    }

    /// The state `host` holds on `volume`, if any (see [`LeaseView::state_of`]).
    pub async fn state_of(
        &self,
        volume: &str,
        host: &str,
    ) -> Result<Option<LeaseState>, HttpError> {
        Ok(self.leases(volume).await?.state_of(host))
    }
}
