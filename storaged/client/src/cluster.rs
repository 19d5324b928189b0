//! The REST types of storaged's cluster mode (`serve --etcd`): creating a replicated volume
//! and asking where its copies are and who is master. The records in etcd have the same
//! shapes.

use crate::api::VolumeConfig;
use serde::{Deserialize, Serialize};

/// `POST /v1/cluster/volumes`: a volume with `replicas` copies on as many nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicatedVolumeRequest {
    /// The volume.
    pub config: VolumeConfig,
    /// Number of copies (nodes), at least 1.
    pub replicas: u32,
}

/// Where a volume's copies are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Placement {
    /// The volume's configuration.
    pub config: VolumeConfig,
    /// The nodes holding a copy.
    pub replicas: Vec<String>,
}

/// The copies that hold every acknowledged write.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InSync {
    /// Node ids.
    pub members: Vec<String>,
    /// The term of the master that last wrote the set (0: no master yet).
    pub term: i64,
}

/// `GET /v1/cluster/volumes/{name}`: a replicated volume's state in etcd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicatedVolumeView {
    /// Placement.
    pub placement: Placement,
    /// In-sync set.
    pub insync: InSync,
    /// The elected master's node id, if any.
    pub master: Option<String>,
    /// Its term (0 when none).
    pub term: i64,
    /// The NBD addresses of the volume's nodes, in placement order (those that are live).
    pub nbd_addresses: Vec<String>,
    /// The volume's role on the node that answered: `master` once it serves clients as the
    /// master, `not-master`, or `None` where the volume has no copy.
    #[serde(default)]
    pub role_here: Option<String>,
}
