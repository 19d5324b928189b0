//! Cluster mode (`storaged serve --etcd ENDPOINTS --node-id ID`): volumes replicated on
//! several storaged nodes, with etcd holding who holds what.
//!
//! # What etcd holds
//! - `/vmhop/nodes/<id>`: a node's addresses (NBD, REST, replication), attached to the node's
//!   etcd lease (its *session*), so a dead node's record disappears after the lease TTL.
//! - `/vmhop/placement/<volume>`: the volume's configuration and the nodes that hold a copy
//!   ([`Placement`]), written once when the volume is created (`volume create --replicas N`
//!   places it on N live nodes, the creating node first).
//! - `/vmhop/insync/<volume>`: the in-sync set ([`InSync`]): the copies known to hold every
//!   acknowledged write. Only its members may become master.
//! - `/vmhop/election/<volume>`: etcd's election for the volume's master; every member of the
//!   in-sync set campaigns with its session lease.
//!
//! # Terms and fencing
//! The master's *term* is the create revision of its election key. etcd revisions only grow,
//! so a later master always has a higher term. The term is a fencing token twice over:
//! - every change the master makes in etcd (the in-sync set) is a transaction that requires
//!   its election key to still exist with that create revision: a deposed master's
//!   transactions fail;
//! - every replication stream opens with the term ([`wire`]); a slave accepts it only when it
//!   equals the create revision of the current leader key in etcd *and* is at least the
//!   highest term it has seen for the volume, and it refuses every op of a stream whose term
//!   has since been overtaken. A deposed master therefore cannot get a write acknowledged by a
//!   slave that has heard of its successor.
//!
//! # The master's lease and clocks
//! A master whose etcd session may have expired stops serving before a successor can be
//! elected; the argument (timeouts, the assumption on clock rates, what happens when etcd is
//! lost) is in [`election`].
//!
//! # Replication
//! The master applies each WRITE / WRITE_ZEROES / TRIM / FLUSH locally and sends it to every
//! in-sync slave, in one order for all copies (a per-volume ordering lock), and replies to the
//! client only when its own copy and every slave acknowledged. A slave acknowledges an op when
//! it is applied to its file: in its page cache for a plain write (which survives the crash of
//! a process; NBD only promises durability at FLUSH or FUA), durable for FUA and FLUSH, which
//! the slave executes as such. A slave that fails or times out is removed from the in-sync set
//! (a fenced etcd transaction) before the client gets its reply; if that transaction fails,
//! the master is no longer master and the client gets no reply (its connection is closed).
//!
//! At the first election of a volume (no master ever; every copy is empty) the in-sync set is
//! every placed node. After a failover the new master keeps only itself in the set: a write
//! that was in flight when the old master died may have reached some copies and not others,
//! and the slaves cannot tell. Every copy outside the set (those, and any slave that died,
//! restarted or fell behind) is brought back by [`resync`] (a full copy from the master while
//! clients write, then a guarded transaction adds it to the set); a slave applies the ops of
//! one stream per volume at a time (a newer stream stops the older one before it applies
//! anything), so that nothing an old stream had buffered lands after the copy.
//!
//! # Leases
//! A replicated volume's lease table (primary / standby / deactivated, epochs) lives in etcd
//! at `/vmhop/leases/<volume>`; the master reads it when its term starts and changes it only
//! with transactions guarded by its term ([`leases`]), so a deposed master can neither grant
//! nor flip. Any node answers lease queries (from etcd when it is not the master). A client
//! that reconnects to a new master asks for the lease it held and finds it there.
//!
//! Not replicated (yet): a volume's access policy (`PUT /v1/volumes/{id}/access`) is kept by
//! the node that receives it; armed flips live in the master's memory and end with its term.

pub mod api;
pub mod election;
pub mod follower;
pub mod leases;
pub mod placement;
pub mod replica;
pub mod resync;
pub mod role;
pub mod session;
pub mod wire;

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
pub use storaged_client::cluster::{InSync, MasterHint, Placement};
use thiserror::Error;

use crate::registry::{Registry, RegistryError};

/// Prefix of every key the cluster writes.
pub const PREFIX: &str = "/vmhop/";

/// The key of a node's record.
pub fn node_key(node: &str) -> String {
    format!("{PREFIX}nodes/{node}")
}
/// The key of a volume's placement.
pub fn placement_key(volume: &str) -> String {
    format!("{PREFIX}placement/{volume}")
}
/// The key of a volume's in-sync set.
pub fn insync_key(volume: &str) -> String {
    format!("{PREFIX}insync/{volume}")
}
/// The key of a replicated volume's lease table (see [`leases`]).
pub fn lease_key(volume: &str) -> String {
    format!("{PREFIX}leases/{volume}")
}
/// The election name of a volume (etcd's election keys live under it).
pub fn election_name(volume: &str) -> String {
    format!("{PREFIX}election/{volume}")
}

/// A cluster operation that failed.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// etcd refused or could not be reached.
    #[error("etcd")]
    Etcd(#[from] etcd_client::Error),
    /// A record in etcd is not what this version writes.
    #[error("record {0} in etcd")]
    Record(String, #[source] serde_json::Error),
    /// Fewer live nodes than copies asked for.
    #[error("{wanted} copies asked for but only {live} nodes are live")]
    TooFewNodes {
        /// Copies asked for.
        wanted: usize,
        /// Live nodes.
        live: usize,
    },
    /// The volume exists already.
    #[error("volume {0} already exists in the cluster")]
    Exists(String),
    /// The volume is not placed anywhere.
    #[error("no volume named {0} in the cluster")]
    NotFound(String),
    /// The volume is placed on other nodes only.
    #[error("volume {0} has no copy on this node")]
    NotPlacedHere(String),
    /// The local registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// This node has no etcd session at the moment.
    #[error("no etcd session")]
    NoSession,
    /// A fenced transaction failed: this node is no longer the volume's master.
    #[error("no longer master of {0}")]
    Deposed(String),
}

/// The settings of cluster mode.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://host:port`).
    pub endpoints: Vec<String>,
    /// This node's id (unique in the cluster).
    pub node_id: String,
    /// TTL of this node's etcd lease.
    pub lease_ttl: Duration,
    /// How long the master waits for a slave's ack before dropping it from the in-sync set.
    pub replication_timeout: Duration,
}

/// A node's record in etcd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// NBD address clients connect to.
    pub nbd: SocketAddr,
    /// REST API address.
    pub api: SocketAddr,
    /// Replication listener.
    pub repl: SocketAddr,
}

/// What the cluster parts of one node share.
pub struct Cluster {
    /// Settings.
    pub config: ClusterConfig,
    /// etcd (cheap to clone: one channel underneath).
    pub etcd: etcd_client::Client,
    /// The local volumes.
    pub reg: Arc<Registry>,
    /// This node's addresses.
    pub record: NodeRecord,
    /// This node's etcd session.
    pub session: session::SessionWatch,
    /// Per volume, the highest master term a replication stream presented here.
    pub(crate) seen_terms: Mutex<HashMap<String, i64>>,
    /// The volumes whose election task runs.
    pub(crate) elections: Mutex<HashSet<String>>,
    /// Mutual TLS of the replication streams, when storaged has a TLS directory.
    pub(crate) tls: Option<ReplTls>,
    /// Per volume, the generation of the replication stream allowed to apply ops here (see
    /// [`follower`]); held while an op is applied.
    pub(crate) appliers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<u64>>>>,
    /// Per volume, where its master was last found ([`Cluster::master_of`]).
    masters: Mutex<HashMap<String, (std::time::Instant, Option<MasterHint>)>>,
}

/// The master of `vol` as last found, without asking etcd (for answers that cannot wait).
pub fn cached_master(vol: &crate::volume::Volume) -> Option<MasterHint> {
    let cluster = vol.role.get().cluster()?;
    let masters = cluster.masters.lock().expect("masters lock");
    masters.get(&vol.config.name).and_then(|(_, h)| h.clone())
}

/// The replication streams' TLS: the host's certificates of the NBD port (see the module
/// docs). Both sides present their host certificate; the node id is the host id.
#[derive(Clone)]
pub struct ReplTls {
    /// Accepts a master's stream; its client certificate is required.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Opens a stream to a slave, checking its certificate against its node id.
    pub connector: tokio_rustls::TlsConnector,
}

impl ReplTls {
    /// From the host's TLS directory.
    pub fn new(host: &vmhop_common::tls::HostTls) -> Result<ReplTls, vmhop_common::tls::TlsError> {
        let server = host.server_config(vmhop_common::tls::ClientCert::Required)?;
        Ok(ReplTls {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            connector: tokio_rustls::TlsConnector::from(host.client_config()?),
        })
    }
}

impl Cluster {
    /// This node's id.
    pub fn node(&self) -> &str {
        &self.config.node_id
    }

    /// Where this node is, as a client is told of a volume's master.
    pub fn hint(&self) -> MasterHint {
        MasterHint {
            node: self.node().to_string(),
            nbd: self.record.nbd.to_string(),
            api: self.record.api.to_string(),
        }
    }

    /// A handle on etcd.
    pub fn etcd(&self) -> etcd_client::Client {
        self.etcd.clone()
    }

    /// Whether this node's etcd session is certainly alive (see [`session`]).
    pub fn has_session(&self) -> bool {
        self.session.borrow().as_ref().is_some_and(|s| s.valid())
    }

    /// A newly elected master's step before it serves: its term becomes the highest seen for
    /// the volume and every replication stream applying to its copy stops (after the op in
    /// progress, if any).
    pub(crate) async fn supersede_streams(&self, volume: &str, term: i64) {
        {
            let mut seen = self.seen_terms.lock().expect("terms lock");
            let t = seen.entry(volume.to_string()).or_insert(0);
            *t = (*t).max(term);
        }
        let applier = self.applier(volume);
        *applier.lock().await += 1;
    }

    /// Where `volume`'s master is (etcd's election and the master's node record), asked at
    /// most once a second per volume; `None` while none is elected or etcd does not answer.
    pub async fn master_of(&self, volume: &str) -> Option<MasterHint> {
        let fresh = Duration::from_secs(1);
        if let Some((at, hint)) = self.masters.lock().expect("masters lock").get(volume) {
            if at.elapsed() < fresh {
                return hint.clone();
            }
        }
        let lookup = async {
            let (_, node) = follower::elected(self, volume).await.ok()?;
            let key = node_key(&node);
            let resp = get(&self.etcd(), key.clone(), None).await.ok()?;
            let rec: NodeRecord = parse(&key, resp.kvs().first()?.value()).ok()?;
            Some(MasterHint {
                node,
                nbd: rec.nbd.to_string(),
                api: rec.api.to_string(),
            })
        };
        let hint = tokio::time::timeout(self.config.lease_ttl, lookup)
            .await
            .ok()
            .flatten()
            .filter(|h| h.node != self.node());
        let mut masters = self.masters.lock().expect("masters lock");
        masters.insert(
            volume.to_string(),
            (std::time::Instant::now(), hint.clone()),
        );
        hint
    }

    /// The applier lock of a volume's replication streams.
    pub(crate) fn applier(&self, volume: &str) -> Arc<tokio::sync::Mutex<u64>> {
        let mut a = self.appliers.lock().expect("appliers lock");
        a.entry(volume.to_string()).or_default().clone()
    }
}

/// gRPC's status code `UNAVAILABLE`.
const GRPC_UNAVAILABLE: i32 = 14;

/// Attempts of one etcd call that could not be sent ([`unsent`]).
const SEND_ATTEMPTS: usize = 8;

/// Whether etcd's client failed before it sent the request: it could not connect to the
/// endpoint it picked (a member that is down). Such a call had no effect, so it may be made
/// again, a transaction too; any other failure may have come after etcd applied it.
fn unsent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_UNAVAILABLE && s.message().contains("connect error")
        }
        _ => false,
    }
}

/// Runs the etcd call `f` until it is sent: the client spreads calls over every endpoint, and
/// one that went to a member that is down is made again (on another, as the client's balancer
/// picks), so that a lost member out of several changes nothing.
pub(crate) async fn sent<T, F, Fut>(f: F) -> Result<T, etcd_client::Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if unsent(&e) && attempt < SEND_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
}

/// etcd's `get`, made again while it could not be sent (see [`sent`]).
pub(crate) async fn get(
    etcd: &etcd_client::Client,
    key: impl Into<Vec<u8>>,
    opts: Option<etcd_client::GetOptions>,
) -> Result<etcd_client::GetResponse, etcd_client::Error> {
    let key = key.into();
    sent(|| {
        let (mut etcd, key, opts) = (etcd.clone(), key.clone(), opts.clone());
        async move { etcd.get(key, opts).await }
    })
    .await
}

/// etcd's `txn`, made again while it could not be sent (see [`sent`]).
pub(crate) async fn txn(
    etcd: &etcd_client::Client,
    txn: etcd_client::Txn,
) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
    sent(|| {
        let (mut etcd, txn) = (etcd.clone(), txn.clone());
        async move { etcd.txn(txn).await }
    })
    .await
}

/// Parses a JSON record read from etcd.
pub(crate) fn parse<T: for<'a> Deserialize<'a>>(key: &str, v: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(v).map_err(|e| ClusterError::Record(key.to_string(), e))
}

/// Connects to etcd, starts the session, the placement watcher (which starts an election per
/// local volume) and the replication listener.
pub async fn start(
    config: ClusterConfig,
    reg: Arc<Registry>,
    record: NodeRecord,
    repl: tokio::net::TcpListener,
    tls: Option<ReplTls>,
) -> Result<Arc<Cluster>, ClusterError> {
    let etcd = etcd_client::Client::connect(&config.endpoints, None).await?;
    let session = session::start(etcd.clone(), &config, &record).await?;
    let cluster = Arc::new(Cluster {
        config,
        etcd,
        reg,
        record,
        session,
        seen_terms: Default::default(),
        elections: Default::default(),
        tls,
        appliers: Default::default(),
        masters: Default::default(),
    });
    cluster.reg.set_cluster(&cluster);
    tokio::spawn(follower::serve(repl, cluster.clone()));
    placement::start(cluster.clone()).await?;
    Ok(cluster)
}
