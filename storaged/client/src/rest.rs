//! The client of storaged's REST API (the routes are in [`crate::api`]): what storaged's CLI,
//! migrated and the tests use to manage volumes and leases. Every call has a deadline.
//!
//! A storaged cluster has one API per node: the client takes their addresses as a
//! comma-separated list. Any node answers (reads from etcd; a change goes to the volume's
//! master by a redirect), so a call goes to the node that answered last and moves on to the
//! next only when a node cannot be reached at all ([`HttpError::Connect`]: refused, or not
//! accepted within [`vmhop_common::http::CONNECT_TIMEOUT`], as for a node cut off by the
//! network; nothing was sent, so no change can be made twice). An answer that times out is not
//! retried elsewhere: its outcome is unknown, and the caller reads the leases back before
//! deciding anything. A change of a set of volumes mastered on different nodes goes to each
//! master in its part ([`crate::group`]).
//!
//! Between two masters of a volume (the master died and its etcd lease has not yet expired, or
//! the survivors are electing the next), a node either redirects to the dead master, which
//! cannot be reached, or answers `503 Service Unavailable`; neither made any change. When a
//! round over the nodes ends that way, the call is made again, rounds apart, for at most
//! [`ELECTION_WAIT`] ([`StoragedApi::with_election_wait`]): a lease change sent in those
//! seconds (a migration's flip, say) waits for the new master instead of failing. Nodes that
//! are all unreachable themselves are no election: that error is answered at once.

use crate::api::{
    ArmedFlip, FlipReport, FlipRequest, GroupFlipReport, GroupFlipRequest, GroupRevokeRequest,
    GroupRollbackRequest, LeaseState, LeaseView, RevokeRequest, RollbackRequest, VolumeAccess,
    VolumeConfig, VolumeInfo,
};
use crate::group::{self, GroupAnswer, GroupChange};
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmhop_common::http::{Client, HttpError, Prepared, Target};
use vmhop_common::token::Token;

/// Default deadline of one call (a flip waits for the old primary's admitted requests).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time a call waits for a volume's next master (see the module's documentation):
/// twice storaged's default etcd lease TTL (5 s), within which a dead master's mastership
/// ends, and the election after it.
pub const ELECTION_WAIT: Duration = Duration::from_secs(12);

/// The pause between two rounds over the nodes while a master is elected.
const ROUND_PAUSE: Duration = Duration::from_millis(100);

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
    /// How long a call waits for a volume's next master.
    election_wait: Duration,
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
            election_wait: ELECTION_WAIT,
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> StoragedApi {
        StoragedApi {
            nodes: self.nodes.iter().map(|c| c.with_timeout(timeout)).collect(),
            ..self.clone()
        }
    }

    /// The same client waiting at most `wait` for a volume's next master (zero: not at all).
    pub fn with_election_wait(&self, wait: Duration) -> StoragedApi {
        StoragedApi {
            election_wait: wait,
            ..self.clone()
        }
    }

    /// `f` on the node that answered last, then on each other node in turn while the one
    /// tried cannot be reached; rounds again while the nodes are between two masters (see the
    /// module's documentation).
    async fn on_any<'a, R, F, Fut>(&'a self, f: F) -> Result<R, HttpError>
    where
        F: Fn(&'a Client) -> Fut,
        Fut: std::future::Future<Output = Result<R, HttpError>>,
    {
        let deadline = Instant::now() + self.election_wait;
        loop {
            match self.round(&f).await {
                Err(Round::Electing(e)) if Instant::now() + ROUND_PAUSE < deadline => {
                    tracing::info!(error = %e, "storaged is electing a volume's master; asking again");
                    tokio::time::sleep(ROUND_PAUSE).await;
                }
                Err(Round::Electing(e) | Round::Unreachable(e)) => return Err(e),
                Ok(answer) => return answer,
            }
        }
    }

    /// One round of [`Self::on_any`]: an answer (which may be an error answer), or why there
    /// was none.
    async fn round<'a, R, F, Fut>(&'a self, f: &F) -> Result<Result<R, HttpError>, Round>
    where
        F: Fn(&'a Client) -> Fut,
        Fut: std::future::Future<Output = Result<R, HttpError>>,
    {
        let n = self.nodes.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut unreachable = None;
        let mut electing = None;
        for i in 0..n {
            let at = (first + i) % n;
            let node = &self.nodes[at];
            match f(node).await {
                Err(e) if between_masters(&e, node) => {
                    if n > 1 {
                        tracing::warn!(error = %e, "no master of the volume at this node, trying the next");
                    }
                    electing = Some(e);
                }
                Err(e @ HttpError::Connect(..)) => {
                    if n > 1 {
                        tracing::warn!(error = %e, "storaged node unreachable, trying the next");
                    }
                    unreachable = Some(e);
                }
                answer => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(answer);
                }
            }
        }
        Err(match (electing, unreachable) {
            (Some(e), _) => Round::Electing(e),
            (None, Some(e)) => Round::Unreachable(e),
            (None, None) => {
                let none = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address");
                Round::Unreachable(HttpError::Connect("storaged".into(), none))
            }
        })
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
            // The connection was made: a connection error is a redirect's, to a dead master.
            Some(c) => match c.call(Method::POST, path, Some(req)).await {
                Err(e) if matches!(e, HttpError::Connect(..)) || electing(&e) => {
                    self.post(path, Some(req)).await
                }
                answer => answer,
            },
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

/// Why a round over the nodes had no answer.
enum Round {
    /// A node had no master to send the call to (see [`between_masters`]).
    Electing(HttpError),
    /// No node could be reached.
    Unreachable(HttpError),
}

/// Whether `e`, the error of a call to `node`, says the volume is between two masters: `node`
/// answered `503` saying a master is being elected, or sent the call on to a master that
/// cannot be reached (a redirect whose target refused it). Either way nothing changed.
fn between_masters(e: &HttpError, node: &Client) -> bool {
    match e {
        HttpError::Connect(target, _) => *target != node.target().to_string(),
        _ => electing(e),
    }
}

/// Whether `e` is a `503` answer saying the volume's master is being elected
/// ([`crate::api::ErrorBody::electing`]).
fn electing(e: &HttpError) -> bool {
    e.status() == Some(StatusCode::SERVICE_UNAVAILABLE)
        && e.details()
            .and_then(|d| d.get("electing"))
            .and_then(serde_json::Value::as_bool)
            == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A node that answers every request with `{"ok":true}`; returns its address and how many
    /// requests it answered.
    async fn node() -> (String, Arc<AtomicUsize>) {
        scripted(Vec::new()).await
    }

    /// A node that answers its requests with `answers` (status line, JSON body) in order, then
    /// with `200 {"ok":true}`; returns its address and how many requests it answered.
    async fn scripted(answers: Vec<(&'static str, String)>) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let i = count.fetch_add(1, Ordering::SeqCst);
                let (status, body) = answers
                    .get(i)
                    .cloned()
                    .unwrap_or(("200 OK", r#"{"ok":true}"#.to_string()));
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (addr, served)
    }

    /// A redirect to the master at `to`.
    fn redirect(to: &str) -> (&'static str, String) {
        let body = format!(r#"{{"error":"not master","redirect":"{to}"}}"#);
        ("307 Temporary Redirect", body)
    }

    /// A `503` answer, saying a master is being elected or not.
    fn unavailable(electing: bool) -> (&'static str, String) {
        let body = format!(r#"{{"error":"no master","electing":{electing}}}"#);
        ("503 Service Unavailable", body)
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

    #[tokio::test]
    async fn a_call_sent_on_to_a_dead_master_is_made_again_until_the_next_master_answers() {
        let dead_master = dead();
        let (slave, served) = scripted(vec![redirect(&dead_master); 3]).await;
        let api = StoragedApi::new(&format!("{slave},{dead_master}"), None);
        api.health().await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 4);
        // Prepared on the slave, as a migration's flip is: the same wait.
        let mut answers = vec![redirect(&dead_master); 2];
        answers.push(("200 OK", "[]".to_string()));
        let (slave, served) = scripted(answers).await;
        let api = StoragedApi::new(&slave, None);
        let req = GroupRevokeRequest {
            host: "h".into(),
            volumes: vec!["v".into()],
            primary: None,
            migration: None,
        };
        let conn = api.prepare().await.unwrap();
        let views: Vec<LeaseView> = api
            .group(Some(conn), "/v1/leases/revoke", &req)
            .await
            .unwrap();
        assert!(views.is_empty());
        assert_eq!(served.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_answer_that_a_master_is_being_elected_is_asked_again() {
        let (node, served) = scripted(vec![unavailable(true); 2]).await;
        StoragedApi::new(&node, None).health().await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 3);
        // Any other 503 (etcd out of reach, say) is the answer.
        let (node, served) = scripted(vec![unavailable(false)]).await;
        let e = StoragedApi::new(&node, None).health().await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{e}");
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_wait_for_a_master_ends() {
        let dead_master = dead();
        let (slave, served) = scripted(vec![redirect(&dead_master); 1000]).await;
        let api = StoragedApi::new(&slave, None).with_election_wait(Duration::from_millis(500));
        let e = api.health().await.unwrap_err();
        assert!(
            matches!(&e, HttpError::Connect(to, _) if *to == dead_master),
            "{e}"
        );
        assert!(served.load(Ordering::SeqCst) > 1);
        // No wait at all: one round.
        let (slave, served) = scripted(vec![redirect(&dead_master); 1000]).await;
        let api = StoragedApi::new(&slave, None).with_election_wait(Duration::ZERO);
        api.health().await.unwrap_err();
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }
}
