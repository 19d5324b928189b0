//! Guest instances on this host: their durable record and the VMM process behind each.
//!
//! Each instance has a work directory `STATE_DIR/instances/NAME/` holding the VMM's
//! configuration (`vm.toml`), its API socket (`api.sock`), its serial socket (`serial.sock`),
//! its log (`vmm.log`: stdout and stderr) and `vmm.pid`. A VMM is identified by its pid AND
//! the start time the kernel records for that pid (`/proc/PID/stat` field 22), so a pid reused
//! by another process after a crash is never mistaken for the guest.

use crate::config::{DiskSpec, InstanceConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;
use vmm_api::config::{
    BootProtocol, DiskConfig, LeaseMode, SerialConfig, StoragedDiskConfig, VmConfig,
};

/// Errors managing a VMM process.
#[derive(Debug, Error)]
pub enum InstanceError {
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

/// Lifecycle of an instance on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// VMM spawned, API not answering yet.
    Starting,
    /// The guest runs here.
    Running,
    /// Destination of a migration: VMM in incoming mode, guest not running here yet.
    Incoming,
    /// Source of a migration in progress.
    Migrating,
    /// Being stopped by an operator.
    Stopping,
    /// Stopped by an operator.
    Stopped,
    /// The VMM ended on its own (guest power-off, crash).
    Exited,
    /// Found dead when migrated started again.
    Lost,
    /// Moved to another host; nothing runs here any more.
    MigratedAway,
    /// Could not be started, or an incoming migration did not complete here.
    Failed,
}

impl InstanceState {
    /// True when no VMM runs for this instance any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceState::Stopped
                | InstanceState::Exited
                | InstanceState::Lost
                | InstanceState::MigratedAway
                | InstanceState::Failed
        )
    }
}

/// The durable record of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance name.
    pub name: String,
    /// What runs.
    pub config: InstanceConfig,
    /// Lifecycle state.
    pub state: InstanceState,
    /// VMM process id.
    pub pid: Option<u32>,
    /// Kernel start time of that pid (clock ticks since boot).
    pub pid_start: Option<u64>,
    /// Work directory.
    pub work_dir: PathBuf,
    /// VMM API socket.
    pub api_socket: PathBuf,
    /// Guest serial socket.
    pub serial_socket: PathBuf,
    /// VMM log.
    pub log: PathBuf,
    /// The migration this instance takes part in, if any.
    pub migration: Option<String>,
    /// Migration stream address of an incoming VMM.
    pub incoming: Option<String>,
    /// How the VMM ended, or why the instance failed.
    pub exit: Option<String>,
    /// Creation time (ms since the epoch).
    pub created_ms: u64,
    /// Last change (ms since the epoch).
    pub updated_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl InstanceRecord {
    /// A new record for `config` with its work directory under `state_dir`.
    pub fn new(config: InstanceConfig, state_dir: &Path, state: InstanceState) -> InstanceRecord {
        let work_dir = state_dir.join("instances").join(&config.name);
        InstanceRecord {
            name: config.name.clone(),
            api_socket: work_dir.join("api.sock"),
            serial_socket: work_dir.join("serial.sock"),
            log: work_dir.join("vmm.log"),
            work_dir,
            config,
            state,
            pid: None,
            pid_start: None,
            migration: None,
            incoming: None,
            exit: None,
            created_ms: now_ms(),
            updated_ms: now_ms(),
        }
    }

    /// Whether the recorded VMM process is alive (same pid, same start time, not a zombie).
    pub fn vmm_alive(&self) -> bool {
        match (self.pid, self.pid_start) {
            (Some(pid), Some(start)) => proc_start_time(pid) == Some(start),
            _ => false,
        }
    }
}

/// The kernel's task flag for a process that is exiting (`include/linux/sched.h`).
const PF_EXITING: u64 = 0x4;

/// The start time of `pid` from `/proc/PID/stat`, or `None` when it does not exist, is a
/// zombie or is exiting.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    // Field 9 holds the task flags; a process tearing down after a fatal signal is not alive.
    let flags: u64 = fields.get(6)?.parse().ok()?;
    if flags & PF_EXITING != 0 {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The VMM's configuration (`vmm run --config`) for an instance: its name, its kernel and
/// memory, its sockets in the work directory, and its disks (volumes at `storaged_nbd` with
/// `lease`, held by `host_id` for the instance).
pub fn vmm_config(
    rec: &InstanceRecord,
    host_id: &str,
    storaged_nbd: &str,
    lease: LeaseMode,
) -> VmConfig {
    let c = &rec.config;
    let disks = c
        .disks
        .iter()
        .map(|d| match d {
            DiskSpec {
                volume: Some(v), ..
            } => DiskConfig {
                path: None,
                storaged: Some(StoragedDiskConfig {
                    address: storaged_nbd.to_string(),
                    volume: v.clone(),
                    host_id: host_id.to_string(),
                    instance_id: Some(rec.name.clone()),
                    lease,
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
        vcpus: c.vcpus,
        boot: BootProtocol::default(),
        disks,
        serial: SerialConfig::Socket(rec.serial_socket.clone()),
        api_socket: Some(rec.api_socket.clone()),
    }
}

/// Creates the work directory, removes stale sockets and writes `vm.toml`; returns its path.
pub fn prepare_work_dir(rec: &InstanceRecord, vm: &VmConfig) -> Result<PathBuf, InstanceError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| InstanceError::WorkDir(p, e)
    };
    std::fs::create_dir_all(&rec.work_dir).map_err(err(&rec.work_dir))?;
    for s in [&rec.api_socket, &rec.serial_socket] {
        match std::fs::remove_file(s) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(InstanceError::WorkDir(s.clone(), e)),
        }
    }
    let path = rec.work_dir.join("vm.toml");
    let text = toml::to_string(vm).map_err(|e| InstanceError::VmConfig(path.clone(), e))?;
    std::fs::write(&path, text).map_err(err(&path))?;
    Ok(path)
}

/// Starts `vmm run --config WORK/vm.toml [--incoming ADDR | --restore SNAPSHOT]` in its own
/// process group (so a signal to migrated's group does not reach the guest), output appended
/// to the log.
pub fn spawn_vmm(
    vmm_binary: &Path,
    rec: &InstanceRecord,
    config_path: &Path,
    incoming: Option<&str>,
) -> Result<tokio::process::Child, InstanceError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&rec.log)
        .map_err(|e| InstanceError::WorkDir(rec.log.clone(), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| InstanceError::WorkDir(rec.log.clone(), e))?;
    let mut cmd = tokio::process::Command::new(vmm_binary);
    cmd.arg("run").arg("--config").arg(config_path);
    match (incoming, &rec.config.restore) {
        (Some(addr), _) => {
            cmd.arg("--incoming").arg(addr);
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
        .map_err(|e| InstanceError::Spawn(vmm_binary.to_path_buf(), e))?;
    if let Some(pid) = child.id() {
        let pid_file = rec.work_dir.join("vmm.pid");
        std::fs::write(&pid_file, format!("{pid}\n"))
            .map_err(|e| InstanceError::WorkDir(pid_file, e))?;
    }
    Ok(child)
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[from..]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_found_and_pid_reuse_is_detected() {
        let me = std::process::id();
        let t = proc_start_time(me).unwrap();
        let mut rec = InstanceRecord::new(
            InstanceConfig {
                name: "x".into(),
                kernel: "/k".into(),
                cmdline: String::new(),
                memory_mib: 64,
                vcpus: 1,
                disks: vec![],
                restore: None,
            },
            Path::new("/s"),
            InstanceState::Running,
        );
        rec.pid = Some(me);
        rec.pid_start = Some(t);
        assert!(rec.vmm_alive());
        rec.pid_start = Some(t + 1);
        assert!(!rec.vmm_alive());
    }

    #[test]
    fn vm_toml_is_the_vmms_config_with_the_name_and_the_lease() {
        let mut rec = InstanceRecord::new(
            InstanceConfig {
                name: "vm1".into(),
                kernel: "/k".into(),
                cmdline: "console=ttyS0 \"q\"".into(),
                memory_mib: 64,
                vcpus: 2,
                disks: vec![
                    DiskSpec {
                        volume: Some("root".into()),
                        path: None,
                        read_only: false,
                    },
                    DiskSpec {
                        volume: None,
                        path: Some("/f".into()),
                        read_only: true,
                    },
                ],
                restore: None,
            },
            Path::new("/s"),
            InstanceState::Running,
        );
        rec.name = "vm1".into();
        let cfg = vmm_config(&rec, "a", "127.0.0.1:1", LeaseMode::Standby);
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
        assert_eq!(
            back.api_socket.as_deref(),
            Some(Path::new("/s/instances/vm1/api.sock"))
        );
        back.validate().unwrap();
    }
}
