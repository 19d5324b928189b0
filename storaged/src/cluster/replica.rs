//! The master's side of replication: one [`Link`] per in-sync slave, and [`Replicas::apply`],
//! which runs a client's write on every copy in one order and returns once all have it.

use super::wire::{self, Ack, Hello, HelloReply, OpHeader, Status};
use super::{insync_key, node_key, parse, Cluster, ClusterError, InSync, NodeRecord};
use crate::cluster::session::Session;
use crate::volume::VolumeFile;
use bytes::Bytes;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use storaged_client::stream::NbdStream;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

/// Ops queued per link before a writer waits.
const LINK_QUEUE: usize = 256;

/// A replicated write that failed.
#[derive(Debug, Error)]
pub enum ReplicaError {
    /// The master's own copy failed: the client gets an I/O error.
    #[error("local copy")]
    Io(#[source] std::io::Error),
    /// This node is no longer master (or cannot prove it): the client must go elsewhere.
    #[error("no longer master of the volume")]
    Fenced,
}

/// Why a replication stream to a slave could not be opened, or why a slave could not join
/// the in-sync set through it.
#[derive(Debug, Error)]
pub enum LinkError {
    /// etcd could not say where the slave listens.
    #[error("etcd")]
    Etcd(#[source] etcd_client::Error),
    /// The slave's record in etcd.
    #[error(transparent)]
    Record(ClusterError),
    /// The slave has no record in etcd.
    #[error("the node is not live (no record in etcd)")]
    NotLive,
    /// Connecting, TLS or the hello.
    #[error("opening the stream")]
    Open(#[source] wire::WireError),
    /// The slave did not answer the hello, or an op, within the replication timeout.
    #[error("no answer within the replication timeout")]
    Timeout,
    /// The slave refused the stream (e.g. it knows a newer term).
    #[error("the slave refused the stream ({status:?}, its term {term})")]
    Refused {
        /// The slave's answer.
        status: Status,
        /// The term the slave knows.
        term: u64,
    },
    /// The slave answered an op with anything but `Ok`.
    #[error("the slave answered {0:?}")]
    Answered(Status),
    /// The stream ended (or failed) under the op.
    #[error("the stream ended")]
    Ended,
    /// This node stopped being the volume's master.
    #[error("the mastership ended")]
    MastershipEnded,
    /// Reading the master's own copy for a resync.
    #[error("reading the master's copy")]
    Read(#[source] std::io::Error),
    /// Writing the new in-sync set to etcd.
    #[error("writing the in-sync set")]
    InSync(#[source] ClusterError),
}

/// One replicated command.
#[derive(Debug, Clone)]
pub enum Op {
    /// `NBD_CMD_WRITE`.
    Write {
        /// Offset.
        offset: u64,
        /// Data.
        data: Bytes,
        /// FUA.
        fua: bool,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    Zeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Keep allocated.
        no_hole: bool,
        /// FUA.
        fua: bool,
        /// NBD's FAST_ZERO: fail with `ENOTSUP` rather than write zeroes. Only the master's
        /// copy is asked so (first, see [`Replicas::apply`]); the slaves always zero the range.
        fast: bool,
    },
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// FUA.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
}

impl Op {
    /// Runs the op on a copy (blocking).
    pub fn apply(&self, file: &VolumeFile) -> std::io::Result<()> {
        match self {
            Op::Write { offset, data, fua } => file.write_at(data, *offset, *fua),
            Op::Zeroes {
                offset,
                len,
                no_hole,
                fua,
                fast,
            } => file.write_zeroes(*offset, *len as u64, *no_hole, *fua, *fast),
            Op::Trim { offset, len, fua } => {
                file.trim(*offset, *len as u64).and_then(
                    |()| {
                        if *fua {
                            file.flush()
                        } else {
                            Ok(())
                        }
                    },
                )
            }
            Op::Flush => file.flush(),
        }
    }

    /// The op as received on a replication stream.
    pub fn from_wire(h: &OpHeader, data: Bytes) -> Op {
        let fua = h.flags & wire::FLAG_FUA != 0;
        match h.kind {
            wire::OP_WRITE => Op::Write {
                offset: h.offset,
                data,
                fua,
            },
            wire::OP_WRITE_ZEROES => Op::Zeroes {
                offset: h.offset,
                len: h.length,
                no_hole: h.flags & wire::FLAG_NO_HOLE != 0,
                fua,
                fast: false,
            },
            wire::OP_TRIM => Op::Trim {
                offset: h.offset,
                len: h.length,
                fua,
            },
            _ => Op::Flush,
        }
    }

    /// The frame of the op: header and, for a write, its data.
    fn frame(&self, seq: u64) -> Vec<u8> {
        let flag = |fua: bool| if fua { wire::FLAG_FUA } else { 0 };
        let (kind, flags, offset, length) = match self {
            Op::Write { offset, data, fua } => {
                (wire::OP_WRITE, flag(*fua), *offset, data.len() as u32)
            }
            Op::Zeroes {
                offset,
                len,
                no_hole,
                fua,
                ..
            } => {
                let nh = if *no_hole { wire::FLAG_NO_HOLE } else { 0 };
                (wire::OP_WRITE_ZEROES, flag(*fua) | nh, *offset, *len)
            }
            Op::Trim { offset, len, fua } => (wire::OP_TRIM, flag(*fua), *offset, *len),
            Op::Flush => (wire::OP_FLUSH, 0, 0, 0),
        };
        let h = OpHeader {
            kind,
            flags,
            seq,
            offset,
            length,
        };
        let mut v = h.encode().to_vec();
        if let Op::Write { data, .. } = self {
            v.extend_from_slice(data);
        }
        v
    }
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Ack>>>>;

/// The stream to one slave.
pub(crate) struct Link {
    pub(crate) node: String,
    /// How long a send may wait for room in the queue (a slave that stopped reading).
    stall: std::time::Duration,
    tx: mpsc::Sender<(u64, Vec<u8>, oneshot::Sender<Ack>)>,
    next: AtomicU64,
    /// Client writes wait for this slave's acks (an in-sync slave, or a resynced one about to
    /// join); a slave being resynced gets them without anyone waiting.
    pub(crate) counted: AtomicBool,
    /// The stream ended, or the slave answered an op with anything but `Ok`: whatever it
    /// holds can no longer be trusted to be the master's.
    pub(crate) failed: Arc<AtomicBool>,
}

impl Link {
    /// Opens the stream: the hello with the master's term, and the slave's consent.
    pub(crate) async fn open(
        cluster: &Cluster,
        node: &str,
        volume: &str,
        term: i64,
    ) -> Result<Link, LinkError> {
        let key = node_key(node);
        let found = super::get(&cluster.etcd(), key.clone(), None)
            .await
            .map_err(LinkError::Etcd)?;
        let rec: NodeRecord = match found.kvs().first() {
            Some(kv) => parse(&key, kv.value()).map_err(LinkError::Record)?,
            None => return Err(LinkError::NotLive),
        };
        let hello = Hello {
            version: wire::VERSION,
            term: term as u64,
            volume: volume.to_string(),
            from: cluster.node().to_string(),
        };
        let open = async {
            let tcp = TcpStream::connect(rec.repl).await?;
            tcp.set_nodelay(true)?;
            let mut s = NbdStream::Plain(tcp);
            if let Some(tls) = &cluster.tls {
                // The slave proves the node id it is placed under with its host certificate.
                let name = vmhop_common::tls::server_name(node)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                s.connect_tls(&tls.connector, name).await?;
            }
            s.write_all(&hello.encode()?).await?;
            s.flush().await?;
            let mut b = [0u8; wire::HELLO_REPLY_LEN];
            s.read_exact(&mut b).await?;
            Ok::<_, wire::WireError>((s, HelloReply::decode(&b)?))
        };
        let (stream, reply) =
            match tokio::time::timeout(cluster.config.replication_timeout, open).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(LinkError::Open(e)),
                Err(_) => return Err(LinkError::Timeout),
            };
        if reply.status != Status::Ok {
            return Err(LinkError::Refused {
                status: reply.status,
                term: reply.term,
            });
        }
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let failed = Arc::new(AtomicBool::new(false));
        let stall = cluster.config.replication_timeout;
        tokio::spawn(run_link(stream, rx, failed.clone(), stall));
        Ok(Link {
            node: node.to_string(),
            stall,
            tx,
            next: AtomicU64::new(1),
            counted: AtomicBool::new(true),
            failed,
        })
    }

    /// Whether client writes wait for this slave.
    pub(crate) fn counted(&self) -> bool {
        self.counted.load(Ordering::SeqCst)
    }

    /// Queues `op`; the receiver gets the slave's ack (or is dropped if the link fails).
    pub(crate) async fn send(&self, op: &Op) -> Option<oneshot::Receiver<Ack>> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let queued = tokio::time::timeout(self.stall, self.tx.send((seq, op.frame(seq), tx)));
        queued.await.ok()?.ok()?;
        Some(rx)
    }
}

/// Writes queued frames and matches acks to their waiters until either side fails.
async fn run_link(
    stream: NbdStream,
    mut rx: mpsc::Receiver<(u64, Vec<u8>, oneshot::Sender<Ack>)>,
    failed: Arc<AtomicBool>,
    stall: std::time::Duration,
) {
    let (mut rd, mut wr) = stream.into_halves();
    let waiters = Waiters::default();
    let dead = failed;
    let (w2, d2) = (waiters.clone(), dead.clone());
    let reader = tokio::spawn(async move {
        let mut b = [0u8; wire::ACK_LEN];
        while rd.read_exact(&mut b).await.is_ok() {
            let Ok(ack) = Ack::decode(&b) else { break };
            let Some(w) = w2.lock().expect("waiters lock").remove(&ack.seq) else {
                break;
            };
            if ack.status != Status::Ok {
                // Marked before the ack is handed on: whoever sees a later ack sees this.
                d2.store(true, Ordering::SeqCst);
            }
            let _ = w.send(ack);
        }
        d2.store(true, Ordering::SeqCst);
        w2.lock().expect("waiters lock").clear();
    });
    while let Some((seq, frame, waiter)) = rx.recv().await {
        waiters.lock().expect("waiters lock").insert(seq, waiter);
        if dead.load(Ordering::SeqCst) {
            break;
        }
        // A slave that stops reading ends its stream (and its place in the set) in time.
        // Flushed: over TLS the last records of a write can stay in the TLS layer when the
        // socket is full, and the next frame may never come.
        let send = async {
            wr.write_all(&frame).await?;
            wr.flush().await
        };
        match tokio::time::timeout(stall, send).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    dead.store(true, Ordering::SeqCst);
    reader.abort();
}

/// A volume's copies while this node is its master.
pub struct Replicas {
    cluster: Arc<Cluster>,
    volume: String,
    /// The master's term.
    pub term: i64,
    leader_key: Vec<u8>,
    session: Session,
    /// One order for every copy: held while an op is applied here and queued to every link
    /// (and while [`super::resync`] reads a chunk and queues it).
    pub(crate) order: tokio::sync::Mutex<()>,
    pub(crate) links: Mutex<Vec<Arc<Link>>>,
    members: tokio::sync::Mutex<Vec<String>>,
    fenced: watch::Sender<bool>,
    /// The mod revision of the volume's lease table in etcd as this master last read or wrote
    /// it (see [`super::leases`]).
    pub(crate) lease_rev: Mutex<i64>,
}

impl Replicas {
    /// Opens a stream to every member but this node; those that cannot be reached leave the
    /// in-sync set (a fenced transaction) before the master serves anyone.
    pub async fn connect(
        cluster: Arc<Cluster>,
        volume: &str,
        term: i64,
        leader_key: Vec<u8>,
        session: Session,
        members: Vec<String>,
    ) -> Result<Arc<Replicas>, ClusterError> {
        let mut links = Vec::new();
        for m in members.iter().filter(|m| *m != cluster.node()) {
            match Link::open(&cluster, m, volume, term).await {
                Ok(l) => links.push(Arc::new(l)),
                Err(e) => tracing::warn!(target: "storaged::cluster", volume, slave = %m,
                    error = %vmhop_common::error::chain(&e), "no replication stream to an in-sync slave: it leaves the set"),
            }
        }
        let r = Arc::new(Replicas {
            volume: volume.to_string(),
            term,
            leader_key,
            session,
            order: Default::default(),
            links: Mutex::new(links),
            members: tokio::sync::Mutex::new(members.clone()),
            fenced: watch::channel(false).0,
            lease_rev: Mutex::new(0),
            cluster,
        });
        for m in members.iter().filter(|m| *m != r.cluster.node()) {
            if !r
                .links
                .lock()
                .expect("links lock")
                .iter()
                .any(|l| &l.node == m)
            {
                r.drop_member(m).await?;
            }
        }
        Ok(r)
    }

    /// The cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The volume's name.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The key of this master's election (its create revision is the term).
    pub fn leader_key(&self) -> &[u8] {
        &self.leader_key
    }

    /// Ends this mastership: every later write is refused.
    pub fn fence(&self) {
        self.fenced.send_replace(true);
    }

    /// Waits until the mastership ends.
    pub async fn fenced(&self) {
        let mut rx = self.fenced.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }

    /// Whether the mastership ended.
    pub fn is_fenced(&self) -> bool {
        *self.fenced.borrow()
    }

    pub(crate) fn usable(&self) -> bool {
        !*self.fenced.borrow() && self.session.valid()
    }

    /// The slaves' node ids.
    pub fn slaves(&self) -> Vec<String> {
        let links = self.links.lock().expect("links lock");
        links.iter().map(|l| l.node.clone()).collect()
    }

    /// Runs `op` on the local `file` and on every in-sync slave, in the same order on all;
    /// returns once every copy has it. A slave that fails leaves the in-sync set first.
    pub async fn apply(&self, file: Arc<VolumeFile>, op: Op) -> Result<(), ReplicaError> {
        if !self.usable() {
            self.fence();
            return Err(ReplicaError::Fenced);
        }
        let (local, acks) = {
            let _order = self.order.lock().await;
            if let Op::Zeroes { fast: true, .. } = op {
                // A fast zero that the master's copy cannot do fast changes nothing anywhere:
                // run it here first and forward it (as a plain zeroing) only once it is done.
                let o = op.clone();
                let f = file.clone();
                match tokio::task::spawn_blocking(move || o.apply(&f)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(ReplicaError::Io(e)),
                    Err(_) => return Err(ReplicaError::Io(std::io::ErrorKind::Other.into())),
                }
            }
            let links: Vec<Arc<Link>> = self.links.lock().expect("links lock").clone();
            let mut acks = Vec::with_capacity(links.len());
            for l in links {
                let rx = l.send(&op).await;
                // A slave being resynced gets the op in order, and nobody waits for it (its
                // resync learns of a failure from `Link::failed`).
                if l.counted() {
                    acks.push((l, rx));
                }
            }
            let local = match op {
                Op::Zeroes { fast: true, .. } => Ok(Ok(())),
                op => tokio::task::spawn_blocking(move || op.apply(&file)).await,
            };
            (local, acks)
        };
        let timeout = self.cluster.config.replication_timeout;
        for (link, rx) in acks {
            let ack = match rx {
                Some(rx) => tokio::time::timeout(timeout, rx)
                    .await
                    .ok()
                    .and_then(|r| r.ok()),
                None => None,
            };
            match ack {
                Some(a) if a.status == Status::Ok => {}
                Some(a) if a.status == Status::StaleTerm => {
                    tracing::warn!(target: "storaged::cluster", volume = %self.volume,
                        slave = %link.node, term = self.term, seen = a.term,
                        "a slave has seen a newer master: this mastership ends");
                    self.fence();
                    return Err(ReplicaError::Fenced);
                }
                other => {
                    tracing::warn!(target: "storaged::cluster", volume = %self.volume,
                        slave = %link.node, ack = ?other.map(|a| a.status),
                        "slave failed: it leaves the in-sync set");
                    if self.drop_member(&link.node).await.is_err() {
                        self.fence();
                        return Err(ReplicaError::Fenced);
                    }
                }
            }
        }
        match local {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ReplicaError::Io(e)),
            Err(_) => return Err(ReplicaError::Io(std::io::ErrorKind::Other.into())),
        }
        if !self.usable() {
            self.fence();
            return Err(ReplicaError::Fenced);
        }
        Ok(())
    }

    /// Removes a slave from the in-sync set, in etcd first (guarded by this master's term),
    /// then from the links (a slave being resynced, not in the set, only loses its link).
    pub(crate) async fn drop_member(&self, node: &str) -> Result<(), ClusterError> {
        let mut members = self.members.lock().await;
        if members.iter().any(|m| m == node) {
            let next: Vec<String> = members.iter().filter(|m| *m != node).cloned().collect();
            self.put_members(&next).await?;
            *members = next;
            tracing::info!(target: "storaged::cluster", event = "insync", volume = %self.volume,
                members = ?members, left = node, term = self.term, "in-sync set changed");
        }
        self.links
            .lock()
            .expect("links lock")
            .retain(|l| l.node != node);
        Ok(())
    }

    /// Adds a resynced slave to the in-sync set (in etcd, guarded by this master's term),
    /// unless its link failed or was dropped meanwhile: under the members lock, so that a
    /// failure of the link either comes before (and nothing is added) or after (and the
    /// slave leaves again before any client gets an answer without it).
    pub(crate) async fn add_member(&self, node: &str, link: &Arc<Link>) -> Result<(), LinkError> {
        let mut members = self.members.lock().await;
        let linked = self
            .links
            .lock()
            .expect("links lock")
            .iter()
            .any(|l| Arc::ptr_eq(l, link));
        if !linked || link.failed.load(Ordering::SeqCst) {
            return Err(LinkError::Ended);
        }
        let mut next = members.clone();
        next.push(node.to_string());
        self.put_members(&next).await.map_err(LinkError::InSync)?;
        *members = next;
        tracing::info!(target: "storaged::cluster", event = "insync", volume = %self.volume,
            members = ?members, joined = node, term = self.term, "in-sync set changed");
        Ok(())
    }

    /// Writes the in-sync set, guarded by this master's term.
    async fn put_members(&self, members: &[String]) -> Result<(), ClusterError> {
        let body = InSync {
            members: members.to_vec(),
            term: self.term,
        };
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.leader_key.clone(),
                CompareOp::Equal,
                self.term,
            )])
            .and_then([TxnOp::put(
                insync_key(&self.volume),
                serde_json::to_vec(&body).expect("in-sync record serialises"),
                None,
            )]);
        let limit = self.cluster.config.lease_ttl;
        let resp = tokio::time::timeout(limit, super::txn(&self.cluster.etcd(), txn))
            .await
            .map_err(|_| ClusterError::Deposed(self.volume.clone()))??;
        if !resp.succeeded() {
            return Err(ClusterError::Deposed(self.volume.clone()));
        }
        Ok(())
    }
}
