//! User input: the agent's settings (`migrated --config FILE.toml`, overridden by flags) and
//! the description of a guest (`migratectl run CONFIG.toml`).
//!
//! Agent TOML example:
//! ```toml
//! host_id = "host-a"
//! state_dir = "/var/lib/migrated"
//! listen = "10.0.0.1:7070"          # REST API for peers
//! socket = "/run/migrated/migrated.sock"
//! storaged_api = "10.0.0.9:10810"      # a storaged cluster: "10.0.0.9:10810,10.0.0.10:10810"
//! storaged_nbd = "10.0.0.9:10809"      # a storaged cluster: "10.0.0.9:10809,10.0.0.10:10809"
//! vmm_binary = "/usr/local/bin/vmm"
//! vhost_user_binary = "/usr/local/bin/vhost-user-blk"
//! token_file = "/etc/migrated/token"  # the cluster's shared secret for the REST API
//! storaged_token_file = "/etc/migrated/token"  # storaged's API token, if it has one
//! tls_dir = "/etc/vmhop/tls"         # this host's certificate (`storaged pki host`): TLS
//!                                    # to storaged's NBD, between VMMs and between agents
//! storaged_name = "storage"          # the host id in storaged's certificate
//! [peers]
//! host-b = "10.0.0.2:7070"
//! ```
//!
//! Guest TOML example:
//! ```toml
//! name = "vm1"
//! kernel = "/images/vmlinux"
//! cmdline = "console=ttyS0 root=/dev/vda"
//! memory_mib = 256
//! vcpus = 1
//! [[disks]]
//! volume = "vm1-root"            # a storaged volume, opened with a lease
//! [[disks]]
//! volume = "vm1-data"
//! backend = "vhost-user"         # served by its own vhost-user-blk process, not the VMM
//! [[disks]]
//! path = "/images/tools.ext4"    # a file that exists at the same path on every host
//! read_only = true
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use vmhop_common::config::{load_toml, FileError};
use vmhop_common::http::HttpTls;
use vmhop_common::tls::{ClientCert, HostTls};
use vmhop_common::token::Token;

/// Default REST listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default Unix socket for local tools.
pub const DEFAULT_SOCKET: &str = "/run/migrated/migrated.sock";
/// Default storaged REST API.
pub const DEFAULT_STORAGED_API: &str = "127.0.0.1:10810";
/// Default storaged NBD address.
pub const DEFAULT_STORAGED_NBD: &str = "127.0.0.1:10809";
/// Default VMM binary.
pub const DEFAULT_VMM_BINARY: &str = "/usr/local/bin/vmm";
/// The vhost-user disk backend's binary name; by default it is found beside the VMM binary.
pub const VHOST_USER_BINARY_NAME: &str = "vhost-user-blk";
/// The VMM's bounds on vCPUs and disks, checked here before a guest is accepted.
pub use vmm_api::config::{MAX_DISKS, MAX_VCPUS};

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read or does not parse for this schema.
    #[error(transparent)]
    File(#[from] FileError),
    /// A required setting is missing.
    #[error("missing setting {0} (flag or config file)")]
    Missing(&'static str),
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// The token file cannot be used.
    #[error(transparent)]
    Token(#[from] vmhop_common::token::TokenError),
    /// The TLS directory cannot be used.
    #[error("TLS directory {0}")]
    Tls(PathBuf, #[source] vmhop_common::tls::TlsError),
    /// The certificate is another host's.
    #[error("host_id is {host_id:?}, but the certificate in {} is host {certificate:?}", dir.display())]
    NotThisHost {
        /// The configured host id.
        host_id: String,
        /// The TLS directory.
        dir: PathBuf,
        /// Who the certificate names.
        certificate: String,
    },
    /// storaged's REST API is on another host, but its NBD address was not given: the VMMs
    /// would dial the default on this host.
    #[error(
        "storaged_api is {api}, on another host, but storaged_nbd (--storaged-nbd) is not \
         set, so the VMMs would dial {DEFAULT_STORAGED_NBD}: set it to storaged's NBD address \
         as this host reaches it (storaged's nbd_listen, port 10809 by default)"
    )]
    StoragedNbdUnknown {
        /// The API address given.
        api: String,
    },
    /// A peer given on the command line is not `ID=HOST:PORT`.
    #[error("{0:?}: expected ID=HOST:PORT")]
    PeerSyntax(String),
}

/// A peer as `--peer` gives it: `ID=HOST:PORT`.
pub fn parse_peer(s: &str) -> Result<(String, String), ConfigError> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| ConfigError::PeerSyntax(s.to_string()))?;
    Ok((id.to_string(), addr.to_string()))
}

/// The agent's settings as written in its TOML file; every field optional (flags win).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigFile {
    /// This host's id (the lease holder name at storaged).
    pub host_id: Option<String>,
    /// Durable state (state.redb) and the instances' work directories.
    pub state_dir: Option<PathBuf>,
    /// REST listen address for peers.
    pub listen: Option<SocketAddr>,
    /// Unix socket for local tools.
    pub socket: Option<PathBuf>,
    /// storaged REST API address.
    pub storaged_api: Option<String>,
    /// storaged NBD address as this host reaches it (cluster mode: the storaged nodes' NBD
    /// addresses, comma-separated; the VMM's disks try them in order).
    pub storaged_nbd: Option<String>,
    /// The VMM binary.
    pub vmm_binary: Option<PathBuf>,
    /// The vhost-user disk backend binary (default: `vhost-user-blk` beside the VMM binary).
    pub vhost_user_binary: Option<PathBuf>,
    /// IP the destination VMMs listen on for migration streams (default: the listen IP).
    pub migration_ip: Option<std::net::IpAddr>,
    /// Milliseconds without an answer after which a peer counts as lost during a migration.
    pub peer_timeout_ms: Option<u64>,
    /// Other hosts: id -> REST address.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// File written with `{"listen": ADDR, "socket": PATH}` once the agent serves.
    pub ready_file: Option<PathBuf>,
    /// File with the cluster's shared secret: the REST API (TCP) takes only requests that
    /// carry it, and requests to peers carry it (see [`vmhop_common::token`]).
    pub token_file: Option<PathBuf>,
    /// File with the token storaged's REST API requires (`storaged serve --api-token-file`).
    pub storaged_token_file: Option<PathBuf>,
    /// This host's TLS directory (`storaged pki host`, its certificate naming `host_id`): the
    /// VMMs reach storaged's NBD and each other's migration streams in TLS with it, and the
    /// REST API on `listen` and the calls to peers run in mutual TLS.
    pub tls_dir: Option<PathBuf>,
    /// The host id in storaged's certificate [default: the IP address of `storaged_nbd`].
    pub storaged_name: Option<String>,
}

/// Effective settings.
#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// This host's id.
    pub host_id: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// REST listen address.
    pub listen: SocketAddr,
    /// Unix socket path.
    pub socket: PathBuf,
    /// storaged REST API.
    pub storaged_api: String,
    /// storaged NBD.
    pub storaged_nbd: String,
    /// VMM binary.
    pub vmm_binary: PathBuf,
    /// vhost-user disk backend binary.
    pub vhost_user_binary: PathBuf,
    /// Migration stream IP.
    pub migration_ip: std::net::IpAddr,
    /// Peer loss timeout.
    pub peer_timeout_ms: u64,
    /// Peers.
    pub peers: BTreeMap<String, String>,
    /// Ready file.
    pub ready_file: Option<PathBuf>,
    /// The cluster's shared secret, if one is set.
    #[serde(skip)]
    pub token: Option<Token>,
    /// The token of storaged's API, if it requires one.
    #[serde(skip)]
    pub storaged_token: Option<Token>,
    /// The file it was read from (named in the commands the operator is told to run).
    pub storaged_token_file: Option<PathBuf>,
    /// Log as JSON lines (`--log-json`); the VMMs and disk backends this agent starts do too.
    pub log_json: bool,
    /// This host's TLS directory.
    pub tls_dir: Option<PathBuf>,
    /// Its certificates, read at start.
    #[serde(skip)]
    pub tls: Option<AgentTls>,
    /// The host id storaged's certificate must prove.
    pub storaged_name: Option<String>,
}

impl AgentConfigFile {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<AgentConfigFile, ConfigError> {
        Ok(load_toml(path)?)
    }

    /// Applies `over` (flags) on top of `self` (file), fills defaults and validates.
    pub fn merge(self, over: AgentConfigFile) -> Result<AgentConfig, ConfigError> {
        let listen = match over.listen.or(self.listen) {
            Some(l) => l,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|_| ConfigError::Invalid("default listen".into()))?,
        };
        let mut peers = self.peers;
        peers.extend(over.peers);
        let host_id = over
            .host_id
            .or(self.host_id)
            .ok_or(ConfigError::Missing("host_id"))?;
        validate_name("host_id", &host_id)?;
        for id in peers.keys() {
            validate_name("peer id", id)?;
        }
        let vmm_binary: PathBuf = over
            .vmm_binary
            .or(self.vmm_binary)
            .unwrap_or_else(|| DEFAULT_VMM_BINARY.into());
        let vhost_user_binary = over
            .vhost_user_binary
            .or(self.vhost_user_binary)
            .unwrap_or_else(|| vmm_binary.with_file_name(VHOST_USER_BINARY_NAME));
        let tls_dir = over.tls_dir.or(self.tls_dir);
        let storaged_token_file = over.storaged_token_file.or(self.storaged_token_file);
        let storaged_api = over
            .storaged_api
            .or(self.storaged_api)
            .unwrap_or_else(|| DEFAULT_STORAGED_API.into());
        let storaged_nbd = match over.storaged_nbd.or(self.storaged_nbd) {
            Some(nbd) => nbd,
            None if is_local(&storaged_api) => DEFAULT_STORAGED_NBD.into(),
            None => return Err(ConfigError::StoragedNbdUnknown { api: storaged_api }),
        };
        Ok(AgentConfig {
            state_dir: over
                .state_dir
                .or(self.state_dir)
                .ok_or(ConfigError::Missing("state_dir"))?,
            listen,
            socket: over
                .socket
                .or(self.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            storaged_api,
            storaged_nbd,
            vmm_binary,
            vhost_user_binary,
            migration_ip: over
                .migration_ip
                .or(self.migration_ip)
                .unwrap_or(listen.ip()),
            peer_timeout_ms: over
                .peer_timeout_ms
                .or(self.peer_timeout_ms)
                .unwrap_or(5_000),
            peers,
            ready_file: over.ready_file.or(self.ready_file),
            token: over
                .token_file
                .or(self.token_file)
                .map(|p| Token::load(&p))
                .transpose()?,
            storaged_token: storaged_token_file
                .as_deref()
                .map(Token::load)
                .transpose()?,
            storaged_token_file,
            log_json: false,
            tls: tls_dir
                .as_deref()
                .map(|d| AgentTls::load(d, &host_id))
                .transpose()?,
            tls_dir,
            storaged_name: over.storaged_name.or(self.storaged_name),
            host_id,
        })
    }
}

/// Whether the first of the addresses `addrs` (`HOST:PORT,...`) is on this host (loopback).
fn is_local(addrs: &str) -> bool {
    let first = addrs.split(',').next().unwrap_or_default().trim();
    let host = first.rsplit_once(':').map_or(first, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The agent's TLS, ready to serve and to call peers.
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// The host's certificates.
    pub host: HostTls,
    /// The REST API's server side: clients must present a certificate of the cluster.
    pub server: Arc<rustls::ServerConfig>,
    /// Calls to peers (each checks the peer's host id, see [`HttpTls::with_server`]).
    pub peers: HttpTls,
}

impl AgentTls {
    /// Reads the TLS directory `dir` and checks that its certificate is `host_id`'s.
    pub fn load(dir: &Path, host_id: &str) -> Result<AgentTls, ConfigError> {
        let err = |e| ConfigError::Tls(dir.into(), e);
        let host = HostTls::load(dir).map_err(err)?;
        if host.host_id() != host_id {
            return Err(ConfigError::NotThisHost {
                host_id: host_id.into(),
                dir: dir.into(),
                certificate: host.host_id().into(),
            });
        }
        Ok(AgentTls {
            server: host.server_config(ClientCert::Required).map_err(err)?,
            peers: HttpTls::new(&host, host_id).map_err(err)?,
            host,
        })
    }
}

/// Checks a host or instance name: 1-64 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn validate_name(what: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{what} {name:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

/// Which process serves a volume's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBackend {
    /// The VMM itself (its own storaged connection).
    #[default]
    Vmm,
    /// A `vhost-user-blk` process of its own, started and ended with the VMM.
    VhostUser,
}

/// One disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// A storaged volume (opened with a lease; follows the guest when it migrates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// A file at the same path on every host (tests, read-only tool disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// Offered read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Which process serves a volume (a file is always served by the VMM).
    #[serde(default, skip_serializing_if = "is_default")]
    pub backend: DiskBackend,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A guest: what `migratectl run` sends and what a migration carries to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Instance name, unique on a host; it stays the same across migrations.
    pub name: String,
    /// Uncompressed ELF vmlinux (same path on every host).
    #[schema(value_type = String)]
    pub kernel: PathBuf,
    /// Kernel command line (the VMM appends its devices).
    #[serde(default)]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Disks in order (the first is /dev/vda).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Start the guest from this snapshot (`vmm run --restore`, taken with `POST /v1/vm/snapshot`
    /// of a VM of the same shape and disks in the same state) instead of booting the kernel.
    /// Only the first start on a host uses it; a migration carries the running guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub restore: Option<PathBuf>,
}

fn default_memory_mib() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}

impl InstanceConfig {
    /// Reads a guest description; relative paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<InstanceConfig, ConfigError> {
        let mut c: InstanceConfig = load_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut c.kernel);
        if let Some(r) = &mut c.restore {
            abs(r);
        }
        for d in &mut c.disks {
            if let Some(p) = &mut d.path {
                abs(p);
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        validate_name("instance name", &self.name)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus must be 1..={MAX_VCPUS}, not {}", self.vcpus));
        }
        if !(16..=1 << 20).contains(&self.memory_mib) {
            return bad(format!(
                "memory_mib must be 16..=1048576, not {}",
                self.memory_mib
            ));
        }
        if self.disks.len() > MAX_DISKS {
            return bad(format!("at most {MAX_DISKS} disks"));
        }
        if !self.kernel.is_absolute() {
            return bad(format!(
                "kernel {}: not an absolute path",
                self.kernel.display()
            ));
        }
        if let Some(r) = self.restore.as_ref().filter(|r| !r.is_absolute()) {
            return bad(format!("restore {}: not an absolute path", r.display()));
        }
        for d in &self.disks {
            match (&d.volume, &d.path) {
                (Some(v), None) => validate_name("volume", v)?,
                (None, Some(p)) if d.backend == DiskBackend::VhostUser => {
                    return bad(format!(
                        "disk {}: only a volume can have a vhost-user backend",
                        p.display()
                    ))
                }
                (None, Some(p)) if p.is_absolute() => {}
                (None, Some(p)) => {
                    return bad(format!("disk {}: not an absolute path", p.display()))
                }
                _ => return bad("a disk needs exactly one of `volume` and `path`".into()),
            }
        }
        Ok(())
    }

    /// The storaged volumes of this guest, in disk order.
    pub fn volumes(&self) -> Vec<String> {
        self.disks.iter().filter_map(|d| d.volume.clone()).collect()
    }
}

/// A guest with no disks, for the unit tests.
#[cfg(test)]
impl InstanceConfig {
    pub(crate) fn for_tests(name: &str) -> InstanceConfig {
        InstanceConfig {
            name: name.into(),
            kernel: "/k".into(),
            cmdline: String::new(),
            memory_mib: 64,
            vcpus: 1,
            disks: vec![],
            restore: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_in() {
        let file: AgentConfigFile = toml::from_str(
            "host_id = 'a'\nstate_dir = '/s'\nlisten = '10.0.0.1:7070'\n[peers]\nb = '10.0.0.2:7070'",
        )
        .unwrap();
        let flags = AgentConfigFile {
            host_id: Some("a2".into()),
            ..Default::default()
        };
        let c = file.merge(flags).unwrap();
        assert_eq!(c.host_id, "a2");
        assert_eq!(c.migration_ip.to_string(), "10.0.0.1");
        assert_eq!(c.peers["b"], "10.0.0.2:7070");
        assert!(AgentConfigFile::default()
            .merge(AgentConfigFile::default())
            .is_err());
    }

    #[test]
    fn a_remote_storaged_needs_its_nbd_address() {
        let file = |extra: &str| -> AgentConfigFile {
            toml::from_str(&format!("host_id = 'a'\nstate_dir = '/s'\n{extra}")).unwrap()
        };
        let defaults = file("").merge(AgentConfigFile::default()).unwrap();
        assert_eq!(defaults.storaged_nbd, DEFAULT_STORAGED_NBD);
        let local = file("storaged_api = '127.0.0.1:9000'");
        assert_eq!(
            local
                .merge(AgentConfigFile::default())
                .unwrap()
                .storaged_nbd,
            DEFAULT_STORAGED_NBD
        );
        let e = file("storaged_api = '10.0.0.9:10810'")
            .merge(AgentConfigFile::default())
            .unwrap_err();
        assert!(matches!(e, ConfigError::StoragedNbdUnknown { .. }), "{e}");
        assert!(e.to_string().contains("--storaged-nbd"), "{e}");
        let flags = AgentConfigFile {
            storaged_nbd: Some("10.0.0.9:10809".into()),
            ..Default::default()
        };
        let c = file("storaged_api = 'storage:10810'").merge(flags).unwrap();
        assert_eq!(c.storaged_nbd, "10.0.0.9:10809");
    }

    #[test]
    fn the_shipped_examples_parse() {
        let mut agent: AgentConfigFile =
            toml::from_str(include_str!("../../scripts/systemd/migrated.toml.example")).unwrap();
        assert_eq!(agent.token_file, Some("/etc/migrated/token".into()));
        // The token file itself is the host's; one of this test's own stands in.
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef\n").unwrap();
        agent.token_file = Some(token.clone());
        agent.storaged_token_file = Some(token);
        assert_eq!(agent.tls_dir, Some("/etc/vmhop/tls".into()));
        assert_eq!(agent.storaged_name.as_deref(), Some("storage"));
        // So are its certificates: a TLS directory of the test's own stands in.
        let ca = dir.path().join("ca");
        vmhop_common::pki::create_ca(&ca, "test", 1).unwrap();
        let req = vmhop_common::pki::HostCertRequest {
            host_id: "host-a".into(),
            ips: vec![],
            dns_names: vec![],
            days: 1,
        };
        vmhop_common::pki::issue_host(&ca, &req, &dir.path().join("tls")).unwrap();
        agent.tls_dir = Some(dir.path().join("tls"));
        let c = agent.merge(AgentConfigFile::default()).unwrap();
        assert_eq!(c.tls.as_ref().map(|t| t.host.host_id()), Some("host-a"));
        // Another host's certificate is refused.
        let other = vmhop_common::pki::HostCertRequest {
            host_id: "host-b".into(),
            ..req
        };
        vmhop_common::pki::issue_host(&ca, &other, &dir.path().join("tls-b")).unwrap();
        let wrong = AgentConfigFile {
            tls_dir: Some(dir.path().join("tls-b")),
            ..Default::default()
        };
        let e = toml::from_str::<AgentConfigFile>(include_str!(
            "../../scripts/systemd/migrated.toml.example"
        ))
        .unwrap()
        .merge(AgentConfigFile {
            token_file: Some(dir.path().join("token")),
            storaged_token_file: Some(dir.path().join("token")),
            ..wrong
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::NotThisHost { .. }), "{e}");
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.token.unwrap().secret(), "0123456789abcdef");
        let guest: InstanceConfig = toml::from_str(include_str!(
            "../../scripts/systemd/migrated-guest.toml.example"
        ))
        .unwrap();
        guest.validate().unwrap();
        assert_eq!(guest.volumes(), vec!["vm1-root", "vm1-data"]);
        // The example is the test guest: its command line is the one `guest-images/build`
        // prints (GUEST_CMDLINE).
        assert_eq!(
            guest.cmdline,
            include_str!("../../guest-images/kernel/cmdline").trim()
        );
    }

    #[test]
    fn guest_descriptions_are_checked() {
        let ok: InstanceConfig = toml::from_str(
            "name='vm1'\nkernel='/k'\n[[disks]]\nvolume='r'\n[[disks]]\npath='/x'\nread_only=true",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.volumes(), vec!["r".to_string()]);
        let mut bad = ok.clone();
        bad.name = "../x".into();
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.disks.push(DiskSpec {
            volume: Some("v".into()),
            path: Some("/p".into()),
            read_only: false,
            backend: DiskBackend::Vmm,
        });
        assert!(bad.validate().is_err());
        let vu: InstanceConfig =
            toml::from_str("name='vm1'\nkernel='/k'\n[[disks]]\nvolume='r'\nbackend='vhost-user'")
                .unwrap();
        vu.validate().unwrap();
        assert_eq!(vu.disks[0].backend, DiskBackend::VhostUser);
        let file_vu: InstanceConfig =
            toml::from_str("name='vm1'\nkernel='/k'\n[[disks]]\npath='/x'\nbackend='vhost-user'")
                .unwrap();
        assert!(file_vu.validate().is_err());
        let mut bad = ok.clone();
        bad.restore = Some("relative.snap".into());
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.vcpus = 0;
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<InstanceConfig>("name='a'\nkernel='/k'\nbogus=1").is_err());
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let e = AgentConfigFile::load(&path).unwrap_err();
        assert_eq!(e.to_string(), format!("reading {}", path.display()));
        let cause = std::error::Error::source(&e).unwrap();
        assert!(cause.is::<std::io::Error>());
        std::fs::write(&path, "bogus = 1").unwrap();
        let e = InstanceConfig::load(&path).unwrap_err();
        assert_eq!(e.to_string(), format!("parsing {}", path.display()));
    }

    #[test]
    fn a_guest_file_resolves_its_snapshot_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.toml");
        std::fs::write(&path, "name='vm1'\nkernel='/k'\nrestore='vm1.snap'\n").unwrap();
        let g = InstanceConfig::load(&path).unwrap();
        assert_eq!(g.restore, Some(dir.path().join("vm1.snap")));
    }
}
