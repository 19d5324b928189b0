//! The per-volume election: while this node is in the volume's in-sync set and has an etcd
//! session, it campaigns; once elected it fixes the in-sync set for its term, opens the
//! replication streams and serves clients until its session ends, a slave reports a newer
//! term, or its election key disappears.

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
    let resp = etcd.get(key.clone(), None).await?;
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
    if !etcd.txn(txn).await?.succeeded() {
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
    let mut w = etcd
        .watch(
            leader.key().to_vec(),
            Some(WatchOptions::new().with_start_revision(term + 1)),
        )
        .await?;
    let key_gone = async {
        loop {
            match w.message().await {
                Ok(Some(resp)) => {
                    if resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
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

/// Disconnects every client of the volume (they reconnect to the new master).
pub(crate) fn close_clients(vol: &Volume) {
    for c in vol.all_conns() {
        c.gate.set_access(Access::Fenced);
        c.gate.set_access(Access::Closed);
    }
}
