//! `storaged volume`: create, import, change, list, show and delete volumes.

use super::{parse_size, print_json, ApiArgs};
use anyhow::Result;
use clap::{Args, Subcommand};
use storaged_client::api::{AnonymousPolicy, VolumeConfig};

/// The settings of a new volume (`volume create`).
#[derive(Args)]
pub(crate) struct VolumeArgs {
    /// Volume name (also the NBD export name).
    name: String,
    /// Size: bytes, or with a K/M/G/T suffix (powers of 1024).
    #[arg(long)]
    size: String,
    /// Access for clients without a lease.
    #[arg(long, value_enum, default_value = "read-only-without-primary")]
    anonymous: AnonymousPolicy,
    /// A host that may hold leases on the volume (repeatable; none: any host of the
    /// cluster). Other hosts get no lease, not even standby, so they cannot flip it.
    #[arg(long = "host", value_name = "HOST_ID")]
    hosts: Vec<String>,
    /// The first data command of a standby connection flips the lease to it.
    #[arg(long)]
    flip_on_first_access: bool,
    /// A standby connection may promote itself with NBD_CMD_LEASE_FLIP (by default only
    /// the REST API, or a flip it armed, promotes a standby).
    #[arg(long)]
    flip_over_nbd: bool,
    /// Default deadline (ms) of armed flips.
    #[arg(long)]
    flip_timeout_ms: Option<u64>,
    /// What the volume holds (NBD clients see it as the export's description).
    #[arg(long)]
    description: Option<String>,
}

impl VolumeArgs {
    /// The volume's configuration as the API takes it.
    fn config(self) -> Result<VolumeConfig> {
        Ok(VolumeConfig {
            size: parse_size(&self.size)?,
            name: self.name,
            anonymous: self.anonymous,
            hosts: self.hosts,
            flip_on_first_access: self.flip_on_first_access,
            flip_over_nbd: self.flip_over_nbd,
            flip_timeout_ms: self.flip_timeout_ms,
            description: self.description,
        })
    }
}

#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create a sparse volume.
    Create {
        #[command(flatten)]
        volume: VolumeArgs,
        /// Cluster mode: keep the volume on this many nodes (this one and the next live
        /// ones), replicated synchronously.
        #[arg(long)]
        replicas: Option<u32>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Copy a raw image file into a volume (created with the file's size if missing).
    ///
    /// The copy runs over NBD under a primary lease of its own, released when the data is
    /// flushed; a volume on which another host holds the primary lease is refused unless
    /// --force.
    Import(Box<super::import::ImportArgs>),
    /// Change who may use a volume: its anonymous access (MODE) and its host list.
    ///
    /// What is not given stays as it is. `storaged volume set-access NAME MODE` changes the
    /// anonymous access alone: `read-write-without-primary` lets qemu-img and other NBD tools
    /// without a lease write to the volume while no host is primary.
    #[command(visible_alias = "set-access")]
    Access {
        /// Volume name.
        name: String,
        /// Access for clients without a lease (the same as --anonymous).
        #[arg(value_enum, value_name = "MODE", conflicts_with = "anonymous")]
        mode: Option<AnonymousPolicy>,
        /// Access for clients without a lease.
        #[arg(long, value_enum)]
        anonymous: Option<AnonymousPolicy>,
        /// The hosts that may hold leases (repeatable; replaces the list).
        #[arg(long = "host", value_name = "HOST_ID", conflicts_with = "any_host")]
        hosts: Vec<String>,
        /// Let any host of the cluster hold leases (empties the list).
        #[arg(long)]
        any_host: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one volume.
    Show {
        /// Volume name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a volume without open connections (its data is removed).
    Delete {
        /// Volume name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub(crate) async fn volume_cmd(cmd: VolumeCmd, json: bool) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            volume,
            replicas,
            api,
        } => {
            let cfg = volume.config()?;
            if let Some(replicas) = replicas {
                let req = storaged_client::cluster::ReplicatedVolumeRequest {
                    config: cfg,
                    replicas,
                };
                return print_json(&api.client()?.create_replicated_volume(&req).await?);
            }
            let v = api.client()?.create_volume(&cfg).await?;
            print_json(&v)
        }
        VolumeCmd::Import(args) => super::import::import(*args, json).await,
        VolumeCmd::Access {
            name,
            mode,
            anonymous,
            hosts,
            any_host,
            api,
        } => {
            let client = api.client()?;
            let mut access = client.volume(&name).await?.config.access();
            if let Some(a) = mode.or(anonymous) {
                access.anonymous = a;
            }
            if any_host {
                access.hosts.clear();
            } else if !hosts.is_empty() {
                access.hosts = hosts;
            }
            let v = client.set_access(&name, &access).await?;
            if json {
                return print_json(&v);
            }
            let access = v.config.access();
            let hosts = match access.hosts.is_empty() {
                true => "any host".to_string(),
                false => access.hosts.join(", "),
            };
            println!(
                "volume {name}: anonymous access {}; leases for {hosts}",
                policy_name(access.anonymous)
            );
            Ok(())
        }
        VolumeCmd::List { api } => {
            let vs = api.client()?.volumes().await?;
            if json {
                return print_json(&vs);
            }
            println!(
                "{:<24} {:>16} {:>6} {:>5}  ANONYMOUS",
                "NAME", "SIZE", "EPOCH", "CONNS"
            );
            for v in vs {
                println!(
                    "{:<24} {:>16} {:>6} {:>5}  {}",
                    v.config.name,
                    v.config.size,
                    v.epoch,
                    v.connections,
                    policy_name(v.config.anonymous)
                );
            }
            Ok(())
        }
        VolumeCmd::Show { name, api } => {
            let v = api.client()?.volume(&name).await?;
            print_json(&v)
        }
        VolumeCmd::Delete { name, api } => {
            api.client()?.delete_volume(&name).await?;
            match json {
                true => print_json(&serde_json::json!({ "deleted": name }))?,
                false => println!("deleted {name}"),
            }
            Ok(())
        }
    }
}

/// The policy as the command line and the API spell it.
pub(crate) fn policy_name(p: AnonymousPolicy) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{p:?}"))
}
