//! The client of storaged's REST API (the routes are in [`crate::api`]): what storaged's CLI,
//! migrated and the tests use to manage volumes and leases. Every call has a deadline.
//!
//! A storaged cluster has one API per node: the client takes their addresses as a
//! comma-separated list. Any node answers (reads from etcd; a change goes to the volume's
//! master by a redirect), so a call goes to the node that answered last and moves on to the
//! next only when a node cannot be reached at all ([`HttpError::Connect`]: refused, or not
//! accepted within [`vmhop_common::http::CONNECT_TIMEOUT`], as for a node cut off by the
//! network; nothing was sent, so no change can be made twice). An answer that times out is not retried elsewhere: its
//! outcome is unknown, and the caller reads the leases back before deciding anything. A change
//! of a set of volumes mastered on different nodes goes to each master in its part
//! ([`crate::group`]).

use crate::api::{
    ArmedFlip, FlipReport, FlipRequest, GroupFlipReport, GroupFlipRequest, GroupRevokeRequest,
    GroupRollbackRequest, LeaseState, LeaseView, RevokeRequest, RollbackRequest, VolumeAccess,
    VolumeConfig, VolumeInfo,
};
use crate::group::{self, GroupAnswer, GroupChange};
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// A client of storaged's REST API: one node's, or any of a cluster's nodes'.
#[derive(Debug, Clone)]
pub struct StoragedApi {
    /// One client per node, in the order given.
    nodes: Vec<Client>,
    /// The node that answered last (where the next call goes first).
    current: Arc<AtomicUsize>,
}

impl StoragedApi {
    /// A client for the API at `addr` (`host:port`, or a cluster's nodes as
    /// `host:port,host:port,...`), sending the cluster's `token` when storaged requires one.
    pub fn new(addr: &str, token: Option<Token>) -> StoragedApi {
        let nodes = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                Client::new(Target::Tcp(a.to_string()), DEFAULT_TIMEOUT).with_token(token.clone())
            })
            .collect();
        StoragedApi {
            nodes,
            current: Arc::default(),
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> StoragedApi {
        StoragedApi {
            nodes: self.nodes.iter().map(|c| c.with_timeout(timeout)).collect(),
            current: self.current.clone(),
        }
    }

    /// `f` on the node that answered last, then on each other node in turn while the one
    /// tried cannot be reached (see the module's documentation).
    async fn on_any<'a, R, F, Fut>(&'a self, f: F) -> Result<R, HttpError>
    where
        F: Fn(&'a Client) -> Fut,
        Fut: std::future::Future<Output = Result<R, HttpError>>,
    {
        let n = self.nodes.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (first + i) % n;
            match f(&self.nodes[at]).await {
                Err(e @ HttpError::Connect(..)) => {
                    if n > 1 {
                        tracing::warn!(error = %e, "storaged node unreachable, trying the next");
                    }
                    last = Some(e);
                }
                answer => {
                    self.current.store(at, Ordering::Relaxed);
                    return answer;
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            let none = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address");
            HttpError::Connect("storaged".into(), none)
        }))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, HttpError> {
        self.on_any(|c| c.call(method.clone(), path, body)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, HttpError> {
        self.call(Method::POST, path, body).await
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
        self.call(
            Method::PUT,
            &format!("/v1/volumes/{name}/access"),
            Some(access),
        )
        .await
    }

    /// Deletes a volume without open connections (its data is removed).
    pub async fn delete_volume(&self, name: &str) -> Result<(), HttpError> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/volumes/{name}"), None::<&()>)
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
        self.call(
            Method::DELETE,
            &format!("/v1/volumes/{volume}/flip{query}"),
            None::<&()>,
        )
        .await
    }

    /// A change of a set of volumes (sent on `conn` when there is one): one request, or one
    /// per master when the volumes are mastered on different nodes (see [`crate::group`]).
    async fn group<Req: GroupChange, Resp: GroupAnswer>(
        &self,
        conn: Option<Prepared>,
        path: &str,
        req: &Req,
    ) -> Result<Resp, HttpError> {
        let answer = match conn {
            Some(c) => c.call(Method::POST, path, Some(req)).await,
            None => self.post(path, Some(req)).await,
        };
        match answer {
            Err(e) if group::masters_of(&e).is_some() => {
                let at = self.current.load(Ordering::Relaxed) % self.nodes.len().max(1);
                match self.nodes.get(at) {
                    Some(node) => group::split(node, path, req, e).await,
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// Flips a set of volumes as one decision (see [`GroupFlipRequest`]); on a cluster whose
    /// masters of these volumes differ, one decision per master (see [`crate::group`]).
    pub async fn flip_group(&self, req: &GroupFlipRequest) -> Result<GroupFlipReport, HttpError> {
        self.group(None, "/v1/leases/flip", req).await
    }

    /// A connection opened ahead of a call whose latency matters (see [`Prepared`]).
    pub async fn prepare(&self) -> Result<Prepared, HttpError> {
        self.on_any(Client::prepare).await
    }

    /// [`Self::flip_group`] on `conn` (from [`Self::prepare`]) when there is one.
    pub async fn flip_group_on(
        &self,
        conn: Option<Prepared>,
        req: &GroupFlipRequest,
    ) -> Result<GroupFlipReport, HttpError> {
        self.group(conn, "/v1/leases/flip", req).await
    }

    /// Ends a host's standby leases on a set of volumes as one decision (see
    /// [`GroupRevokeRequest`]); answers the volumes' lease views after it.
    pub async fn revoke_group(
        &self,
        req: &GroupRevokeRequest,
    ) -> Result<Vec<LeaseView>, HttpError> {
        self.group(None, "/v1/leases/revoke", req).await
    }

    /// Undoes the flips of a set of volumes as one decision (see [`GroupRollbackRequest`]; one
    /// per master as [`Self::flip_group`]).
    pub async fn rollback_group(
        &self,
        req: &GroupRollbackRequest,
    ) -> Result<GroupFlipReport, HttpError> {
        self.group(None, "/v1/leases/rollback", req).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A node that answers every request with `{"ok":true}`; returns its address and how many
    /// requests it answered.
    async fn node() -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                count.fetch_add(1, Ordering::SeqCst);
                let body = r#"{"ok":true}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (addr, served)
    }

    /// An address nothing listens on (bound, then released).
    fn dead() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn a_call_moves_to_the_next_node_when_one_is_unreachable() {
        let (live, served) = node().await;
        let api = StoragedApi::new(&format!("{},{live}", dead()), None);
        api.health().await.unwrap();
        api.health().await.unwrap();
        // The second call went straight to the node that answered.
        assert_eq!(served.load(Ordering::SeqCst), 2);
        assert_eq!(api.current.load(Ordering::SeqCst), 1);
        // One address that cannot be reached: the error says so.
        let e = StoragedApi::new(&dead(), None).health().await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
    }

    /// An address whose listener takes no more connections: its accept queue is full and
    /// never drained, so the kernel drops further SYNs, as for a node cut off by the network.
    /// Returns the address and what must live as long as it is used.
    fn silent() -> (String, tokio::net::TcpListener, Vec<std::net::TcpStream>) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sock.local_addr().unwrap();
        let listener = sock.listen(0).unwrap();
        // The queue takes backlog + 1 connections; the connects after those hang.
        let mut filled = Vec::new();
        while let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            filled.push(s);
            assert!(filled.len() < 64, "the accept queue never filled");
        }
        (addr.to_string(), listener, filled)
    }

    #[tokio::test]
    async fn a_call_moves_on_from_a_node_that_takes_no_connection() {
        let (cut_off, _listener, _filled) = silent();
        let (live, served) = node().await;
        let api = StoragedApi::new(&format!("{cut_off},{live}"), None);
        api.health().await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 1);
        let e = StoragedApi::new(&cut_off, None).health().await.unwrap_err();
        assert!(matches!(e, HttpError::Connect(..)), "{e}");
    }
}
