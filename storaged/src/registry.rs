//! The running set of volumes ([`Volume`]): creating, opening and deleting them, and attaching
//! connections to them under their lease tables and anonymous policies.
//!
//! Every change of a lease table happens under the volume's `lease_lock` and is written to the
//! [`Store`] before it becomes visible in memory or is acknowledged to anyone.

use crate::cluster::role::Role;
use crate::lease::expiry::{self, StandbyPolicy};
use crate::lease::gate::{Access, Gate};
use crate::lease::{LeaseError, LeaseRequest, LeaseTable};
use crate::store::{Store, StoreError};
use crate::volume::{Attached, ConnEntry, Volume, VolumeError, VolumeFile};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use storaged_client::api::{AnonymousPolicy, VolumeAccess, VolumeConfig};
use storaged_client::protocol::RequestedState;
use thiserror::Error;
use vmhop_common::faults::point as fault_point;

/// A registry operation that failed.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// No such volume.
    #[error("no volume named {0}")]
    NotFound(String),
    /// The name is taken.
    #[error("volume {0} already exists")]
    Exists(String),
    /// The volume has connections.
    #[error("volume {0} has {1} open connections")]
    Busy(String, usize),
    /// The lease state machine refused.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The host is not on the volume's host list.
    #[error("host {0} may not hold leases on this volume (not on its host list)")]
    NotAllowed(String),
    /// The lease state machine refused a change of a set of volumes because of this one;
    /// none of them changed.
    #[error("volume {volume}")]
    Refused {
        /// The volume that refused.
        volume: String,
        /// Why.
        #[source]
        source: LeaseError,
    },
    /// A change of a set of volumes names one twice.
    #[error("volume {0} is named twice")]
    Duplicate(String),
    /// A change of a set of volumes names none.
    #[error("no volume named")]
    NoVolumes,
    /// Cluster mode: another node is the volume's master (or none is elected yet); where it
    /// is, when this node knows.
    #[error("this node is not the master of volume {volume}{}",
        .master.as_ref().map_or(String::new(), |m| format!("; {m}")))]
    NotMaster {
        /// The volume.
        volume: String,
        /// Its master.
        master: Option<storaged_client::cluster::MasterHint>,
    },
    /// Cluster mode: a change of a set of volumes names volumes mastered on different nodes,
    /// so no one node can make it; each part goes to its master (nothing changed here).
    #[error("the volumes are mastered on different nodes ({}): each master takes its part",
        .0.iter().map(|(v, m)| format!("{v} at {}", m.node)).collect::<Vec<_>>().join(", "))]
    SplitMasters(Vec<(String, storaged_client::cluster::MasterHint)>),
    /// Cluster mode: this node's mastership of the volume ended before the change could be
    /// made (the change was not made; the clients reconnect to the new master).
    #[error("this node is no longer the master of volume {volume} (its term {term} is over): nothing changed")]
    Deposed {
        /// The volume.
        volume: String,
        /// The term that ended.
        term: i64,
    },
    /// Cluster mode: etcd could not be asked or did not answer.
    #[error("etcd: {0}")]
    Etcd(String),
    /// Cluster mode: this node has no etcd session (etcd is unreachable from it, or has lost
    /// its quorum), so no node can be confirmed as the volume's master and no lease changes.
    #[error("etcd is unavailable to this node (unreachable, or without quorum): no lease of volume {0} can change until it is back")]
    EtcdUnavailable(String),
    /// Cluster mode: a node that is not the volume's master could not read its lease table
    /// from etcd (etcd unreachable from it, or without quorum).
    #[error("etcd is unavailable to this node (unreachable, or without quorum): the lease table of volume {0} cannot be read here until it is back")]
    EtcdUnreadable(String),
    /// Cluster mode: a change of a set of volumes must name only replicated volumes mastered
    /// on this node, or only single-node volumes.
    #[error("volume {0} is not mastered on this node with the others of the set: a set changes in one transaction, all in etcd or all in the local store")]
    MixedSet(String),
    /// The anonymous policy refused.
    #[error("anonymous access refused: {0}")]
    Anonymous(&'static str),
    /// The volume's configuration or file.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The metadata store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// File system error in the data dir.
    #[error("data dir {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task died.
    #[error("internal task failed")]
    Join(#[from] tokio::task::JoinError),
    /// Waiting for a connection took too long.
    #[error("connection of {0} did not drain")]
    Drain(String, #[source] crate::lease::gate::GateError),
    /// The volume has its fill of standby leases, all of them connected.
    #[error("the volume holds {0} standby leases, all in use")]
    StandbyLimit(usize),
}

/// The result of attaching a connection.
#[derive(Debug)]
pub struct Attachment {
    /// The connection's entry.
    pub entry: ConnEntry,
    /// Granted lease state (None for anonymous).
    pub state: Option<RequestedState>,
    /// Epoch at attach time.
    pub epoch: u64,
    /// Detaches the connection when dropped.
    pub attached: Attached,
}

/// All volumes of this server.
pub struct Registry {
    dir: PathBuf,
    store: Arc<Store>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    next_conn: AtomicU64,
    /// How long a flip waits for the old primary's admitted requests.
    pub drain_limit: Duration,
    /// How long standby leases without a connection live, and how many a volume keeps.
    pub standby: StandbyPolicy,
    /// Serialises creating and deleting volumes.
    lifecycle: tokio::sync::Mutex<()>,
    /// Cluster mode: the cluster (set once it is joined), to find volumes placed here that
    /// this node has not created yet.
    cluster: std::sync::OnceLock<std::sync::Weak<crate::cluster::Cluster>>,
    /// The daemon's Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
}

impl Registry {
    /// Opens the data dir: the metadata store and every volume's file. Files without a record
    /// (left by a create or a delete that did not finish) are removed.
    pub fn open(dir: &Path) -> Result<Registry, RegistryError> {
        let vol_dir = dir.join("volumes");
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, source }
        };
        std::fs::create_dir_all(&vol_dir).map_err(io_err(&vol_dir))?;
        let store = Store::open(&dir.join("meta.redb"))?;
        let mut volumes = BTreeMap::new();
        for (cfg, table) in store.load()? {
            let file = VolumeFile::open(&VolumeFile::path_in(&vol_dir, &cfg.name), cfg.size)?;
            tracing::info!(volume = %cfg.name, size = cfg.size, epoch = table.epoch,
                primary = ?table.primary, deactivated = table.deactivated.len(), "volume loaded");
            volumes.insert(cfg.name.clone(), Arc::new(Volume::new(cfg, file, table)));
        }
        for entry in std::fs::read_dir(&vol_dir).map_err(io_err(&vol_dir))? {
            let path = entry.map_err(io_err(&vol_dir))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let known = volumes.values().any(|v| v.file.path() == path);
            if name.ends_with(".img") && !known {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                tracing::warn!(file = %path.display(),
                    "removed a volume file without a record (a create or delete did not finish)");
            }
        }
        let metrics = crate::metrics::Metrics::new();
        for name in volumes.keys() {
            metrics.add_volume(name);
        }
        Ok(Registry {
            dir: vol_dir,
            store: Arc::new(store),
            volumes: RwLock::new(volumes),
            next_conn: AtomicU64::new(1),
            drain_limit: Duration::from_secs(30),
            standby: StandbyPolicy::default(),
            lifecycle: tokio::sync::Mutex::new(()),
            cluster: std::sync::OnceLock::new(),
            metrics,
        })
    }

    /// The metadata store.
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Looks a volume up.
    pub fn get(&self, name: &str) -> Result<Arc<Volume>, RegistryError> {
        self.volumes
            .read()
            .expect("volumes lock")
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    /// Looks a volume up; in cluster mode one placed here and not created yet (this node did
    /// not get to the placement yet) is created first.
    pub async fn find(&self, name: &str) -> Result<Arc<Volume>, RegistryError> {
        match self.get(name) {
            Err(RegistryError::NotFound(_)) => {}
            found => return found,
        }
        let Some(cluster) = self.cluster.get().and_then(std::sync::Weak::upgrade) else {
            return Err(RegistryError::NotFound(name.to_string()));
        };
        match crate::cluster::placement::ensure_local(&cluster, name).await {
            Ok(v) => Ok(v),
            // Placed on other nodes only: the client is sent to the master.
            Err(crate::cluster::ClusterError::NotPlacedHere(_)) => Err(RegistryError::NotMaster {
                volume: name.to_string(),
                master: cluster.master_of(name).await,
            }),
            Err(_) => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    /// Cluster mode: the cluster this node joined.
    pub(crate) fn set_cluster(&self, cluster: &Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(Arc::downgrade(cluster));
    }

    /// All volumes, by name.
    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.volumes
            .read()
            .expect("volumes lock")
            .values()
            .cloned()
            .collect()
    }

    /// Creates a volume: an empty file first, then the durable record, then the in-memory
    /// entry. A crash in between (fault point `volume.create.file`) leaves a file without a
    /// record, which the next start removes.
    pub async fn create(&self, cfg: VolumeConfig) -> Result<Arc<Volume>, RegistryError> {
        cfg.validate().map_err(VolumeError::from)?;
        let _one = self.lifecycle.lock().await;
        if self.get(&cfg.name).is_ok() {
            return Err(RegistryError::Exists(cfg.name));
        }
        let path = VolumeFile::path_in(&self.dir, &cfg.name);
        let store = self.store.clone();
        let c = cfg.clone();
        let file = tokio::task::spawn_blocking(move || -> Result<VolumeFile, RegistryError> {
            let file = VolumeFile::create(&path, c.size)?;
            fault_point("volume.create.file");
            store.put_volume(&c, &LeaseTable::default())?;
            Ok(file)
        })
        .await??;
        let vol = Arc::new(Volume::new(cfg.clone(), file, LeaseTable::default()));
        self.volumes
            .write()
            .expect("volumes lock")
            .insert(cfg.name.clone(), vol.clone());
        self.metrics.add_volume(&cfg.name);
        tracing::info!(volume = %cfg.name, size = cfg.size, "volume created");
        Ok(vol)
    }

    /// Deletes a volume without connections: the durable record, then the file. A crash in
    /// between (fault point `volume.delete.record`) leaves a file without a record, which the
    /// next start removes (and which a new volume of the same name would not reuse: its file
    /// starts empty).
    pub async fn delete(&self, name: &str) -> Result<(), RegistryError> {
        let _one = self.lifecycle.lock().await;
        let vol = self.get(name)?;
        let _l = vol.lease_lock.lock().await;
        let n = vol.connection_count();
        if n > 0 {
            return Err(RegistryError::Busy(name.to_string(), n));
        }
        let store = self.store.clone();
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || store.delete_volume(&owned)).await??;
        vol.mark_removed();
        self.volumes.write().expect("volumes lock").remove(name);
        fault_point("volume.delete.record");
        let path = vol.file.path().to_path_buf();
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RegistryError::Io { path, source }),
        })
        .await??;
        self.metrics.forget_volume(name);
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// The volumes named, in name order (the order their lease locks are taken in, so that two
    /// changes of overlapping sets never wait for each other); refuses an empty list and a
    /// volume named twice.
    pub fn get_all(&self, names: &[String]) -> Result<Vec<Arc<Volume>>, RegistryError> {
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(RegistryError::Duplicate(w[0].clone()));
        }
        if sorted.is_empty() {
            return Err(RegistryError::NoVolumes);
        }
        sorted.into_iter().map(|n| self.get(n)).collect()
    }

    /// Persists `table` for `vol` and then makes it current. Caller holds `lease_lock`.
    pub(crate) async fn commit_table(
        &self,
        vol: &Volume,
        table: LeaseTable,
    ) -> Result<(), RegistryError> {
        self.commit_tables(&[(vol, table)]).await
    }

    /// Persists the new tables of some volumes in one durable transaction, then makes them
    /// current. Caller holds the `lease_lock` of each.
    pub(crate) async fn commit_tables(
        &self,
        changes: &[(&Volume, LeaseTable)],
    ) -> Result<(), RegistryError> {
        if changes
            .iter()
            .any(|(v, _)| !matches!(v.role.get(), Role::Single))
        {
            return commit_replicated(changes).await;
        }
        let store = self.store.clone();
        let owned: Vec<(String, LeaseTable)> = changes
            .iter()
            .map(|(v, t)| (v.config.name.clone(), t.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let tables: Vec<(&str, &LeaseTable)> =
                owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
            store.put_leases(&tables)
        })
        .await??;
        for (vol, table) in changes {
            vol.set_table(table.clone());
        }
        Ok(())
    }

    /// Attaches a new connection, deciding its lease (or anonymous access) durably.
    pub async fn attach(
        &self,
        vol: &Arc<Volume>,
        lease: Option<LeaseRequest>,
        peer: SocketAddr,
    ) -> Result<Attachment, RegistryError> {
        self.attach_at_most(vol, lease, peer, usize::MAX).await
    }

    /// [`Registry::attach`], refused with [`RegistryError::Busy`] while the volume has `max`
    /// connections (counted under the lease lock, so that connections attaching together
    /// cannot pass the limit).
    pub async fn attach_at_most(
        &self,
        vol: &Arc<Volume>,
        lease: Option<LeaseRequest>,
        peer: SocketAddr,
        max: usize,
    ) -> Result<Attachment, RegistryError> {
        if vol.role.refuses_clients() {
            return Err(not_master(vol).await);
        }
        let _l = vol.lease_lock.lock().await;
        if vol.is_removed() {
            return Err(RegistryError::NotFound(vol.config.name.clone()));
        }
        let open = vol.connection_count();
        if open >= max {
            return Err(RegistryError::Busy(vol.config.name.clone(), open));
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let table = vol.table();
        let (access, state) = match &lease {
            None => (anonymous_access(vol, &table)?, None),
            Some(req) => {
                allowed(vol, req)?;
                let room = match req.state {
                    RequestedState::Standby => {
                        expiry::make_room(vol, &table, &self.standby, &req.holder.host)?
                    }
                    RequestedState::Primary => table.clone(),
                };
                let next = match room.grant(req) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(target: "storaged::lease", volume = %vol.config.name,
                            event = "refused", host = %req.holder.host,
                            instance = %req.holder.instance, requested = ?req.state,
                            epoch = table.epoch, reason = %e, "lease refused");
                        return Err(e.into());
                    }
                };
                if next != table {
                    if req.state == RequestedState::Primary && table.primary.is_none() {
                        // The anonymous "while no primary exists" access ends here.
                        self.fence_anonymous(vol).await?;
                    }
                    self.commit_table(vol, next.clone()).await?;
                    tracing::info!(target: "storaged::lease", volume = %vol.config.name,
                        event = "grant", host = %req.holder.host,
                        instance = %req.holder.instance, state = ?req.state,
                        epoch = next.epoch, "lease granted");
                }
                let access = match req.state {
                    RequestedState::Primary => Access::ReadWrite,
                    RequestedState::Standby => Access::Standby,
                };
                (access, Some(req.state))
            }
        };
        let entry = ConnEntry {
            id,
            holder: lease.map(|l| l.holder),
            peer,
            gate: Arc::new(Gate::new(access)),
        };
        let attached = vol.add_conn(entry.clone());
        Ok(Attachment {
            entry,
            state,
            epoch: vol.table().epoch,
            attached,
        })
    }

    /// Answers `NBD_OPT_INFO`: would `attach` accept this connection? Changes nothing.
    pub fn preview(&self, vol: &Volume, lease: Option<&LeaseRequest>) -> Result<(), RegistryError> {
        if vol.role.refuses_clients() {
            let master = crate::cluster::cached_master(vol);
            let volume = vol.config.name.clone();
            return Err(RegistryError::NotMaster { volume, master });
        }
        let table = vol.table();
        match lease {
            None => anonymous_access(vol, &table).map(|_| ()),
            Some(req) => allowed(vol, req).and_then(|()| Ok(table.grant(req).map(drop)?)),
        }
    }

    /// Replaces who may use `vol`, durably. Leases already held stay until revoked; a host
    /// that holds one but is no longer on the list is named in the log.
    pub async fn set_access(
        &self,
        vol: &Arc<Volume>,
        access: VolumeAccess,
    ) -> Result<(), RegistryError> {
        access.validate().map_err(VolumeError::from)?;
        let _l = vol.lease_lock.lock().await;
        let cfg = VolumeConfig {
            anonymous: access.anonymous,
            hosts: access.hosts.clone(),
            ..vol.config.clone()
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_config(&cfg)).await??;
        let table = vol.table();
        let holders = table
            .primary
            .iter()
            .chain(&table.standby)
            .chain(&table.deactivated);
        for h in holders.filter(|h| !access.allows(&h.host)) {
            tracing::warn!(target: "storaged::lease", volume = %vol.config.name, host = %h.host,
                "the host holds a lease but is not on the volume's host list: revoke it to end it");
        }
        tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "access",
            anonymous = ?access.anonymous, hosts = ?access.hosts, "access policy changed");
        vol.set_access(access);
        Ok(())
    }

    /// Closes the anonymous connections that only existed while there was no primary.
    pub(crate) async fn fence_anonymous(&self, vol: &Volume) -> Result<(), RegistryError> {
        if vol.access().anonymous == AnonymousPolicy::ReadOnly {
            return Ok(());
        }
        for c in vol.anonymous_conns() {
            c.gate.set_access(crate::lease::gate::Access::Fenced);
            c.gate
                .drained(self.drain_limit)
                .await
                .map_err(|e| RegistryError::Drain(c.peer.to_string(), e))?;
            c.gate.set_access(crate::lease::gate::Access::Closed);
            tracing::info!(volume = %vol.config.name, peer = %c.peer,
                "anonymous connection closed: a primary lease was granted");
        }
        Ok(())
    }
}

/// The refusal of a node that is not `vol`'s master, naming the master when it is known.
pub(crate) async fn not_master(vol: &Volume) -> RegistryError {
    let master = match vol.role.get().cluster() {
        Some(c) if !c.has_session() => {
            return RegistryError::EtcdUnavailable(vol.config.name.clone());
        }
        Some(c) => c.master_of(&vol.config.name).await,
        None => None,
    };
    RegistryError::NotMaster {
        volume: vol.config.name.clone(),
        master,
    }
}

/// Cluster mode: the tables of replicated volumes mastered here go to etcd, in one
/// transaction guarded by the master's term (see [`crate::cluster::leases`]).
async fn commit_replicated(changes: &[(&Volume, LeaseTable)]) -> Result<(), RegistryError> {
    let mut masters = Vec::with_capacity(changes.len());
    for (vol, table) in changes {
        match vol.role.get() {
            Role::Master(rep) => masters.push((rep, *vol, table.clone())),
            Role::NotMaster(_) => return Err(not_master(vol).await),
            Role::Single => return Err(RegistryError::MixedSet(vol.config.name.clone())),
        }
    }
    crate::cluster::leases::commit(&masters).await?;
    for (vol, table) in changes {
        vol.set_table(table.clone());
    }
    Ok(())
}

/// Whether the volume's host list lets `req`'s host hold a lease.
fn allowed(vol: &Volume, req: &LeaseRequest) -> Result<(), RegistryError> {
    if vol.access().allows(&req.holder.host) {
        return Ok(());
    }
    tracing::warn!(target: "storaged::lease", volume = %vol.config.name, event = "refused",
        host = %req.holder.host, instance = %req.holder.instance, requested = ?req.state,
        reason = "not on the volume's host list", "lease refused");
    Err(RegistryError::NotAllowed(req.holder.host.clone()))
}

/// The access an anonymous connection gets under the volume's policy, or the refusal.
fn anonymous_access(vol: &Volume, table: &LeaseTable) -> Result<Access, RegistryError> {
    let has_primary = table.primary.is_some();
    Ok(match vol.access().anonymous {
        AnonymousPolicy::Deny => {
            return Err(RegistryError::Anonymous("this volume requires a lease"))
        }
        AnonymousPolicy::ReadOnly => Access::ReadOnly,
        _ if has_primary => {
            return Err(RegistryError::Anonymous(
                "a primary lease exists on this volume",
            ))
        }
        AnonymousPolicy::ReadWriteWithoutPrimary => Access::ReadWrite,
        AnonymousPolicy::ReadOnlyWithoutPrimary => Access::ReadOnly,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_attaching_together_stay_within_the_volume_limit() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(Registry::open(dir.path()).unwrap());
        let vol = reg.create(VolumeConfig::new("v", 1 << 20)).await.unwrap();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (reg, vol) = (reg.clone(), vol.clone());
            tasks.spawn(async move { reg.attach_at_most(&vol, None, peer, 4).await });
        }
        let mut kept = Vec::new();
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(a) => kept.push(a),
                Err(e) => assert!(matches!(e, RegistryError::Busy(_, 4)), "{e:?}"),
            }
        }
        assert_eq!(kept.len(), 4);
        assert_eq!(vol.connection_count(), 4);
        // Each attachment detaches itself when dropped, which makes room again.
        drop(kept);
        assert_eq!(vol.connection_count(), 0);
        drop(reg.attach_at_most(&vol, None, peer, 1).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creates_and_deletes_of_one_name_end_in_one_consistent_state() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(Registry::open(dir.path()).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64 {
            let reg = reg.clone();
            tasks.spawn(async move {
                match i % 2 {
                    0 => drop(reg.create(VolumeConfig::new("v", 1 << 20)).await),
                    _ => drop(reg.delete("v").await),
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        // What the running registry shows is what is on disk: record and file alike.
        let present = reg.get("v").is_ok();
        drop(reg);
        let file = VolumeFile::path_in(&dir.path().join("volumes"), "v");
        assert_eq!(file.exists(), present);
        let again = Registry::open(dir.path()).unwrap();
        assert_eq!(again.get("v").is_ok(), present);
    }
}
