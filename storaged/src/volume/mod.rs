//! A volume while the server runs: its configuration, its file, its lease table as last
//! persisted, the connections attached to it and a flip armed on it. The [`Registry`] holds
//! them all; its file is a [`VolumeFile`].
//!
//! [`Registry`]: crate::registry::Registry

mod file;

pub use file::{Span, VolumeError, VolumeFile};

use crate::lease::gate::Gate;
use crate::lease::LeaseTable;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use storaged_client::api::{
    ArmedFlipInfo, Holder, LeaseEntry, LeaseState, LeaseView, VolumeAccess, VolumeConfig,
    VolumeInfo,
};

/// One attached connection.
#[derive(Debug, Clone)]
pub struct ConnEntry {
    /// Connection id, unique in this process.
    pub id: u64,
    /// Lease holder, or `None` for anonymous.
    pub holder: Option<Holder>,
    /// Remote address.
    pub peer: SocketAddr,
    /// Admission gate.
    pub gate: Arc<Gate>,
}

impl ConnEntry {
    fn holder_host(&self) -> Option<&str> {
        self.holder.as_ref().map(|h| h.host.as_str())
    }
}

/// A connection's place on its volume: dropping it detaches the connection, however the
/// connection ends (closed, failed after `NBD_OPT_GO` was accepted, timed out or cancelled).
#[derive(Debug)]
pub struct Attached {
    vol: Arc<Volume>,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.vol.detach(self.id);
    }
}

/// A flip armed to complete on first access or at a deadline: only while the volume is still
/// at the epoch it was armed at, and only for the migration that armed it.
#[derive(Debug, Clone)]
pub(crate) struct PendingFlip {
    /// The standby host to promote (None: the only standby).
    pub(crate) to: Option<String>,
    /// The migration it belongs to, if its caller named one.
    pub(crate) migration: Option<String>,
    /// The epoch it was armed at: any lease change since disarms it.
    pub(crate) epoch: u64,
    /// Tells one arming from the next (the deadline's task checks it).
    pub(crate) generation: u64,
}

impl PendingFlip {
    /// Whether it may still fire on a volume at `epoch`, for `host` (None: at its deadline).
    pub(crate) fn due(&self, epoch: u64, host: Option<&str>) -> bool {
        self.epoch == epoch && host.is_none_or(|h| self.to.as_deref().is_none_or(|to| to == h))
    }
}

/// A volume while the server runs.
#[derive(Debug)]
pub struct Volume {
    /// Its configuration as created; who may use it is [`Volume::access`], which the operator
    /// can change later (`anonymous` and `hosts` here are where it started).
    pub config: VolumeConfig,
    access: RwLock<VolumeAccess>,
    /// Its data.
    pub file: Arc<VolumeFile>,
    table: Mutex<LeaseTable>,
    conns: Mutex<Vec<ConnEntry>>,
    /// Serialises lease changes (grants, flips, rollbacks, revokes).
    pub(crate) lease_lock: tokio::sync::Mutex<()>,
    pub(crate) pending: Mutex<Option<PendingFlip>>,
    pub(crate) pending_gen: AtomicU64,
    /// Deleted: no connection may attach any more.
    removed: AtomicBool,
    /// When each lease holder's host lost its last connection (see `lease::expiry`).
    orphaned: Mutex<HashMap<String, Instant>>,
    /// When this volume was loaded or created: the orphan time of leases nobody connected to.
    loaded: Instant,
    /// Its role in cluster mode (single-node otherwise).
    pub role: crate::cluster::role::RoleCell,
}

impl Volume {
    pub(crate) fn new(config: VolumeConfig, file: VolumeFile, table: LeaseTable) -> Volume {
        Volume {
            access: RwLock::new(config.access()),
            config,
            file: Arc::new(file),
            table: Mutex::new(table),
            conns: Mutex::new(Vec::new()),
            lease_lock: tokio::sync::Mutex::new(()),
            pending: Mutex::new(None),
            pending_gen: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            orphaned: Mutex::new(HashMap::new()),
            loaded: Instant::now(),
            role: Default::default(),
        }
    }

    /// Since when `host` has had no connection, or `None` while it has one.
    pub(crate) fn orphaned_since(&self, host: &str) -> Option<Instant> {
        let conns = self.conns.lock().expect("conns lock");
        if conns
            .iter()
            .any(|c| c.holder.as_ref().is_some_and(|h| h.host == host))
        {
            return None;
        }
        let orphaned = self.orphaned.lock().expect("orphaned lock");
        Some(orphaned.get(host).copied().unwrap_or(self.loaded))
    }

    /// Whether the volume was deleted (a connection that looked it up before may not attach).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::SeqCst);
    }

    /// Who may use the volume now.
    pub fn access(&self) -> VolumeAccess {
        self.access.read().expect("access lock").clone()
    }

    /// The configuration with the current access policy, as reported and persisted.
    pub fn current_config(&self) -> VolumeConfig {
        let access = self.access();
        VolumeConfig {
            anonymous: access.anonymous,
            hosts: access.hosts,
            ..self.config.clone()
        }
    }

    pub(crate) fn set_access(&self, access: VolumeAccess) {
        *self.access.write().expect("access lock") = access;
    }

    /// A copy of the current lease table.
    pub fn table(&self) -> LeaseTable {
        self.table.lock().expect("table lock").clone()
    }

    pub(crate) fn set_table(&self, t: LeaseTable) {
        *self.table.lock().expect("table lock") = t;
    }

    /// Connections whose holder is on `host`.
    pub(crate) fn conns_of_host(&self, host: &str) -> Vec<ConnEntry> {
        self.conns
            .lock()
            .expect("conns lock")
            .iter()
            .filter(|c| c.holder.as_ref().is_some_and(|h| h.host == host))
            .cloned()
            .collect()
    }

    /// Connections of exactly this holder.
    pub(crate) fn conns_of_holder(&self, holder: &Holder) -> Vec<ConnEntry> {
        self.conns
            .lock()
            .expect("conns lock")
            .iter()
            .filter(|c| c.holder.as_ref() == Some(holder))
            .cloned()
            .collect()
    }

    /// Anonymous connections.
    pub(crate) fn anonymous_conns(&self) -> Vec<ConnEntry> {
        self.conns
            .lock()
            .expect("conns lock")
            .iter()
            .filter(|c| c.holder.is_none())
            .cloned()
            .collect()
    }

    /// Every connection.
    pub(crate) fn all_conns(&self) -> Vec<ConnEntry> {
        self.conns.lock().expect("conns lock").clone()
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.lock().expect("conns lock").len()
    }

    /// Adds a connection that was granted its access; it stays until the guard is dropped.
    pub(crate) fn add_conn(self: &Arc<Self>, entry: ConnEntry) -> Attached {
        let id = entry.id;
        if let Some(h) = &entry.holder {
            self.orphaned.lock().expect("orphaned lock").remove(&h.host);
        }
        self.conns.lock().expect("conns lock").push(entry);
        Attached {
            vol: self.clone(),
            id,
        }
    }

    /// Removes a connection when its task ends (see [`Attached`]).
    pub fn detach(&self, id: u64) {
        let mut conns = self.conns.lock().expect("conns lock");
        if let Some(i) = conns.iter().position(|c| c.id == id) {
            let c = conns.swap_remove(i);
            c.gate.mark_gone();
            let host = c.holder.as_ref().map(|h| h.host.as_str());
            if let Some(host) = host.filter(|&h| !conns.iter().any(|c| c.holder_host() == Some(h)))
            {
                let mut orphaned = self.orphaned.lock().expect("orphaned lock");
                orphaned.insert(host.to_string(), Instant::now());
            }
        }
    }

    /// Info for the API.
    pub fn info(&self) -> VolumeInfo {
        VolumeInfo {
            config: self.current_config(),
            epoch: self.table().epoch,
            connections: self.connection_count(),
        }
    }

    /// Info for the API, with the epoch of `table` (a replicated volume's, read from etcd on a
    /// node that is not its master).
    pub fn info_with(&self, table: &LeaseTable) -> VolumeInfo {
        VolumeInfo {
            epoch: table.epoch,
            ..self.info()
        }
    }

    /// Makes the standby entries of the current table orphaned as of now (a new master's table:
    /// their hosts were connected to the old master until it went away).
    pub(crate) fn restart_orphan_clock(&self) {
        let now = Instant::now();
        let mut orphaned = self.orphaned.lock().expect("orphaned lock");
        for h in &self.table().standby {
            orphaned.insert(h.host.clone(), now);
        }
    }

    /// Lease view for the API.
    pub fn lease_view(&self) -> LeaseView {
        self.lease_view_of(self.table())
    }

    /// Lease view of `t` (a replicated volume's table read from etcd) with this node's
    /// connections.
    pub fn lease_view_of(&self, t: LeaseTable) -> LeaseView {
        let conns = self.conns.lock().expect("conns lock").clone();
        let count = |h: &Holder| {
            conns
                .iter()
                .filter(|c| c.holder.as_ref() == Some(h))
                .count()
        };
        let mut leases = Vec::new();
        let mut push = |h: &Holder, state| {
            leases.push(LeaseEntry {
                host: h.host.clone(),
                instance: h.instance.clone(),
                state,
                connections: count(h),
            })
        };
        if let Some(p) = &t.primary {
            push(p, LeaseState::Primary);
        }
        t.standby.iter().for_each(|h| push(h, LeaseState::Standby));
        t.deactivated
            .iter()
            .for_each(|h| push(h, LeaseState::Deactivated));
        let armed = self
            .pending
            .lock()
            .expect("pending lock")
            .as_ref()
            .map(|p| ArmedFlipInfo {
                to: p.to.clone(),
                migration: p.migration.clone(),
                epoch: p.epoch,
            });
        LeaseView {
            volume: self.config.name.clone(),
            epoch: t.epoch,
            leases,
            anonymous_connections: conns.iter().filter(|c| c.holder.is_none()).count(),
            flip_pending: armed.is_some(),
            can_roll_back: t.previous.is_some(),
            armed,
        }
    }
}
