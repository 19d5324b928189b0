//! Placement: creating a replicated volume (choosing its nodes and writing its records in one
//! etcd transaction), and making sure every volume placed on this node exists locally and has
//! its election running.

use super::role::Role;
use super::{
    election, election_name, insync_key, lease_key, node_key, parse, placement_key, Cluster,
    ClusterError, InSync, NodeRecord, Placement, PREFIX,
};
use crate::registry::RegistryError;
use crate::volume::Volume;
use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use std::sync::Arc;
use storaged_client::cluster::ReplicatedVolumeView;

/// Brings up the volumes placed here and watches for new ones.
pub async fn start(cluster: Arc<Cluster>) -> Result<(), ClusterError> {
    let rev = adopt_all(&cluster).await?;
    tokio::spawn(follow(cluster, rev));
    Ok(())
}

/// The prefix of every placement record.
fn placement_prefix() -> String {
    format!("{PREFIX}placement/")
}

/// Adopts every volume placed here; returns the etcd revision it read them at.
async fn adopt_all(cluster: &Arc<Cluster>) -> Result<i64, ClusterError> {
    let opts = GetOptions::new().with_prefix();
    let resp = super::get(&cluster.etcd(), placement_prefix(), Some(opts)).await?;
    for kv in resp.kvs() {
        let p: Placement = parse(&String::from_utf8_lossy(kv.key()), kv.value())?;
        adopt(cluster, &p).await;
    }
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// Adopts the volumes placed after revision `rev`, as etcd reports them. A watch goes to one
/// etcd member: when it breaks (that member died) every placement is read again and the
/// watch opened anew from there, so that no volume is missed.
async fn follow(cluster: Arc<Cluster>, mut rev: i64) {
    loop {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        if let Ok(mut w) = cluster.etcd().watch(placement_prefix(), Some(opts)).await {
            while let Ok(Some(resp)) = w.message().await {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if ev.event_type() != EventType::Put {
                        continue;
                    }
                    match parse::<Placement>(&String::from_utf8_lossy(kv.key()), kv.value()) {
                        Ok(p) => adopt(&cluster, &p).await,
                        Err(e) => tracing::warn!(error = %e, "unreadable placement"),
                    }
                }
                if resp.canceled() {
                    break;
                }
            }
        }
        tracing::warn!(target: "storaged::cluster", "placement watch broke; reading every placement again");
        loop {
            tokio::time::sleep(cluster.config.lease_ttl / 10).await;
            match adopt_all(&cluster).await {
                Ok(r) => {
                    rev = r;
                    break;
                }
                Err(e) => tracing::warn!(target: "storaged::cluster",
                    error = %vmhop_common::error::chain(&e), "placements not read; retrying"),
            }
        }
    }
}

/// Makes a volume placed here exist locally and starts its election.
async fn adopt(cluster: &Arc<Cluster>, p: &Placement) {
    if !p.replicas.iter().any(|r| r == cluster.node()) {
        return;
    }
    match local(cluster, p).await {
        Ok(vol) => start_election(cluster, vol),
        Err(e) => tracing::warn!(volume = %p.config.name, error = %e,
            "cannot create the local copy of a placed volume"),
    }
}

fn start_election(cluster: &Arc<Cluster>, vol: Arc<Volume>) {
    let fresh = cluster
        .elections
        .lock()
        .expect("elections lock")
        .insert(vol.config.name.clone());
    if fresh {
        // Before anyone can attach: until its election says otherwise, no client is served.
        vol.role.set(Role::NotMaster(cluster.clone()));
        tokio::spawn(election::run(cluster.clone(), vol));
    }
}

async fn local(cluster: &Cluster, p: &Placement) -> Result<Arc<Volume>, ClusterError> {
    if let Ok(v) = cluster.reg.get(&p.config.name) {
        return Ok(v);
    }
    match cluster.reg.create(p.config.clone()).await {
        Ok(v) => Ok(v),
        Err(RegistryError::Exists(_)) => Ok(cluster.reg.get(&p.config.name)?),
        Err(e) => Err(e.into()),
    }
}

/// The local copy of `volume`, created from its placement if it is placed here.
pub async fn ensure_local(
    cluster: &Arc<Cluster>,
    volume: &str,
) -> Result<Arc<Volume>, ClusterError> {
    if let Ok(v) = cluster.reg.get(volume) {
        return Ok(v);
    }
    let key = placement_key(volume);
    let resp = super::get(&cluster.etcd(), key.clone(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| ClusterError::NotFound(volume.to_string()))?;
    let p: Placement = parse(&key, kv.value())?;
    if !p.replicas.iter().any(|r| r == cluster.node()) {
        return Err(ClusterError::NotPlacedHere(volume.to_string()));
    }
    let vol = local(cluster, &p).await?;
    start_election(cluster, vol.clone());
    Ok(vol)
}

/// The live nodes, by id.
async fn live_nodes(cluster: &Cluster) -> Result<Vec<NodeRecord>, ClusterError> {
    let resp = super::get(
        &cluster.etcd(),
        format!("{PREFIX}nodes/"),
        Some(GetOptions::new().with_prefix()),
    )
    .await?;
    resp.kvs()
        .iter()
        .map(|kv| parse(&String::from_utf8_lossy(kv.key()), kv.value()))
        .collect()
}

/// Creates a volume with `replicas` copies: this node and the next live nodes by id. The
/// placement and the in-sync set (every copy; none has data yet) are written in one
/// transaction that fails if the volume exists.
pub async fn create(
    cluster: &Arc<Cluster>,
    config: storaged_client::api::VolumeConfig,
    replicas: u32,
) -> Result<Placement, ClusterError> {
    config
        .validate()
        .map_err(|e| RegistryError::Volume(e.into()))?;
    let mut nodes: Vec<String> = live_nodes(cluster)
        .await?
        .into_iter()
        .map(|n| n.id)
        .collect();
    nodes.sort();
    nodes.retain(|n| n != cluster.node());
    nodes.insert(0, cluster.node().to_string());
    let wanted = replicas.max(1) as usize;
    if nodes.len() < wanted {
        return Err(ClusterError::TooFewNodes {
            wanted,
            live: nodes.len(),
        });
    }
    nodes.truncate(wanted);
    let name = config.name.clone();
    let placement = Placement {
        config,
        replicas: nodes.clone(),
    };
    let insync = InSync {
        members: nodes,
        term: 0,
    };
    let txn = Txn::new()
        .when([Compare::version(placement_key(&name), CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(
                placement_key(&name),
                serde_json::to_vec(&placement).expect("placement serialises"),
                None,
            ),
            TxnOp::put(
                insync_key(&name),
                serde_json::to_vec(&insync).expect("in-sync record serialises"),
                None,
            ),
            TxnOp::put(
                lease_key(&name),
                serde_json::to_vec(&crate::lease::LeaseTable::default())
                    .expect("lease table serialises"),
                None,
            ),
        ]);
    if !super::txn(&cluster.etcd(), txn).await?.succeeded() {
        return Err(ClusterError::Exists(name));
    }
    tracing::info!(target: "storaged::cluster", event = "placed", volume = %name,
        replicas = ?placement.replicas, "replicated volume created");
    adopt(cluster, &placement).await;
    Ok(placement)
}

/// A replicated volume's records in etcd.
pub async fn view(cluster: &Cluster, volume: &str) -> Result<ReplicatedVolumeView, ClusterError> {
    let mut etcd = cluster.etcd();
    let key = placement_key(volume);
    let resp = super::get(&etcd, key.clone(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| ClusterError::NotFound(volume.to_string()))?;
    let placement: Placement = parse(&key, kv.value())?;
    let (insync, _) = election::read_insync(&mut etcd, volume).await?;
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(
            etcd_client::SortTarget::Create,
            etcd_client::SortOrder::Ascend,
        )
        .with_limit(1);
    let resp = super::get(&etcd, format!("{}/", election_name(volume)), Some(opts)).await?;
    let (master, term) = match resp.kvs().first() {
        Some(kv) => (
            Some(String::from_utf8_lossy(kv.value()).into_owned()),
            kv.create_revision(),
        ),
        None => (None, 0),
    };
    let mut nbd_addresses = Vec::new();
    for n in &placement.replicas {
        let key = node_key(n);
        if let Some(kv) = super::get(&etcd, key.clone(), None).await?.kvs().first() {
            let rec: NodeRecord = parse(&key, kv.value())?;
            nbd_addresses.push(rec.nbd.to_string());
        }
    }
    let role_here = cluster
        .reg
        .get(volume)
        .ok()
        .map(|v| format!("{:?}", v.role));
    Ok(ReplicatedVolumeView {
        placement,
        insync,
        master,
        term,
        nbd_addresses,
        role_here,
    })
}
