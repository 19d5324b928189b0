//! The per-volume election: while this node is in the volume's in-sync set and has an etcd
//! session, it campaigns; once elected it fixes the in-sync set for its term, stops every
//! replication stream of an earlier term on its copy, reads the lease table, opens the
//! replication streams and serves clients until its session ends, a slave reports a newer
//! term, or its election key disappears.
//!
//! # The safety argument
//! What must hold: (1) a write acknowledged to a client is on every copy that can later be
//! elected; (2) a deposed master's late writes never land on a copy that can be elected, and
//! it grants and flips nothing; (3) a master cut off from etcd stops acknowledging (and
//! serving reads) before another node can be elected. (1) and (2) rest on etcd's linearizable
//! transactions only; (3) needs one bounded assumption on clock *rates*.
//!
//! **Terms.** Candidates campaign with etcd's election API, each with its node's session
//! lease; the leader is the key with the lowest create revision under the volume's election
//! prefix. The *term* is that create revision: revisions only grow, so every later master
//! has a higher term, and a master's key disappears only when it resigns or etcd expires its
//! lease. A node becomes leader only once every older key is gone.
//!
//! **Who may be elected.** Only members of the in-sync set campaign, and a winner re-reads the
//! set and rewrites it in a transaction that requires its own key (create revision = its
//! term) and the set's mod revision it just read: a node dropped from the set before it won
//! resigns. The set is changed only by the master, each time with a transaction requiring the
//! master's key with its term, so a master whose key is gone (deposed) changes nothing.
//!
//! **(1) Acknowledged writes.** The master replies to a client only when its copy and every
//! member of its current in-sync set acknowledged the op, or when the member that did not was
//! first removed from the set by a successful guarded transaction. Such a transaction only
//! succeeds while the master's key exists, i.e. before any successor won. So at the moment of
//! an acknowledgement, every member of the set in etcd has the write, and a successor is
//! elected from that set. Copies outside the set get back into it only by a full resync from a
//! master ([`super::resync`]) that ends with a FLUSH and a guarded transaction.
//!
//! **(2) Late writes of a deposed master.** A winner, before it serves anyone, raises the
//! highest term it has seen for the volume to its own and bumps the volume's applier
//! generation ([`super::follower`]): once the op the old stream may be applying is done, no
//! op of an older stream is applied to its copy any more (such a stream is closed, and the old
//! master, unable to drop the winner from the set, fences itself). Slaves outside the
//! winner's set may still apply the old master's ops, but they can only rejoin through a
//! resync, whose stream bumps their generation the same way before the copy starts. Lease
//! changes are etcd transactions guarded by the term ([`super::leases`]): a deposed master's
//! grant or flip fails whatever its clock says.
//!
//! **(3) Clocks and timeouts.** A node's session is one etcd lease of TTL `T`
//! (`--etcd-lease-ttl-secs`, default 5 s), kept alive every `T/6`. The node keeps a local
//! deadline: the instant it *sent* the last keep-alive that succeeded, plus the TTL etcd
//! granted, minus a margin of `T/4`. etcd expires the lease no earlier than `T` after it
//! *received* that keep-alive (a change of etcd leader only extends leases), which is later
//! than it was sent. After the deadline the node acknowledges no write (checked after the
//! slaves' acks, just before the reply), answers no read, refuses new clients, closes its
//! clients' connections and drops its masterships. A successor can only win after etcd
//! deleted the old key, i.e. after the old lease expired at etcd. The assumption: the node's
//! monotonic clock and etcd's leader's may not run apart by more than 25% over one TTL; no
//! synchronised wall clocks, no bound on message delays (a delay only makes the node's
//! deadline come earlier relative to etcd's expiry). A process pause between the check and
//! the reply can deliver an acknowledgement late, but never one of a write the successor
//! lacks (see (1)).
//!
//! Other timeouts: a slave that does not acknowledge within the replication timeout `R`
//! (`--replication-timeout-ms`, default 5 s), or whose queue stays full that long, leaves the
//! in-sync set (the client's write waits up to `R`); in-sync and lease transactions wait at
//! most `T` (no answer: the master fences itself, since the outcome is unknown). A failover
//! takes about `T` (the dead master's lease must expire at etcd) plus the election, the
//! winner's streams and the clients' reconnection backoff.
//!
//! **Losing etcd members.** etcd's client spreads calls over every endpoint given. A member
//! of several that dies changes nothing: a call that could not be sent to it (connection
//! refused) is made again, to another member ([`super::sent`]); a keep-alive stream or a
//! watch that broke with it is opened again through the others; keep-alives go every `T/6`
//! and a round without an answer within `T/4` moves to a new stream, so that a round lost
//! with the member, or waiting out etcd's election of a new leader (which must take well
//! under `T/2`: etcd's election timeout is set for that), leaves time for others before the
//! deadline. The master keeps its term.
//!
//! **Losing etcd's quorum (or the master's link to it).** Why I/O fails safe rather than
//! go on: no etcd member without a quorum renews a lease (a renewal needs the raft leader),
//! so the master's session cannot be extended; and it must not go on acknowledging past its
//! deadline, because it cannot tell a quorum loss (nobody can be elected) from a partition
//! that cut only itself off (a successor is elected at `T`). Its deadline passes within
//! `0.75 T` of its last renewal; from then it acknowledges no write, answers no read, closes
//! its clients' connections and takes no new client, and no node can be elected until etcd
//! is back. The clients hold their I/O while they look for a master (they retry the writes
//! that had no reply). A lease change asked of any node meanwhile is answered
//! `503 Service Unavailable` "etcd is unavailable to this node (unreachable, or without
//! quorum)", and nothing changes. When the quorum is back each node opens a new session by
//! itself; its old lease, extended by etcd's new leader, expires within `T` and frees the
//! election, a master is elected (keeping only itself in the in-sync set and resyncing the
//! others, as after any failover) and the clients find it, with no restart of storaged. A
//! write acknowledged before the loss is on every in-sync copy, by (1).

use super::leases;
use super::replica::Replicas;
use super::role::Role;
use super::session::Session;
use super::{election_name, insync_key, parse, Cluster, ClusterError, InSync};
use crate::lease::gate::Access;
use crate::volume::Volume;
use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use std::sync::Arc;
use std::time::Duration;

/// Runs the volume's election for as long as the process runs.
pub async fn run(cluster: Arc<Cluster>, vol: Arc<Volume>) {
    let name = vol.config.name.clone();
    vol.role.set(Role::NotMaster(cluster.clone()));
    let mut backoff = Duration::from_millis(50);
    loop {
        let session = current_session(&cluster).await;
        match term(&cluster, &vol, &session).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(target: "storaged::cluster", volume = %name, error = %e,
                    "election round failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cluster.config.lease_ttl);
            }
        }
    }
}

/// Waits for a session.
async fn current_session(cluster: &Cluster) -> Session {
    let mut rx = cluster.session.clone();
    loop {
        if let Some(s) = rx.borrow_and_update().clone() {
            if s.valid() {
                return s;
            }
        }
        // The session task replaces an expired session; wake up for that, or re-check.
        let _ = tokio::time::timeout(cluster.config.lease_ttl / 4, rx.changed()).await;
    }
}

/// Returns when `session` is over: replaced, gone, or past its deadline.
async fn session_over(cluster: &Cluster, session: &Session) {
    let mut rx = cluster.session.clone();
    let tick = (cluster.config.lease_ttl / 20).max(Duration::from_millis(20));
    loop {
        let current = rx.borrow_and_update().clone();
        if !session.valid() || !current.is_some_and(|c| c.same(session)) {
            return;
        }
        let _ = tokio::time::timeout(tick, rx.changed()).await;
    }
}

/// Reads the in-sync set and its mod revision.
pub(crate) async fn read_insync(
    etcd: &mut etcd_client::Client,
    volume: &str,
) -> Result<(InSync, i64), ClusterError> {
    let key = insync_key(volume);
    let resp = super::get(etcd, key.clone(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| ClusterError::NotFound(volume.to_string()))?;
    Ok((parse(&key, kv.value())?, kv.mod_revision()))
}

/// One round: wait to be a candidate, campaign, serve as master; returns when that is over.
async fn term(
    cluster: &Arc<Cluster>,
    vol: &Arc<Volume>,
    session: &Session,
) -> Result<(), ClusterError> {
    let name = vol.config.name.clone();
    let me = cluster.node().to_string();
    let mut etcd = cluster.etcd();
    let (insync, rev) = read_insync(&mut etcd, &name).await?;
    if !insync.members.contains(&me) {
        // Not a candidate: wait for the set to change (or the session to end).
        let mut w = etcd
            .watch(
                insync_key(&name),
                Some(WatchOptions::new().with_start_revision(rev + 1)),
            )
            .await?;
        tokio::select! {
            _ = w.message() => {}
            _ = session_over(cluster, session) => {}
        }
        return Ok(());
    }
    let my_key = format!("{}/{:x}", election_name(&name), session.lease);
    let campaign = etcd.campaign(election_name(&name), me.clone(), session.lease);
    let won = tokio::select! {
        r = campaign => r?,
        _ = session_over(cluster, session) => {
            // The campaign's key would make this node leader behind its back: remove it.
            let _ = cluster.etcd().delete(my_key, None).await;
            return Ok(());
        }
    };
    let Some(leader) = won.leader().cloned() else {
        return Ok(());
    };
    let term = leader.rev();
    let resign = |mut etcd: etcd_client::Client, leader: etcd_client::LeaderKey| async move {
        let opts = etcd_client::ResignOptions::new().with_leader(leader);
        let _ = etcd.resign(Some(opts)).await;
    };
    // Elected. Fix the in-sync set for this term: every placed copy at the volume's first
    // election (all are empty), only this node after a failover (see the module docs).
    let (insync, rev) = read_insync(&mut etcd, &name).await?;
    if !insync.members.contains(&me) {
        resign(etcd, leader).await;
        return Ok(());
    }
    let members = if insync.term == 0 {
        insync.members.clone()
    } else {
        vec![me.clone()]
    };
    let body = InSync {
        members: members.clone(),
        term,
    };
    let txn = Txn::new()
        .when([
            Compare::create_revision(leader.key().to_vec(), CompareOp::Equal, term),
            Compare::mod_revision(insync_key(&name), CompareOp::Equal, rev),
        ])
        .and_then([TxnOp::put(
            insync_key(&name),
            serde_json::to_vec(&body).expect("in-sync record serialises"),
            None,
        )]);
    if !super::txn(&etcd, txn).await?.succeeded() {
        resign(etcd, leader).await;
        return Ok(());
    }
    let replicas = match Replicas::connect(
        cluster.clone(),
        &name,
        term,
        leader.key().to_vec(),
        session.clone(),
        members,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            resign(etcd, leader).await;
            return Err(e);
        }
    };
    // No op of an earlier master's stream is applied to this copy from here on (see (2) in
    // the module docs).
    cluster.supersede_streams(&name, term).await;
    {
        // The lease table of this term, read after winning: no change by an earlier master
        // can land after this read (its transactions need its own election key).
        let _l = vol.lease_lock.lock().await;
        if let Err(e) = leases::load(&replicas, vol).await {
            replicas.fence();
            resign(etcd, leader).await;
            return Err(e);
        }
        vol.role.set(Role::Master(replicas.clone()));
    }
    tracing::info!(target: "storaged::cluster", event = "master", volume = %name, term,
        slaves = ?replicas.slaves(), "this node is master");
    tokio::spawn(super::resync::run(replicas.clone(), vol.clone()));
    let retry = (cluster.config.lease_ttl / 20).max(Duration::from_millis(20));
    let key_gone = until_deleted(cluster.etcd(), leader.key().to_vec(), term, retry);
    tokio::select! {
        _ = replicas.fenced() => {}
        _ = session_over(cluster, session) => {}
        _ = key_gone => {}
    }
    replicas.fence();
    vol.role.set(Role::NotMaster(cluster.clone()));
    close_clients(vol);
    tracing::warn!(target: "storaged::cluster", event = "deposed", volume = %name, term,
        "this node is no longer master: its clients were disconnected");
    if session.valid() {
        resign(etcd, leader).await;
    }
    Ok(())
}

/// Returns once the election key `key` of term `term` is gone (deleted, or replaced by a key
/// of another term). A watch stream goes to one etcd member: when it breaks (that member died)
/// the key is read again and watched from there, through the client's other endpoints. While
/// etcd answers nothing this waits; the session's deadline ends the term meanwhile.
async fn until_deleted(mut etcd: etcd_client::Client, key: Vec<u8>, term: i64, retry: Duration) {
    loop {
        let from = match super::get(&etcd, key.clone(), None).await {
            Ok(r) => {
                if r.kvs().first().map(|kv| kv.create_revision()) != Some(term) {
                    return;
                }
                r.header().map_or(term, |h| h.revision()) + 1
            }
            Err(_) => {
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        let opts = WatchOptions::new().with_start_revision(from);
        if let Ok(mut stream) = etcd.watch(key.clone(), Some(opts)).await {
            while let Ok(Some(resp)) = stream.message().await {
                let deleted = resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete);
                if deleted {
                    return;
                }
                if resp.canceled() {
                    break;
                }
            }
        }
        tracing::warn!(target: "storaged::cluster", "etcd watch of the election key broke; watching again");
        tokio::time::sleep(retry).await;
    }
}

/// Disconnects every client of the volume (they reconnect to the new master).
pub(crate) fn close_clients(vol: &Volume) {
    for c in vol.all_conns() {
        c.gate.set_access(Access::Fenced);
        c.gate.set_access(Access::Closed);
    }
}
