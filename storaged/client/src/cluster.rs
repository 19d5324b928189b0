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

/// Where a replicated volume's master is, as a node that is not its master tells a client
/// (see [`crate::protocol::NBD_REP_ERR_NOT_MASTER`] and the REST API's 307 answers).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MasterHint {
    /// The master's node id.
    pub node: String,
    /// Its NBD address.
    pub nbd: String,
    /// Its REST API address.
    pub api: String,
}

impl std::fmt::Display for MasterHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its master is {} [{}{}] [{}{}]",
            self.node,
            crate::protocol::MASTER_NBD_TAG,
            self.nbd,
            MASTER_API_TAG,
            self.api
        )
    }
}

/// Tags the master's REST API address in a refusal's text (`[master-api=HOST:PORT]`).
pub const MASTER_API_TAG: &str = "master-api=";

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
