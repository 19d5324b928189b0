//! A volume's role on this node: single-node (no cluster), master (with its replicas) or not
//! master (a slave, or while no master is elected). The NBD server asks it whether to accept a
//! client and how to run a write.

use super::replica::Replicas;
use super::Cluster;
use std::sync::{Arc, Mutex};

/// The role of one volume on this node.
#[derive(Clone, Default)]
pub enum Role {
    /// Not in cluster mode: the volume is served as a single copy.
    #[default]
    Single,
    /// This node is the volume's master.
    Master(Arc<Replicas>),
    /// Another node is master, or none is elected yet (the cluster, to ask etcd).
    NotMaster(Arc<Cluster>),
}

/// The role, changed by the volume's election task.
#[derive(Default)]
pub struct RoleCell(Mutex<Role>);

impl std::fmt::Debug for RoleCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match &*self.0.lock().expect("role lock") {
            Role::Single => "single",
            Role::Master(_) => "master",
            Role::NotMaster(_) => "not-master",
        };
        f.write_str(name)
    }
}

impl RoleCell {
    /// The current role.
    pub fn get(&self) -> Role {
        self.0.lock().expect("role lock").clone()
    }

    /// Sets the role.
    pub fn set(&self, role: Role) {
        *self.0.lock().expect("role lock") = role;
    }

    /// The replicas to run writes through, when this node is master.
    pub fn master(&self) -> Option<Arc<Replicas>> {
        match &*self.0.lock().expect("role lock") {
            Role::Master(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Whether clients must be turned away (another node is, or will be, master).
    pub fn refuses_clients(&self) -> bool {
        match &*self.0.lock().expect("role lock") {
            Role::Single => false,
            // A master whose etcd session may have ended takes no new client either.
            Role::Master(r) => !r.usable(),
            Role::NotMaster(_) => true,
        }
    }
}

impl Role {
    /// The cluster of a replicated volume (`None` for a single-node one).
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        match self {
            Role::Single => None,
            Role::Master(r) => Some(r.cluster().clone()),
            Role::NotMaster(c) => Some(c.clone()),
        }
    }
}
