//! The lease tables of replicated volumes, in etcd.
//!
//! A replicated volume's lease table (primary / standby / deactivated, the epoch, the table
//! before the last flip) is the JSON of [`LeaseTable`] at `/vmhop/leases/<volume>`, written with
//! the placement when the volume is created. Only the volume's master changes it, and only
//! with an etcd transaction that requires
//! - the master's election key to still exist with the master's term as its create revision
//!   (a deposed master's transaction fails: etcd deleted its key when its lease ended, and a
//!   new master's key has another create revision), and
//! - the table's mod revision to be the one this master last read or wrote (a change whose
//!   outcome this master could not learn, an etcd timeout, makes every later change fail
//!   until a new term reads the table again).
//!
//! A failed transaction ends the mastership ([`Replicas::fence`]): the change is refused, the
//! clients are disconnected and reconnect to whichever node etcd elects, which reads the table
//! before it serves anyone. So a grant, flip, rollback, revoke or expiry decided by a node that
//! is no longer master never takes effect, whatever the clocks say; the local deadline of the
//! session (see the parent module) is only needed for the data path, which does not go through
//! etcd.
//!
//! The changes of several volumes (a guest's flip) go in one transaction: every volume must
//! be replicated and mastered here (a set mixing single-node volumes, or volumes mastered
//! elsewhere, is refused), and every volume changes or none does.
//!
//! Every node answers lease queries: a node that is not a volume's master reads the table
//! from etcd (a linearizable read) instead of its own stale copy. Without etcd's quorum that
//! read cannot be answered: the query is refused after at most a lease TTL, saying so.
//!
//! Fault points (see `vmhop_common::faults`): `cluster.lease.grant`, `cluster.lease.flip` and
//! `cluster.lease.change` (other changes), reached by the master just before the
//! transaction, so that a test can stop it there until another node was elected.

use super::replica::Replicas;
use super::{lease_key, parse, Cluster, ClusterError};
use crate::lease::LeaseTable;
use crate::registry::RegistryError;
use crate::volume::Volume;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use std::sync::Arc;

/// Reads a replicated volume's lease table and its mod revision.
pub async fn read(cluster: &Cluster, volume: &str) -> Result<(LeaseTable, i64), ClusterError> {
    let key = lease_key(volume);
    let resp = super::get(&cluster.etcd(), key.clone(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| ClusterError::NotFound(volume.to_string()))?;
    Ok((parse(&key, kv.value())?, kv.mod_revision()))
}

/// The table of `vol` for a query: this node's when it is master (or the volume is not
/// replicated), etcd's otherwise.
pub async fn current(vol: &Volume) -> Result<LeaseTable, RegistryError> {
    match vol.role.get() {
        super::role::Role::NotMaster(c) => {
            // A linearizable read waits for etcd's quorum: no longer than a lease TTL here.
            let unreadable = || RegistryError::EtcdUnreadable(vol.config.name.clone());
            match tokio::time::timeout(c.config.lease_ttl, read(&c, &vol.config.name)).await {
                Ok(Ok((t, _))) => Ok(t),
                Ok(Err(ClusterError::Etcd(e))) => {
                    tracing::warn!(target: "storaged::cluster", event = "lease-query-failed",
                        volume = %vol.config.name, error = %vmhop_common::error::chain(&e),
                        "the lease table could not be read from etcd");
                    Err(unreadable())
                }
                Ok(Err(e)) => Err(RegistryError::Etcd(vmhop_common::error::chain(&e))),
                Err(_) => Err(unreadable()),
            }
        }
        _ => Ok(vol.table()),
    }
}

/// The name of the fault point of a change from `old` to `new`.
fn point(old: &LeaseTable, new: &LeaseTable) -> &'static str {
    let flipped = old.primary.is_some() && new.primary.is_some() && old.primary != new.primary;
    let granted = (old.primary.is_none() && new.primary.is_some())
        || new.standby.iter().any(|h| !old.standby.contains(h));
    match (flipped, granted) {
        (true, _) => "cluster.lease.flip",
        (false, true) => "cluster.lease.grant",
        _ => "cluster.lease.change",
    }
}

/// Writes the new tables of replicated volumes mastered here in one transaction guarded by
/// each master's term (see the module docs). Caller holds each volume's lease lock and makes
/// the tables current once this returns `Ok`.
pub async fn commit(changes: &[(Arc<Replicas>, &Volume, LeaseTable)]) -> Result<(), RegistryError> {
    let Some((first, ..)) = changes.first() else {
        return Ok(());
    };
    let cluster = first.cluster().clone();
    let mut compares = Vec::new();
    let mut puts = Vec::new();
    for (rep, vol, table) in changes {
        compares.push(Compare::create_revision(
            rep.leader_key().to_vec(),
            CompareOp::Equal,
            rep.term,
        ));
        let rev = *rep.lease_rev.lock().expect("lease rev lock");
        compares.push(Compare::mod_revision(
            lease_key(rep.volume()),
            CompareOp::Equal,
            rev,
        ));
        let body = serde_json::to_vec(table).expect("lease table serialises");
        puts.push(TxnOp::put(lease_key(rep.volume()), body, None));
        if vmhop_common::faults::is_armed() {
            vmhop_common::faults::point(point(&vol.table(), table));
        }
    }
    let txn = Txn::new().when(compares).and_then(puts);
    let limit = cluster.config.lease_ttl;
    let outcome = tokio::time::timeout(limit, super::txn(&cluster.etcd(), txn)).await;
    let refused = |why: &str| {
        for (rep, ..) in changes {
            rep.fence();
        }
        let (rep, ..) = &changes[0];
        tracing::warn!(target: "storaged::cluster", event = "lease-refused",
            volume = %rep.volume(), term = rep.term, reason = why,
            "lease change not made: this node's mastership ends");
    };
    match outcome {
        Ok(Ok(resp)) if resp.succeeded() => {
            let rev = resp.header().map_or(0, |h| h.revision());
            for (rep, ..) in changes {
                *rep.lease_rev.lock().expect("lease rev lock") = rev;
            }
            Ok(())
        }
        Ok(Ok(_)) => {
            refused("the term is over (another node was elected) or the table moved on");
            Err(RegistryError::Deposed {
                volume: first.volume().to_string(),
                term: first.term,
            })
        }
        Ok(Err(e)) => {
            refused("etcd refused the transaction");
            Err(RegistryError::Etcd(vmhop_common::error::chain(&e)))
        }
        Err(_) => {
            refused("etcd did not answer in time");
            Err(RegistryError::Etcd(format!(
                "etcd did not answer within {limit:?}: whether the change was made is unknown"
            )))
        }
    }
}

/// Loads the table into `vol` at the start of a term (caller holds the lease lock) and
/// records its revision for this term's changes.
pub async fn load(rep: &Replicas, vol: &Volume) -> Result<(), ClusterError> {
    let (table, rev) = read(rep.cluster(), rep.volume()).await?;
    *rep.lease_rev.lock().expect("lease rev lock") = rev;
    tracing::info!(target: "storaged::lease", volume = %rep.volume(), epoch = table.epoch,
        primary = ?table.primary, standby = table.standby.len(),
        deactivated = table.deactivated.len(), term = rep.term,
        "lease table read from etcd for this term");
    vol.set_table(table);
    vol.restart_orphan_clock();
    // An armed flip lived in the old master's memory: it does not carry over.
    vol.pending.lock().expect("pending lock").take();
    Ok(())
}
