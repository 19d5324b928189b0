//! `storaged serve` settings: a TOML file, overridden by command-line flags.

use crate::lease::expiry::StandbyPolicy;
use crate::server::{Limits, REQUEST_OVERHEAD};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use storaged_client::protocol::MAX_REQUEST_LEN;
use thiserror::Error;
use vmhop_common::config::{load_toml, FileError};

/// A configuration that could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A required setting is missing.
    #[error("missing setting {0} (flag or config file)")]
    Missing(&'static str),
    /// A setting is out of its range.
    #[error("{0} must be at least {1}")]
    TooSmall(&'static str, u64),
    /// A cluster node listens on a wildcard address, which it cannot publish to the others.
    #[error(
        "{0} is {1}: a cluster node publishes its listen addresses in etcd for the other \
         nodes and the clients, so give it this host's own address"
    )]
    Wildcard(&'static str, SocketAddr),
}

/// The `[serve]` settings as written in the TOML file; every field optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfigFile {
    /// Data directory (volumes and metadata).
    pub data_dir: Option<PathBuf>,
    /// NBD listen address.
    pub nbd_listen: Option<SocketAddr>,
    /// REST API listen address.
    pub api_listen: Option<SocketAddr>,
    /// File to write the bound addresses to once listening.
    pub ready_file: Option<PathBuf>,
    /// Seconds open connections get to finish after SIGTERM.
    pub shutdown_grace_secs: Option<u64>,
    /// Seconds a flip waits for the old primary's admitted requests.
    pub drain_limit_secs: Option<u64>,
    /// The NBD export a client gets when it names none.
    pub default_export: Option<String>,
    /// Threads NBD connections run on (0: the main runtime's).
    pub nbd_threads: Option<usize>,
    /// Open NBD connections in all.
    pub max_connections: Option<usize>,
    /// NBD connections per volume.
    pub max_connections_per_volume: Option<usize>,
    /// Seconds a client may take for the NBD handshake.
    pub handshake_timeout_secs: Option<u64>,
    /// Seconds a connection without a lease may idle.
    pub idle_timeout_secs: Option<u64>,
    /// Seconds a client may leave its replies unread.
    pub reply_timeout_secs: Option<u64>,
    /// Bytes of requests in flight per connection.
    pub inflight_per_connection: Option<u32>,
    /// Bytes of requests in flight over all connections.
    pub inflight_total: Option<u64>,
    /// Seconds a standby lease lives without a connection.
    pub standby_expiry_secs: Option<u64>,
    /// Standby leases per volume.
    pub max_standby: Option<usize>,
    /// File with the token the REST API requires ([`vmhop_common::token`]).
    pub api_token_file: Option<PathBuf>,
    /// This host's TLS directory ([`vmhop_common::tls`]): NBD clients then upgrade with
    /// `NBD_OPT_STARTTLS` and prove their host id with a certificate of the cluster's CA.
    pub tls_dir: Option<PathBuf>,
    /// With `tls_dir`: whether clients on loopback may still use plaintext (default true;
    /// their lease option is then taken at its word).
    pub plaintext_loopback: Option<bool>,
    /// Cluster mode: etcd endpoints (`http://host:port`); none: single node.
    pub etcd: Option<Vec<String>>,
    /// Cluster mode: this node's id.
    pub node_id: Option<String>,
    /// Cluster mode: the replication listener's address.
    pub repl_listen: Option<SocketAddr>,
    /// Cluster mode: TTL of this node's etcd lease, in seconds.
    pub etcd_lease_ttl_secs: Option<u64>,
    /// Cluster mode: milliseconds a master waits for a slave's ack before dropping it.
    pub replication_timeout_ms: Option<u64>,
}

/// Effective settings of `storaged serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// NBD listen address.
    pub nbd_listen: SocketAddr,
    /// REST API listen address.
    pub api_listen: SocketAddr,
    /// Where to record the bound addresses.
    pub ready_file: Option<PathBuf>,
    /// Seconds open connections get after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds a flip waits for draining.
    pub drain_limit_secs: u64,
    /// The NBD export a client gets when it names none.
    pub default_export: Option<String>,
    /// Threads NBD connections run on, each on one (see `server::Lanes`); 0: the main
    /// runtime's.
    pub nbd_threads: usize,
    /// What NBD clients may hold.
    pub limits: Limits,
    /// How long standby leases without a connection live, and how many a volume keeps.
    pub standby: StandbyPolicy,
    /// File with the token the REST API requires.
    pub api_token_file: Option<PathBuf>,
    /// This host's TLS directory.
    pub tls_dir: Option<PathBuf>,
    /// Whether loopback clients may skip TLS.
    pub plaintext_loopback: bool,
    /// Cluster mode, when etcd endpoints are given.
    pub cluster: Option<ClusterServeConfig>,
}

/// Cluster mode's settings of `storaged serve`.
#[derive(Debug, Clone)]
pub struct ClusterServeConfig {
    /// The cluster's settings.
    pub cluster: crate::cluster::ClusterConfig,
    /// The replication listener's address.
    pub repl_listen: SocketAddr,
}

impl ServeConfigFile {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<ServeConfigFile, ConfigError> {
        Ok(load_toml(path)?)
    }

    /// Applies `over` (flags) on top of `self` (file) and fills defaults.
    pub fn merge(self, over: ServeConfigFile) -> Result<ServeConfig, ConfigError> {
        let limits = limits(&self, &over)?;
        let standby = StandbyPolicy {
            expiry: pick(over.standby_expiry_secs, self.standby_expiry_secs)
                .map_or(StandbyPolicy::default().expiry, Duration::from_secs),
            max: pick(over.max_standby, self.max_standby).unwrap_or(StandbyPolicy::default().max),
        };
        let tls_dir = over.tls_dir.or(self.tls_dir);
        ServeConfig {
            data_dir: over
                .data_dir
                .or(self.data_dir)
                .ok_or(ConfigError::Missing("data_dir"))?,
            nbd_listen: over
                .nbd_listen
                .or(self.nbd_listen)
                .unwrap_or_else(|| "127.0.0.1:10809".parse().expect("literal")),
            api_listen: over
                .api_listen
                .or(self.api_listen)
                .unwrap_or_else(|| "127.0.0.1:10810".parse().expect("literal")),
            ready_file: over.ready_file.or(self.ready_file),
            shutdown_grace_secs: over
                .shutdown_grace_secs
                .or(self.shutdown_grace_secs)
                .unwrap_or(30),
            drain_limit_secs: over
                .drain_limit_secs
                .or(self.drain_limit_secs)
                .unwrap_or(30),
            default_export: over.default_export.or(self.default_export),
            nbd_threads: over
                .nbd_threads
                .or(self.nbd_threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            limits,
            standby,
            api_token_file: over.api_token_file.or(self.api_token_file),
            plaintext_loopback: over
                .plaintext_loopback
                .or(self.plaintext_loopback)
                .unwrap_or(true),
            cluster: match over.etcd.or(self.etcd) {
                None => None,
                Some(endpoints) => Some(ClusterServeConfig {
                    cluster: crate::cluster::ClusterConfig {
                        endpoints,
                        // With TLS the node id is the host id of the certificate (checked,
                        // or filled in, when the TLS directory is read).
                        node_id: match (over.node_id.or(self.node_id), &tls_dir) {
                            (Some(id), _) => id,
                            (None, Some(_)) => String::new(),
                            (None, None) => return Err(ConfigError::Missing("node_id")),
                        },
                        lease_ttl: std::time::Duration::from_secs(
                            over.etcd_lease_ttl_secs
                                .or(self.etcd_lease_ttl_secs)
                                .unwrap_or(5)
                                .max(1),
                        ),
                        replication_timeout: std::time::Duration::from_millis(
                            over.replication_timeout_ms
                                .or(self.replication_timeout_ms)
                                .unwrap_or(5000),
                        ),
                    },
                    repl_listen: over
                        .repl_listen
                        .or(self.repl_listen)
                        .unwrap_or_else(|| "127.0.0.1:10811".parse().expect("literal")),
                }),
            },
            tls_dir,
        }
        .checked()
    }
}

impl ServeConfig {
    /// Refuses what cannot work: a cluster node on a wildcard address.
    fn checked(self) -> Result<ServeConfig, ConfigError> {
        if let Some(c) = &self.cluster {
            for (key, addr) in [
                ("nbd_listen", self.nbd_listen),
                ("api_listen", self.api_listen),
                ("repl_listen", c.repl_listen),
            ] {
                if addr.ip().is_unspecified() {
                    return Err(ConfigError::Wildcard(key, addr));
                }
            }
        }
        Ok(self)
    }
}

/// The flag's value, else the file's.
fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

/// The NBD server's limits from the flags over the file, over the defaults.
fn limits(file: &ServeConfigFile, flags: &ServeConfigFile) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let secs = |flag, file, default| pick(flag, file).map_or(default, Duration::from_secs);
    let l = Limits {
        max_connections: pick(flags.max_connections, file.max_connections)
            .unwrap_or(d.max_connections),
        max_connections_per_volume: pick(
            flags.max_connections_per_volume,
            file.max_connections_per_volume,
        )
        .unwrap_or(d.max_connections_per_volume),
        handshake_timeout: secs(
            flags.handshake_timeout_secs,
            file.handshake_timeout_secs,
            d.handshake_timeout,
        ),
        idle_timeout: secs(
            flags.idle_timeout_secs,
            file.idle_timeout_secs,
            d.idle_timeout,
        ),
        reply_timeout: secs(
            flags.reply_timeout_secs,
            file.reply_timeout_secs,
            d.reply_timeout,
        ),
        inflight_per_connection: pick(flags.inflight_per_connection, file.inflight_per_connection)
            .unwrap_or(d.inflight_per_connection),
        inflight_total: pick(flags.inflight_total, file.inflight_total).unwrap_or(d.inflight_total),
    };
    let min_inflight = MAX_REQUEST_LEN + REQUEST_OVERHEAD;
    if l.inflight_per_connection < min_inflight {
        return Err(ConfigError::TooSmall(
            "inflight_per_connection",
            min_inflight.into(),
        ));
    }
    if l.inflight_total < l.inflight_per_connection.into() {
        return Err(ConfigError::TooSmall(
            "inflight_total",
            l.inflight_per_connection.into(),
        ));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let file: ServeConfigFile = toml::from_str(
            "data_dir = \"/a\"\nnbd_listen = \"127.0.0.1:1\"\nshutdown_grace_secs = 5\n",
        )
        .unwrap();
        let flags = ServeConfigFile {
            nbd_listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        };
        let c = file.merge(flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/a"));
        assert_eq!(c.nbd_listen.port(), 2);
        assert_eq!(c.shutdown_grace_secs, 5);
        assert!(ServeConfigFile::default()
            .merge(ServeConfigFile::default())
            .is_err());
        assert!(toml::from_str::<ServeConfigFile>("bogus = 1").is_err());
        assert_eq!(c.limits, Limits::default());
        let small = ServeConfigFile {
            data_dir: Some("/a".into()),
            inflight_per_connection: Some(1 << 20),
            ..Default::default()
        };
        assert!(small.merge(ServeConfigFile::default()).is_err());
        let file: ServeConfigFile =
            toml::from_str("data_dir = \"/a\"\nmax_connections = 3\nidle_timeout_secs = 9\n")
                .unwrap();
        let flags = ServeConfigFile {
            max_connections: Some(4),
            ..Default::default()
        };
        let c = file.merge(flags).unwrap();
        assert_eq!(c.limits.max_connections, 4);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(9));
        assert!(c.nbd_threads >= 1, "one NBD thread per CPU by default");
        let file: ServeConfigFile = toml::from_str("data_dir = \"/a\"\nnbd_threads = 0\n").unwrap();
        assert_eq!(
            file.merge(ServeConfigFile::default()).unwrap().nbd_threads,
            0
        );
    }

    #[test]
    fn a_cluster_node_listens_on_the_addresses_it_is_reached_at() {
        let node = |listen: &str| {
            let toml = format!(
                "data_dir = \"/a\"\netcd = [\"http://10.0.0.20:2379\"]\nnode_id = \"s1\"\n\
                 nbd_listen = \"10.0.0.9:10809\"\napi_listen = \"10.0.0.9:10810\"\n\
                 repl_listen = \"10.0.0.9:10811\"\n{listen}"
            );
            toml::from_str::<ServeConfigFile>(&toml)
                .unwrap()
                .merge(ServeConfigFile::default())
        };
        let c = node("").unwrap();
        assert_eq!(c.cluster.unwrap().repl_listen.port(), 10811);
        // The other nodes and the clients are sent the addresses a node listens on: a
        // wildcard one reaches nobody (or the sender itself).
        for key in ["nbd_listen", "api_listen", "repl_listen"] {
            let port = match key {
                "nbd_listen" => 10809,
                "api_listen" => 10810,
                _ => 10811,
            };
            let over = format!("{key} = \"0.0.0.0:{port}\"\n");
            let toml = format!(
                "data_dir = \"/a\"\netcd = [\"http://10.0.0.20:2379\"]\nnode_id = \"s1\"\n{over}"
            );
            let e = toml::from_str::<ServeConfigFile>(&toml)
                .unwrap()
                .merge(ServeConfigFile::default())
                .unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        // A single node may listen on every address.
        let single: ServeConfigFile =
            toml::from_str("data_dir = \"/a\"\nnbd_listen = \"0.0.0.0:10809\"\n").unwrap();
        assert!(single.merge(ServeConfigFile::default()).is_ok());
    }

    #[test]
    fn the_example_settings_of_a_cluster_node_are_valid() {
        let file: ServeConfigFile = toml::from_str(include_str!(
            "../../scripts/systemd/storaged-cluster.toml.example"
        ))
        .unwrap();
        let c = file.merge(ServeConfigFile::default()).unwrap();
        let cluster = c.cluster.expect("cluster mode");
        assert!(!cluster.cluster.endpoints.is_empty());
        assert!(c.tls_dir.is_some() && !c.plaintext_loopback);
    }
}
