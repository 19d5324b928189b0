//! User input: what VM to run. Read from a TOML file (`vmm run --config`) and/or flags; the
//! flags' text forms (`--disk`, `--serial`) are parsed here too so both paths share validation.
//!
//! TOML example:
//! ```toml
//! kernel = "/path/vmlinux"
//! cmdline = "console=ttyS0 root=/dev/vda ro"
//! memory_mib = 256
//! vcpus = 2
//! serial = "unix:/run/vm1/serial.sock"
//! api_socket = "/run/vm1/api.sock"
//! tls_dir = "/etc/vmhop/tls"        # the host's certificates: the migration stream's TLS
//! [[disks]]
//! path = "/images/rootfs.ext4"
//! read_only = true
//! [[disks]]
//! storaged = { address = "127.0.0.1:10809", volume = "data1", host_id = "host-a" }
//! [[disks]]
//! # over TLS: the host id comes from the certificate, storaged's must name `storage`
//! storaged = { address = "10.0.0.9:10809", volume = "data2", tls_dir = "/etc/vmhop/tls", server_name = "storage" }
//! [[disks]]
//! vhost_user = { socket = "/run/vm1/data2.sock", queues = 2 }
//! ```

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::str::FromStr;
use thiserror::Error;
use vmhop_common::config::{load_toml, FileError};

/// Upper bound on vCPUs: the MP table and APIC ids are sized for it.
pub const MAX_VCPUS: u8 = 32;
/// Upper bound on disks: each takes an IRQ line of the I/O APIC.
pub const MAX_DISKS: usize = 16;

/// Errors in the VM configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The TOML file could not be read, does not parse or has unknown keys.
    #[error(transparent)]
    File(#[from] FileError),
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF kernel has a PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    /// The PVH entry (32-bit protected mode, `hvm_start_info`).
    Pvh,
    /// The 64-bit Linux boot protocol (long mode, `boot_params` with an e820 map).
    Linux64,
}

/// The whole VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The VM's name: the lease instance id of its storaged volumes unless a disk sets its
    /// own, so a restarted VMM for the same VM is the same lease holder.
    #[serde(default = "default_name")]
    pub name: String,
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; the VMM appends its devices.
    #[serde(default)]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Guest RAM in this file, mapped shared, instead of anonymous memory: RAM the guest has
    /// not written holds the file's bytes, and the guest's writes go to the file (a file on
    /// hugetlbfs gives huge pages). Created if missing and extended to the memory's size;
    /// locked while the VM runs, so no second VMM maps it. A migration's destination empties
    /// it first (the guest arrives into zeroed memory); a snapshot restore cannot use one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_file: Option<PathBuf>,
    /// vCPU count.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Boot protocol.
    #[serde(default)]
    pub boot: BootProtocol,
    /// Block devices, in order: the first is /dev/vda.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Where the first serial port goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Path of the API socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// This host's TLS directory (`storaged pki host`): the migration stream runs over TLS
    /// with its certificate, and checks the other VMM's (without one the stream is plaintext,
    /// for development). Storaged disks name theirs in their own `tls_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
}

/// The name of a VM whose configuration gives none.
pub fn default_name() -> String {
    "vm".into()
}

fn default_memory_mib() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}

impl VmConfig {
    /// Reads a TOML file.
    pub fn from_toml_file(path: &std::path::Path) -> Result<VmConfig, ConfigError> {
        Ok(load_toml(path)?)
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus must be 1..={MAX_VCPUS}, not {}", self.vcpus));
        }
        if self.memory_mib < 16 || self.memory_mib > (1 << 20) {
            return bad(format!(
                "memory_mib must be 16..=1048576, not {}",
                self.memory_mib
            ));
        }
        if self
            .memory_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return bad("memory_file must not be empty".into());
        }
        if self.name.is_empty() || self.name.len() > 64 {
            return bad("name must be 1..=64 bytes".into());
        }
        if self.disks.len() > MAX_DISKS {
            return bad(format!("at most {MAX_DISKS} disks"));
        }
        for d in &self.disks {
            d.validate()?;
        }
        Ok(())
    }
}

/// One block device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A local file (raw image).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A storaged volume.
    #[serde(default)]
    pub storaged: Option<StoragedDiskConfig>,
    /// A disk served by a vhost-user backend process.
    #[serde(default)]
    pub vhost_user: Option<VhostUserDiskConfig>,
    /// Offer the disk read-only (VIRTIO_BLK_F_RO) and refuse writes (a vhost-user backend
    /// refuses them itself: start it with `--read-only`).
    #[serde(default)]
    pub read_only: bool,
}

impl DiskConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let kinds = [
            self.path.is_some(),
            self.storaged.is_some(),
            self.vhost_user.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(ConfigError::Invalid(
                "a disk needs exactly one of `path`, `storaged` and `vhost_user`".into(),
            ));
        }
        if let Some(s) = &self.storaged {
            s.validate()?;
        }
        if let Some(v) = &self.vhost_user {
            if v.queues == 0 || v.queues > MAX_DISK_QUEUES {
                return Err(ConfigError::Invalid(format!(
                    "vhost-user queues must be 1..={MAX_DISK_QUEUES}, not {}",
                    v.queues
                )));
            }
        }
        Ok(())
    }

    /// A short name for logs and the API.
    pub fn describe(&self) -> String {
        match (&self.path, &self.storaged, &self.vhost_user) {
            (Some(p), _, _) => p.display().to_string(),
            (_, Some(s), _) => format!("storaged://{}/{}", s.all_addresses().join("+"), s.volume),
            (_, _, Some(v)) => format!("vhost-user:{}", v.socket.display()),
            _ => "?".into(),
        }
    }

    /// The request queues of the disk.
    pub fn queues(&self) -> u16 {
        self.vhost_user.as_ref().map_or(1, |v| v.queues)
    }
}

/// Upper bound on a disk's request queues (each takes an ioeventfd).
pub const MAX_DISK_QUEUES: u16 = 16;

/// A disk whose queues a vhost-user backend serves (`vhost-user-blk`, or any vhost-user-blk
/// backend such as `qemu-storage-daemon --export type=vhost-user-blk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserDiskConfig {
    /// The backend's Unix socket.
    pub socket: PathBuf,
    /// Request queues to use (the backend must offer at least this many).
    #[serde(default = "default_queues")]
    pub queues: u16,
}

fn default_queues() -> u16 {
    1
}

/// A volume on a storaged host, opened with a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoragedDiskConfig {
    /// `host:port` of the NBD listener.
    pub address: String,
    /// Cluster mode: the NBD listeners of the volume's other storaged nodes, tried in order
    /// after `address` when it does not answer or is not the volume's master (a node that
    /// knows the master sends the client there first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Volume (export) name.
    pub volume: String,
    /// This host's id, as the lease holder. With `tls_dir` it is the certificate's host id
    /// (given, it must be the same; absent, it is taken from the certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Instance id of this VM (defaults to the VM's name).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Lease asked for.
    #[serde(default)]
    pub lease: LeaseMode,
    /// How long guest I/O is held, and retried, while storaged cannot be reached (a restart,
    /// an upgrade, a network cut) before a request fails with an I/O error in the guest.
    /// Default [`DEFAULT_IO_HOLD_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_hold_secs: Option<u64>,
    /// This host's TLS directory (`storaged pki host`): the connection upgrades to TLS
    /// (NBD_OPT_STARTTLS) and proves the host id with the certificate. Without one it is
    /// plaintext, which storaged takes only from loopback clients, if at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// The name storaged's certificate must carry (its host id); default: the host part of
    /// `address` (then an IP address in its certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// How long guest I/O waits for an unreachable storaged by default: long enough for a restart
/// under systemd (stop, `RestartSec`, start, the data directory opened) with room to spare.
pub const DEFAULT_IO_HOLD_SECS: u64 = 60;

impl StoragedDiskConfig {
    /// `address`, then `addresses`.
    pub fn all_addresses(&self) -> Vec<String> {
        std::iter::once(self.address.clone())
            .chain(self.addresses.iter().cloned())
            .collect()
    }

    /// [`Self::io_hold_secs`] or its default.
    pub fn io_hold(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.io_hold_secs.unwrap_or(DEFAULT_IO_HOLD_SECS))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.host_id.is_none() && self.tls_dir.is_none() {
            return Err(ConfigError::Invalid(format!(
                "storaged volume {}: host_id (or a tls_dir whose certificate names the host) \
                 missing",
                self.volume
            )));
        }
        if self.server_name.is_some() && self.tls_dir.is_none() {
            return Err(ConfigError::Invalid(format!(
                "storaged volume {}: server_name needs tls_dir",
                self.volume
            )));
        }
        if self.server_name.is_some() && !self.addresses.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "storaged volume {}: one server_name cannot name several storaged nodes (leave \
                 it out: each node's certificate is checked against the address it is \
                 reached at)",
                self.volume
            )));
        }
        Ok(())
    }
}

/// The lease a VMM asks for on a storaged volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseMode {
    /// Read/write access now (a VM that runs).
    #[default]
    Primary,
    /// Connected, no data access until a flip promotes it (a migration's destination).
    Standby,
}

impl FromStr for LeaseMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(LeaseMode::Primary),
            "standby" => Ok(LeaseMode::Standby),
            _ => Err(ConfigError::Invalid(format!(
                "lease `{s}`: expected primary or standby"
            ))),
        }
    }
}

/// `--disk path=FILE[,ro]`, `--disk storaged=HOST:PORT,volume=NAME,host=ID[,instance=ID]
/// [,lease=standby][,io-hold=SECS][,tls=DIR[,server-name=NAME]][,ro]` (with `tls=DIR`, `host=`
/// may be left out; `storaged=` repeated names the nodes of a replicated volume, tried in
/// order) or `--disk vhost-user=SOCKET[,queues=N][,ro]`.
impl FromStr for DiskConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut vhost_socket = None;
        let mut queues = default_queues();
        let mut read_only = false;
        let (mut address, mut volume, mut host, mut instance) = (None, None, None, None);
        let mut addresses = Vec::new();
        let (mut tls_dir, mut server_name) = (None, None);
        let mut lease = LeaseMode::default();
        let mut io_hold_secs = None;
        for part in s.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "path" => path = Some(PathBuf::from(v)),
                "ro" | "readonly" | "read_only" => {
                    read_only = matches!(v, "" | "on" | "true" | "1")
                }
                "storaged" if address.is_none() => address = Some(v.to_string()),
                "storaged" => addresses.push(v.to_string()),
                "volume" => volume = Some(v.to_string()),
                "host" | "host_id" => host = Some(v.to_string()),
                "instance" | "instance_id" => instance = Some(v.to_string()),
                "lease" => lease = v.parse()?,
                "io-hold" | "io_hold" | "io_hold_secs" => {
                    io_hold_secs = Some(v.parse().map_err(|_| {
                        ConfigError::Invalid(format!("io-hold=`{v}` is not a number of seconds"))
                    })?)
                }
                "tls" | "tls_dir" | "tls-dir" => tls_dir = Some(PathBuf::from(v)),
                "server-name" | "server_name" => server_name = Some(v.to_string()),
                "vhost-user" | "vhost_user" => vhost_socket = Some(PathBuf::from(v)),
                "queues" => {
                    queues = v.parse().map_err(|_| {
                        ConfigError::Invalid(format!("queues=`{v}` is not a number"))
                    })?
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "unknown disk option `{k}` in `{s}`"
                    )))
                }
            }
        }
        let storaged = match address {
            None => None,
            Some(address) => Some(StoragedDiskConfig {
                address,
                addresses,
                volume: volume
                    .ok_or_else(|| ConfigError::Invalid(format!("`{s}`: volume= missing")))?,
                host_id: host,
                instance_id: instance,
                lease,
                io_hold_secs,
                tls_dir,
                server_name,
            }),
        };
        let d = DiskConfig {
            path,
            storaged,
            vhost_user: vhost_socket.map(|socket| VhostUserDiskConfig { socket, queues }),
            read_only,
        };
        d.validate()?;
        Ok(d)
    }
}

/// Where the guest's first serial port (COM1) is connected.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConfig {
    /// Output to stdout, input from stdin.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket the VMM listens on: one client at a time gets the output (earlier output
    /// is kept for it, bounded) and its input goes to the guest.
    Socket(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdio" => SerialConfig::Stdio,
            "none" => SerialConfig::None,
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => SerialConfig::File(p.into()),
                Some(("unix", p)) if !p.is_empty() => SerialConfig::Socket(p.into()),
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "serial `{s}`: expected stdio, none, file:PATH or unix:PATH"
                    )))
                }
            },
        })
    }
}

impl TryFrom<String> for SerialConfig {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SerialConfig> for String {
    fn from(s: SerialConfig) -> String {
        match s {
            SerialConfig::Stdio => "stdio".into(),
            SerialConfig::None => "none".into(),
            SerialConfig::File(p) => format!("file:{}", p.display()),
            SerialConfig::Socket(p) => format!("unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_with_both_disk_kinds() {
        let c: VmConfig = toml::from_str(
            r#"
            kernel = "/k"
            vcpus = 2
            serial = "unix:/tmp/s.sock"
            [[disks]]
            path = "/root.img"
            read_only = true
            [[disks]]
            storaged = { address = "127.0.0.1:10809", volume = "v", host_id = "a" }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.serial, SerialConfig::Socket("/tmp/s.sock".into()));
        assert!(c.disks[0].read_only);
        assert_eq!(
            c.disks[1].storaged.as_ref().unwrap().lease,
            LeaseMode::Primary
        );
    }

    #[test]
    fn rejects_bad_input_with_a_message() {
        assert!(toml::from_str::<VmConfig>("kernel='/k'\nbogus=1").is_err());
        assert!("path=/a,storaged=x:1,volume=v,host=h"
            .parse::<DiskConfig>()
            .is_err());
        assert!("storaged=x:1".parse::<DiskConfig>().is_err());
        assert!("storaged=x:1,volume=v".parse::<DiskConfig>().is_err());
        assert!("storaged=x:1,volume=v,host=a,server-name=s"
            .parse::<DiskConfig>()
            .is_err());
        assert!("tcp:1".parse::<SerialConfig>().is_err());
        let mut c: VmConfig = toml::from_str("kernel='/k'").unwrap();
        c.vcpus = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_storaged_disk_may_name_several_nodes() {
        let d: DiskConfig = "storaged=a:1,storaged=b:2,storaged=c:3,volume=v,host=h"
            .parse()
            .unwrap();
        let s = d.storaged.as_ref().unwrap();
        assert_eq!(s.all_addresses(), ["a:1", "b:2", "c:3"]);
        assert_eq!(d.describe(), "storaged://a:1+b:2+c:3/v");
        // One server name cannot fit several nodes' certificates.
        assert!("storaged=a:1,storaged=b:2,volume=v,tls=/t,server-name=s"
            .parse::<DiskConfig>()
            .is_err());
        // The TOML/JSON form; a single node leaves `addresses` out.
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["addresses"], serde_json::json!(["b:2", "c:3"]));
        let one: DiskConfig = "storaged=a:1,volume=v,host=h".parse().unwrap();
        let json = serde_json::to_value(one.storaged.unwrap()).unwrap();
        assert!(json.get("addresses").is_none());
    }

    #[test]
    fn parses_disk_flags() {
        let d: DiskConfig = "path=/x.img,ro".parse().unwrap();
        assert!(d.read_only);
        let d: DiskConfig = "storaged=h:1,volume=v,host=a,instance=i".parse().unwrap();
        assert_eq!(
            d.storaged.as_ref().unwrap().io_hold(),
            std::time::Duration::from_secs(DEFAULT_IO_HOLD_SECS)
        );
        let held: DiskConfig = "storaged=h:1,volume=v,host=a,io-hold=5".parse().unwrap();
        assert_eq!(held.storaged.unwrap().io_hold_secs, Some(5));
        assert!("storaged=h:1,volume=v,host=a,io-hold=soon"
            .parse::<DiskConfig>()
            .is_err());
        assert_eq!(d.storaged.unwrap().instance_id.as_deref(), Some("i"));
        let d: DiskConfig = "storaged=h:1,volume=v,tls=/etc/tls,server-name=storage"
            .parse()
            .unwrap();
        let s = d.storaged.unwrap();
        assert_eq!(
            (s.host_id, s.tls_dir, s.server_name.as_deref()),
            (None, Some("/etc/tls".into()), Some("storage"))
        );
        let d: DiskConfig = "vhost-user=/run/d.sock,queues=2,ro".parse().unwrap();
        assert_eq!(
            d.vhost_user,
            Some(VhostUserDiskConfig {
                socket: "/run/d.sock".into(),
                queues: 2
            })
        );
        assert!(d.read_only);
        assert_eq!(d.describe(), "vhost-user:/run/d.sock");
        assert!("vhost-user=/s,queues=0".parse::<DiskConfig>().is_err());
        assert!("vhost-user=/s,path=/x".parse::<DiskConfig>().is_err());
        let c: VmConfig =
            toml::from_str("kernel='/k'\n[[disks]]\nvhost_user = { socket = '/s' }").unwrap();
        c.validate().unwrap();
        assert_eq!(c.disks[0].queues(), 1);
    }
}
