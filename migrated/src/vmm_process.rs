//! One VMM process, step by step: its work directory and `vm.toml`, the spawn of `vmm run` in
//! its own process group, a signal to it, and the tail of its log for error messages. The
//! agent ([`crate::agent`]) sequences these steps and records their outcome. A VMM is told
//! apart from a process that reuses its pid by the start time ([`crate::instance`]).
//!
//! Each instance's work directory `STATE_DIR/instances/NAME/` holds the VMM's configuration
//! (`vm.toml`), its API socket (`api.sock`), its serial socket (`serial.sock`), its log
//! (`vmm.log`: stdout and stderr of the current VMM; those of the [`KEPT_LOGS`] starts before
//! it are `vmm.log.1`, the last one, to `vmm.log.3`) and `vmm.pid`.

use crate::config::{AgentConfig, DiskBackend, DiskSpec};
use crate::disk_backend::BackendSpec;
use crate::instance::InstanceRecord;
use std::path::{Path, PathBuf};
use thiserror::Error;
use vmm_api::config::{
    BootProtocol, DiskConfig, LeaseMode, SerialConfig, StoragedDiskConfig, VhostUserDiskConfig,
    VmConfig,
};

/// A VMM process that could not be prepared, started or reached.
#[derive(Debug, Error)]
pub enum VmmProcessError {
    /// The work directory or a file in it could not be written.
    #[error("preparing {0}")]
    WorkDir(PathBuf, #[source] std::io::Error),
    /// The VMM's configuration could not be written as TOML.
    #[error("writing the VMM's configuration {0}")]
    VmConfig(PathBuf, #[source] toml::ser::Error),
    /// The VMM could not be started.
    #[error("starting {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The VMM exited before its API answered.
    #[error("the VMM exited ({status}) before its API answered; its log ends with:\n{log}")]
    EarlyExit {
        /// Exit status.
        status: String,
        /// Tail of the VMM's log.
        log: String,
    },
    /// The API did not answer in time.
    #[error("the VMM's API did not answer within {0:?}")]
    ApiTimeout(std::time::Duration),
}

/// The first of the comma-separated storaged NBD addresses of the agent's configuration.
fn first_address(list: &str) -> String {
    list.split(',')
        .map(str::trim)
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The others (cluster mode: the nodes of a replicated volume, tried in order).
fn other_addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .skip(1)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

/// The VMM's configuration (`vmm run --config`) for an instance: its name, its kernel and
/// memory, its sockets in the work directory, its disks (volumes at the agent's
/// `storaged_nbd` with `lease`, held by its `host_id` for the instance; a volume with a
/// vhost-user backend through its backend's socket, see [`crate::disk_backend`]) and the
/// host's TLS directory (for the volumes and the migration stream).
pub fn vmm_config(rec: &InstanceRecord, agent: &AgentConfig, lease: LeaseMode) -> VmConfig {
    let c = &rec.config;
    let disks = c
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            DiskSpec {
                volume: Some(_),
                backend: DiskBackend::VhostUser,
                ..
            } => DiskConfig {
                path: None,
                storaged: None,
                vhost_user: Some(VhostUserDiskConfig {
                    socket: crate::disk_backend::socket(rec, i),
                    queues: 1,
                }),
                read_only: d.read_only,
            },
            DiskSpec {
                volume: Some(v), ..
            } => DiskConfig {
                path: None,
                storaged: Some(StoragedDiskConfig {
                    address: first_address(&agent.storaged_nbd),
                    addresses: other_addresses(&agent.storaged_nbd),
                    volume: v.clone(),
                    host_id: Some(agent.host_id.clone()),
                    instance_id: Some(rec.name.clone()),
                    lease,
                    io_hold_secs: None,
                    tls_dir: agent.tls_dir.clone(),
                    server_name: agent
                        .storaged_name
                        .clone()
                        .filter(|_| agent.tls_dir.is_some()),
                }),
                vhost_user: None,
                read_only: d.read_only,
            },
            DiskSpec { path, .. } => DiskConfig {
                path: path.clone(),
                storaged: None,
                vhost_user: None,
                read_only: d.read_only,
            },
        })
        .collect();
    VmConfig {
        name: rec.name.clone(),
        kernel: c.kernel.clone(),
        initramfs: None,
        cmdline: c.cmdline.clone(),
        memory_mib: c.memory_mib,
        memory_file: None,
        vcpus: c.vcpus,
        boot: BootProtocol::default(),
        disks,
        serial: SerialConfig::Socket(rec.serial_socket.clone()),
        api_socket: Some(rec.api_socket.clone()),
        tls_dir: agent.tls_dir.clone(),
    }
}

/// The disks of `rec` served by vhost-user backends.
pub fn vhost_user_disks(rec: &InstanceRecord) -> Vec<BackendSpec<'_>> {
    rec.config
        .disks
        .iter()
        .enumerate()
        .filter_map(|(disk, d)| match (&d.volume, d.backend) {
            (Some(volume), DiskBackend::VhostUser) => Some(BackendSpec {
                disk,
                volume,
                read_only: d.read_only,
            }),
            _ => None,
        })
        .collect()
}

/// Creates the work directory, removes stale sockets and writes `vm.toml`; returns its path.
pub fn prepare_work_dir(rec: &InstanceRecord, vm: &VmConfig) -> Result<PathBuf, VmmProcessError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| VmmProcessError::WorkDir(p, e)
    };
    std::fs::create_dir_all(&rec.work_dir).map_err(err(&rec.work_dir))?;
    for s in [&rec.api_socket, &rec.serial_socket] {
        match std::fs::remove_file(s) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VmmProcessError::WorkDir(s.clone(), e)),
        }
    }
    let path = rec.work_dir.join("vm.toml");
    let text = toml::to_string(vm).map_err(|e| VmmProcessError::VmConfig(path.clone(), e))?;
    std::fs::write(&path, text).map_err(err(&path))?;
    Ok(path)
}

/// Where an incoming VMM listens, and the source host it accepts (checked in TLS).
#[derive(Debug, Clone, Copy)]
pub struct IncomingFrom<'a> {
    /// `HOST:PORT` of the stream listener.
    pub addr: &'a str,
    /// The source's host id.
    pub source: &'a str,
}

/// How many logs of earlier VMM starts an instance keeps beside the current one.
pub const KEPT_LOGS: usize = 3;

/// Moves the log at `path` to `path.1` (and `path.1` to `path.2`, ..., dropping the oldest),
/// so that each VMM start writes a log of its own and an error quotes only its own start.
fn rotate_log(path: &Path) -> std::io::Result<()> {
    let numbered = |n: usize| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    let moved = |from: &Path, to: &Path| match std::fs::rename(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    for n in (1..KEPT_LOGS).rev() {
        moved(&numbered(n), &numbered(n + 1))?;
    }
    moved(path, &numbered(1))
}

/// Starts `vmm run --config WORK/vm.toml [--incoming ADDR [--incoming-from HOST] | --restore
/// SNAPSHOT]` in its own process group (so a signal to migrated's group does not reach the
/// guest) and, under systemd, in a scope of its own ([`crate::scope`]), its output in a log of
/// its own (the earlier ones rotated, see [`KEPT_LOGS`]). `--incoming-from` is given with TLS
/// (`agent.tls`), `--log-json` when the agent logs JSON lines itself.
pub fn spawn_vmm(
    agent: &AgentConfig,
    rec: &InstanceRecord,
    config_path: &Path,
    incoming: Option<IncomingFrom<'_>>,
) -> Result<tokio::process::Child, VmmProcessError> {
    let vmm_binary = &agent.vmm_binary;
    rotate_log(&rec.log).map_err(|e| VmmProcessError::WorkDir(rec.log.clone(), e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&rec.log)
        .map_err(|e| VmmProcessError::WorkDir(rec.log.clone(), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| VmmProcessError::WorkDir(rec.log.clone(), e))?;
    let mut cmd = crate::scope::launcher().command(
        vmm_binary,
        &crate::scope::vmm_unit(&rec.name),
        &format!("vmhop guest {}", rec.name),
    );
    cmd.arg("run").arg("--config").arg(config_path);
    if agent.log_json {
        cmd.arg("--log-json");
    }
    match (incoming, &rec.config.restore) {
        (Some(i), _) => {
            cmd.arg("--incoming").arg(i.addr);
            if agent.tls.is_some() {
                cmd.arg("--incoming-from").arg(i.source);
            }
        }
        (None, Some(snapshot)) => {
            cmd.arg("--restore").arg(snapshot);
        }
        (None, None) => {}
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .current_dir(&rec.work_dir)
        .process_group(0)
        .kill_on_drop(false);
    let child = cmd
        .spawn()
        .map_err(|e| VmmProcessError::Spawn(vmm_binary.to_path_buf(), e))?;
    if let Some(pid) = child.id() {
        let pid_file = rec.work_dir.join("vmm.pid");
        std::fs::write(&pid_file, format!("{pid}\n"))
            .map_err(|e| VmmProcessError::WorkDir(pid_file, e))?;
    }
    Ok(child)
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[from..]).trim().to_string()
}

/// Sends `sig` to the VMM of `rec` if it is still the same process.
pub fn kill_pid(rec: &InstanceRecord, sig: libc::c_int) {
    if let (Some(pid), true) = (rec.pid, rec.vmm_alive()) {
        // SAFETY: kill(2) has no memory effects; the pid was checked against its recorded
        // start time just before, so it is the VMM we started and not a reused pid.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_rotates_the_log_and_keeps_the_last_ones() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        rotate_log(&log).unwrap();
        assert!(!log.exists());
        for start in 1..=5 {
            rotate_log(&log).unwrap();
            std::fs::write(&log, format!("start {start}")).unwrap();
        }
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("vmm.log"), "start 5");
        assert_eq!(read("vmm.log.1"), "start 4");
        assert_eq!(read("vmm.log.3"), "start 2");
        assert!(!dir.path().join("vmm.log.4").exists());
    }
    use crate::config::{AgentConfigFile, InstanceConfig};
    use crate::instance::InstanceState;

    #[test]
    fn vm_toml_is_the_vmms_config_with_the_name_and_the_lease() {
        let mut rec = InstanceRecord::new(
            InstanceConfig {
                cmdline: "console=ttyS0 \"q\"".into(),
                vcpus: 2,
                disks: vec![
                    DiskSpec {
                        volume: Some("root".into()),
                        path: None,
                        read_only: false,
                        backend: DiskBackend::Vmm,
                    },
                    DiskSpec {
                        volume: None,
                        path: Some("/f".into()),
                        read_only: true,
                        backend: DiskBackend::Vmm,
                    },
                    DiskSpec {
                        volume: Some("data".into()),
                        path: None,
                        read_only: false,
                        backend: DiskBackend::VhostUser,
                    },
                ],
                ..InstanceConfig::for_tests("vm1")
            },
            Path::new("/s"),
            InstanceState::Running,
        );
        rec.name = "vm1".into();
        let agent = AgentConfigFile {
            host_id: Some("a".into()),
            state_dir: Some("/s".into()),
            storaged_nbd: Some("127.0.0.1:1".into()),
            ..Default::default()
        }
        .merge(AgentConfigFile::default())
        .unwrap();
        let cfg = vmm_config(&rec, &agent, LeaseMode::Standby);
        let dir = tempfile::tempdir().unwrap();
        rec.work_dir = dir.path().join("vm1");
        let path = prepare_work_dir(&rec, &cfg).unwrap();
        let back = VmConfig::from_toml_file(&path).unwrap();
        assert_eq!(back.name, "vm1");
        assert_eq!(back.cmdline, "console=ttyS0 \"q\"");
        let s = back.disks[0].storaged.as_ref().unwrap();
        assert_eq!(
            (s.lease, s.instance_id.as_deref()),
            (LeaseMode::Standby, Some("vm1"))
        );
        assert_eq!(back.disks[1].path.as_deref(), Some(Path::new("/f")));
        let vu = back.disks[2].vhost_user.as_ref().unwrap();
        assert_eq!(vu.socket, Path::new("/s/instances/vm1/disk-2.sock"));
        let specs = vhost_user_disks(&rec);
        assert_eq!(
            (specs.len(), specs[0].disk, specs[0].volume),
            (1, 2, "data")
        );
        assert_eq!(
            back.api_socket.as_deref(),
            Some(Path::new("/s/instances/vm1/api.sock"))
        );
        back.validate().unwrap();
    }
}
