//! Standby leases that outlive their connections. A host that connected as standby and went
//! away keeps its entry for [`StandbyPolicy::expiry`] (it may reconnect, or be flipped to), then
//! loses it; a volume holds at most [`StandbyPolicy::max`] standby entries, and a new standby
//! makes room by evicting the entries orphaned longest. So clients that connect as standby under
//! ever new host ids cannot grow the lease table, or the time each durable write of it takes,
//! without limit. Primary and deactivated entries never expire: they are the fencing record.

use super::LeaseTable;
use crate::registry::{Registry, RegistryError};
use crate::volume::Volume;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::LeaseState;

/// How long standby entries without a connection live, and how many a volume keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyPolicy {
    /// A standby entry whose host has had no connection for this long is removed.
    pub expiry: Duration,
    /// Most standby entries per volume.
    pub max: usize,
}

impl Default for StandbyPolicy {
    fn default() -> Self {
        StandbyPolicy {
            expiry: Duration::from_secs(600),
            max: 64,
        }
    }
}

/// The standby hosts of `table` without a connection, longest orphaned first.
fn orphans(vol: &Volume, table: &LeaseTable) -> Vec<(Instant, String)> {
    let mut v: Vec<_> = table
        .standby
        .iter()
        .filter_map(|h| vol.orphaned_since(&h.host).map(|t| (t, h.host.clone())))
        .collect();
    v.sort();
    v
}

fn without(table: &LeaseTable, hosts: &[String]) -> LeaseTable {
    hosts.iter().fold(table.clone(), |t, host| {
        t.revoke(host, Some(LeaseState::Standby)).unwrap_or(t)
    })
}

/// `table` without its expired standby entries and, when `incoming` is a host that holds no
/// entry yet, with room for it. Caller holds the volume's lease lock.
pub(crate) fn make_room(
    vol: &Volume,
    table: &LeaseTable,
    policy: &StandbyPolicy,
    incoming: &str,
) -> Result<LeaseTable, RegistryError> {
    let orphans = orphans(vol, table);
    let now = Instant::now();
    let expired = orphans
        .iter()
        .filter(|(t, _)| now.saturating_duration_since(*t) >= policy.expiry);
    let mut gone: Vec<String> = expired.map(|(_, h)| h.clone()).collect();
    let new_host = !table.standby.iter().any(|h| h.host == incoming);
    let keep = policy.max.saturating_sub(usize::from(new_host));
    let others = orphans.iter().filter(|(_, h)| h != incoming);
    for (_, host) in others {
        if table.standby.len() - gone.len() <= keep {
            break;
        }
        if !gone.contains(host) {
            gone.push(host.clone());
        }
    }
    if table.standby.len() - gone.len() > keep {
        return Err(RegistryError::StandbyLimit(policy.max));
    }
    if !gone.is_empty() {
        tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "expire",
            hosts = ?gone, "standby leases without a connection removed");
    }
    Ok(without(table, &gone))
}

/// Removes the expired standby entries of every volume, durably.
pub async fn expire(reg: &Registry) -> Result<(), RegistryError> {
    for vol in reg.list() {
        // A replicated volume's table is its master's to change.
        if vol.role.refuses_clients() {
            continue;
        }
        expire_volume(reg, &vol).await?;
    }
    Ok(())
}

async fn expire_volume(reg: &Registry, vol: &Arc<Volume>) -> Result<(), RegistryError> {
    let _l = vol.lease_lock.lock().await;
    let table = vol.table();
    let now = Instant::now();
    let gone: Vec<String> = orphans(vol, &table)
        .into_iter()
        .filter(|(t, _)| now.saturating_duration_since(*t) >= reg.standby.expiry)
        .map(|(_, h)| h)
        .collect();
    if gone.is_empty() {
        return Ok(());
    }
    let next = without(&table, &gone);
    reg.commit_table(vol, next).await?;
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "expire",
        hosts = ?gone, epoch = table.epoch, "standby leases without a connection removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseRequest;
    use std::net::SocketAddr;
    use storaged_client::api::{Holder, VolumeConfig};
    use storaged_client::protocol::RequestedState;

    fn standby(host: &str) -> LeaseRequest {
        LeaseRequest {
            holder: Holder {
                host: host.into(),
                instance: "vm".into(),
            },
            state: RequestedState::Standby,
            expected_epoch: 0,
        }
    }

    #[tokio::test]
    async fn standby_entries_without_connections_expire_and_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = Registry::open(dir.path()).unwrap();
        reg.standby = StandbyPolicy {
            expiry: Duration::from_secs(3600),
            max: 3,
        };
        let reg = Arc::new(reg);
        let vol = reg.create(VolumeConfig::new("v", 1 << 20)).await.unwrap();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        // One standby stays connected; the others come and go.
        let kept = reg.attach(&vol, Some(standby("kept")), peer).await.unwrap();
        for i in 0..20 {
            let a = reg.attach(&vol, Some(standby(&format!("h{i}"))), peer);
            drop(a.await.unwrap());
        }
        let hosts =
            |v: &Volume| -> Vec<String> { v.table().standby.into_iter().map(|h| h.host).collect() };
        assert_eq!(hosts(&vol), ["kept", "h18", "h19"]);
        // Three connected standbys fill the table: a fourth host is refused.
        let _a = reg.attach(&vol, Some(standby("h18")), peer).await.unwrap();
        let _b = reg.attach(&vol, Some(standby("h19")), peer).await.unwrap();
        let full = reg.attach(&vol, Some(standby("new")), peer).await;
        assert!(
            matches!(full, Err(RegistryError::StandbyLimit(3))),
            "{full:?}"
        );
        drop((_a, _b, kept));
        // Expiry removes the orphans, durably.
        let mut reg = Arc::try_unwrap(reg).ok().unwrap();
        reg.standby.expiry = Duration::ZERO;
        expire(&reg).await.unwrap();
        assert!(vol.table().standby.is_empty());
        drop(reg);
        let again = Registry::open(dir.path()).unwrap();
        assert!(again.get("v").unwrap().table().standby.is_empty());
    }
}
