//! This node's etcd session: one lease, kept alive, with the node's record attached to it, and
//! the local deadline after which the node must behave as if the lease were gone (see the
//! clock argument in the parent module).

use super::{node_key, ClusterConfig, ClusterError, NodeRecord};
use etcd_client::PutOptions;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The current session, `None` while the node has none.
pub type SessionWatch = watch::Receiver<Option<Session>>;

/// One etcd lease of this node.
#[derive(Debug, Clone)]
pub struct Session {
    /// The etcd lease id.
    pub lease: i64,
    deadline: Arc<Mutex<Instant>>,
}

impl Session {
    /// Whether the lease is certainly still alive at etcd.
    pub fn valid(&self) -> bool {
        Instant::now() < *self.deadline.lock().expect("deadline lock")
    }

    /// Same lease (an ended session is never the current one again).
    pub fn same(&self, other: &Session) -> bool {
        self.lease == other.lease
    }
}

/// The pause before another keep-alive stream is tried: short, since the balancer may have
/// picked a member that is down, and another pick is likely to find a live one before the
/// session's deadline.
const REOPEN: Duration = Duration::from_millis(10);

/// The part of the TTL not trusted, against clock rate drift between this node and etcd.
fn margin(ttl: Duration) -> Duration {
    ttl / 4
}

/// Grants the first lease (so that startup fails loudly when etcd is unreachable) and keeps
/// sessions going in a task for as long as the process runs.
pub async fn start(
    etcd: etcd_client::Client,
    cfg: &ClusterConfig,
    record: &NodeRecord,
) -> Result<SessionWatch, ClusterError> {
    let first = grant(&mut etcd.clone(), cfg, record).await?;
    let (tx, rx) = watch::channel(Some(first.clone()));
    let (cfg, record) = (cfg.clone(), record.clone());
    tokio::spawn(async move {
        let mut current = Some(first);
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = match current.take() {
                Some(s) => s,
                None => match grant(&mut etcd.clone(), &cfg, &record).await {
                    Ok(s) => {
                        backoff = Duration::from_millis(100);
                        tx.send_replace(Some(s.clone()));
                        s
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no etcd session; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(cfg.lease_ttl);
                        continue;
                    }
                },
            };
            let why = keep_alive(etcd.clone(), &cfg, &session).await;
            tracing::warn!(target: "storaged::cluster", event = "session-lost",
                lease = session.lease, reason = %why, "etcd session lost: masterships end");
            tx.send_replace(None);
        }
    });
    Ok(rx)
}

/// A new lease with the node's record on it.
async fn grant(
    etcd: &mut etcd_client::Client,
    cfg: &ClusterConfig,
    record: &NodeRecord,
) -> Result<Session, ClusterError> {
    let sent = Instant::now();
    let ttl = cfg.lease_ttl.as_secs().max(1) as i64;
    let lease = etcd.lease_grant(ttl, None).await?;
    let granted = Duration::from_secs(lease.ttl().max(0) as u64);
    let session = Session {
        lease: lease.id(),
        deadline: Arc::new(Mutex::new(sent + granted.saturating_sub(margin(granted)))),
    };
    let body = serde_json::to_vec(record).expect("node record serialises");
    etcd.put(
        node_key(&record.id),
        body,
        Some(PutOptions::new().with_lease(session.lease)),
    )
    .await?;
    tracing::info!(target: "storaged::cluster", event = "session", lease = session.lease,
        ttl, node = %record.id, "etcd session started");
    Ok(session)
}

/// Keeps `session` alive until its deadline passes or etcd says the lease is gone; returns
/// why it ended. A keep-alive goes every `T/6`. A keep-alive stream goes to one etcd member:
/// when it breaks (that member died, or its connection did) or a round has no answer within
/// `T/4`, another is opened, through the client's other endpoints, for as long as the
/// deadline allows. Only a keep-alive that succeeded moves the deadline.
async fn keep_alive(
    mut etcd: etcd_client::Client,
    cfg: &ClusterConfig,
    session: &Session,
) -> String {
    // Frequent rounds, each given a fraction of the TTL: a round lost with an etcd member
    // (or waiting out etcd's election of a new leader) leaves time for others before the
    // deadline.
    let period = (cfg.lease_ttl / 6).max(Duration::from_millis(100));
    let round_limit = cfg.lease_ttl / 4;
    loop {
        let deadline = *session.deadline.lock().expect("deadline lock");
        let opened =
            tokio::time::timeout_at(deadline.into(), etcd.lease_keep_alive(session.lease)).await;
        let (mut keeper, mut stream) = match opened {
            Err(_) => return "the lease's deadline passed without a keep-alive".into(),
            Ok(Ok(k)) => k,
            Ok(Err(e)) => {
                tracing::warn!(target: "storaged::cluster", lease = session.lease,
                    error = %e, "etcd keep-alive stream not opened; retrying");
                tokio::time::sleep(REOPEN).await;
                continue;
            }
        };
        loop {
            let sent = Instant::now();
            let deadline = *session.deadline.lock().expect("deadline lock");
            let round = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            let limit = deadline.min(sent + round_limit);
            let resp = match tokio::time::timeout_at(limit.into(), round).await {
                Err(_) if Instant::now() >= deadline => {
                    return "the lease's deadline passed without a keep-alive".into()
                }
                Err(_) => {
                    tracing::warn!(target: "storaged::cluster", lease = session.lease,
                        "no etcd keep-alive answer within {round_limit:?}; opening another stream");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(target: "storaged::cluster", lease = session.lease,
                        error = %e, "etcd keep-alive stream broke; opening another");
                    break;
                }
                Ok(Ok(None)) => {
                    tracing::warn!(target: "storaged::cluster", lease = session.lease,
                        "etcd keep-alive stream ended; opening another");
                    break;
                }
                Ok(Ok(Some(r))) => r,
            };
            if resp.ttl() <= 0 {
                return "the lease expired at etcd".into();
            }
            let granted = Duration::from_secs(resp.ttl() as u64);
            *session.deadline.lock().expect("deadline lock") =
                sent + granted.saturating_sub(margin(granted));
            tokio::time::sleep(period).await;
        }
        tokio::time::sleep(REOPEN).await;
    }
}
