//! Two KVM hosts "a" and "b" on a storaged cluster: one etcd member and the storaged nodes
//! [`NODES`], each on a test host (network namespace) of its own, all on one bridge with the
//! KVM hosts. TLS everywhere with one cluster CA (each node's certificate names its node id and
//! its address), one token for every REST API. Each KVM host runs its migrated, which gives
//! every node's NBD address to its VMMs and disk backends, and reaches storaged's REST API
//! through the first node (a lease change sent there is redirected to the volume's master).
//! Everything is stopped on drop.

use crate::cluster::Cluster;
use crate::etcd::Etcd;
use crate::migrated::Migrated;
use crate::netns::Rig;
use crate::ns_storaged::storaged_cli;
use crate::two_hosts::{start_agents, HostsStorage, StaleWriter};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use storaged_client::cluster::ReplicatedVolumeView;

/// The storaged nodes: their node ids, which are also their test hosts' names.
pub const NODES: [&str; 2] = ["storage-1", "storage-2"];

/// etcd, the storaged nodes and the two KVM hosts.
pub struct ClusterHosts {
    // Field order is drop order: the agents (and their VMMs) first, the namespaces last.
    /// Host a.
    pub a: Migrated,
    /// Host b.
    pub b: Migrated,
    /// etcd and the storaged nodes.
    pub cluster: Cluster,
    /// The namespaces ("etcd", the nodes, "a", "b").
    pub rig: Rig,
    token_file: PathBuf,
}

impl ClusterHosts {
    /// Starts everything under `dir`; the agents declare a peer lost after `peer_timeout_ms`.
    pub fn start(dir: &Path, peer_timeout_ms: u64) -> Result<ClusterHosts> {
        let mut names = vec!["etcd"];
        names.extend(NODES);
        names.extend(["a", "b"]);
        let mut rig = Rig::new(&names)?;
        // The fixture reads the volumes' views from the nodes' REST APIs, from here.
        rig.reach_from_here()?;
        let token_file = crate::write_token(dir, "cluster-hosts-secret")?;
        let e = rig.host("etcd").clone();
        let etcd = Etcd::start_members(dir, 1, &e.addr.to_string(), Some(&e.netns))?;
        let mut cluster = Cluster::start_on(etcd, dir, &[], true)?;
        cluster.require_api_token(&token_file)?;
        for n in NODES {
            cluster.add_node_in(n, rig.host(n))?;
        }
        let api = cluster.node(NODES[0]).storaged.api.to_string();
        let nbd = cluster.nbd_addresses().join(",");
        let storage = HostsStorage {
            api: &api,
            nbd: &nbd,
            // Each node proves its own id: clients check the address they reach.
            name: None,
            token_file: &token_file,
        };
        let (a, b) = start_agents(dir, &rig, cluster.pki.as_ref(), &storage, peer_timeout_ms)?;
        Ok(ClusterHosts {
            a,
            b,
            cluster,
            rig,
            token_file,
        })
    }

    /// The agent of host `name`.
    pub fn agent(&self, name: &str) -> &Migrated {
        crate::migrated::agent_named(&self.a, &self.b, name)
    }

    /// `storaged ARGS...` against node `node`'s REST API, run on its host; returns stdout.
    pub fn cli(&self, node: &str, args: &[&str]) -> Result<String> {
        let api = self.cluster.node(node).storaged.api.to_string();
        storaged_cli(self.rig.host(node), &api, &self.token_file, args)
    }

    /// The file of the token every REST API takes.
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// Waits until `volume` has a master that serves it (as node `via` sees it); returns the
    /// master's id and the view.
    pub fn wait_master(&self, via: &str, volume: &str) -> Result<(String, ReplicatedVolumeView)> {
        crate::block_on(self.cluster.wait_master(via, volume))
    }

    /// Waits until node `via` sees `volume` served by a master other than `not`; returns it
    /// and the view from the new master once it serves (its term begun: the in-sync set as
    /// that term wrote it).
    pub fn wait_new_master(
        &self,
        via: &str,
        volume: &str,
        not: &str,
    ) -> Result<(String, ReplicatedVolumeView)> {
        let v = crate::block_on(self.cluster.wait_view(via, volume, "a new master", |v| {
            v.master.as_deref().is_some_and(|m| m != not)
        }))?;
        let master = v.master.clone().context("a master")?;
        let v = crate::block_on(self.cluster.wait_view(
            &master,
            volume,
            "the new master serving",
            |v| v.role_here.as_deref() == Some("master") && v.insync.term == v.term,
        ))?;
        Ok((master, v))
    }

    /// A connection of host `host` to `volume` as its primary holder (see [`StaleWriter`]),
    /// given every node's address, in TLS with the host's certificate.
    pub fn stale_writer(&self, host: &str, volume: &str) -> Result<StaleWriter> {
        StaleWriter::open_at(
            self.rig.host(host),
            self.cluster.nbd_addresses(),
            self.cluster.client_tls(host)?,
            volume,
        )
    }
}

/// The node of [`NODES`] that is not `node`.
pub fn other_node(node: &str) -> &'static str {
    if node == NODES[0] {
        NODES[1]
    } else {
        NODES[0]
    }
}
