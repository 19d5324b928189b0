//! The vhost-user disk backends of an instance: one `vhost-user-blk` process per disk whose
//! data path runs outside the VMM (`backend = "vhost-user"` in the guest's TOML), started
//! before the VMM and ended after it.
//!
//! A backend opens its volume with the same lease as the VMM would (host id and instance
//! name; primary where the guest starts, standby on a migration's destination, promoted by
//! the lease flip; in TLS with the host's certificate when the agent has one) and listens on `disk-N.sock` in the instance's work directory, which the
//! VMM's configuration names as the disk's vhost-user socket. The socket appears once the
//! volume is open: that is the backend's readiness. Each backend runs in its own process
//! group like the VMM (a signal to migrated's group does not reach the guest's disks), under
//! systemd in a scope of its own ([`crate::scope`]), and
//! writes `disk-N.pid` (pid and start time) so that a restarted agent still ends the right
//! process, and `disk-N.log`.

use crate::config::AgentConfig;
use crate::instance::{proc_start_time, InstanceRecord};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_api::config::LeaseMode;

/// How long a backend may take to open its volume and listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a backend may take to flush and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Polling interval while waiting on a backend.
const POLL: Duration = Duration::from_millis(20);

/// A backend that could not be started.
#[derive(Debug, Error)]
pub enum DiskBackendError {
    /// A file in the work directory could not be written or removed.
    #[error("preparing {0}")]
    WorkDir(PathBuf, #[source] std::io::Error),
    /// The backend could not be started.
    #[error("starting {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The backend exited before it listened.
    #[error("the vhost-user backend of disk {disk} exited ({status}); its log ends with:\n{log}")]
    EarlyExit {
        /// The disk's index.
        disk: usize,
        /// Exit status.
        status: String,
        /// Tail of its log.
        log: String,
    },
    /// The backend did not listen in time.
    #[error("the vhost-user backend of disk {0} did not listen within {1:?}")]
    Timeout(usize, Duration),
}

/// What a backend serves.
#[derive(Debug, Clone)]
pub struct BackendSpec<'a> {
    /// The disk's index in the guest's list.
    pub disk: usize,
    /// The volume.
    pub volume: &'a str,
    /// Offered read-only.
    pub read_only: bool,
}

/// The socket of disk `disk` of `rec`.
pub fn socket(rec: &InstanceRecord, disk: usize) -> PathBuf {
    rec.work_dir.join(format!("disk-{disk}.sock"))
}

fn pid_file(work_dir: &Path, disk: usize) -> PathBuf {
    work_dir.join(format!("disk-{disk}.pid"))
}

/// Starts the backends `specs` of `rec` (volumes at the agent's `storaged_nbd`, held by its
/// `host_id` with `lease`, in TLS with its `tls_dir`) and waits until each listens. Backends
/// left over from an earlier start of the instance are ended first; on failure the ones
/// already started are ended too.
pub async fn start(
    binary: &Path,
    rec: &InstanceRecord,
    specs: &[BackendSpec<'_>],
    agent: &AgentConfig,
    lease: LeaseMode,
) -> Result<(), DiskBackendError> {
    stop_all(&rec.work_dir).await;
    let mut started = Vec::new();
    for spec in specs {
        match start_one(binary, rec, spec, agent, lease).await {
            Ok(()) => started.push(spec.disk),
            Err(e) => {
                for disk in started {
                    stop(&rec.work_dir, disk).await;
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

async fn start_one(
    binary: &Path,
    rec: &InstanceRecord,
    spec: &BackendSpec<'_>,
    agent: &AgentConfig,
    lease: LeaseMode,
) -> Result<(), DiskBackendError> {
    let sock = socket(rec, spec.disk);
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DiskBackendError::WorkDir(sock, e)),
    }
    let log_path = rec.work_dir.join(format!("disk-{}.log", spec.disk));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| DiskBackendError::WorkDir(log_path.clone(), e))?;
    let mut cmd = crate::scope::launcher().command(
        binary,
        &crate::scope::disk_unit(&rec.name, spec.disk),
        &format!("vmhop disk {} of guest {}", spec.disk, rec.name),
    );
    cmd.arg("--socket")
        .arg(&sock)
        .args(["--storaged", &agent.storaged_nbd, "--volume", spec.volume])
        .args(["--host-id", &agent.host_id, "--instance-id", &rec.name])
        .args(["--lease", lease_arg(lease)])
        .args(["--id", spec.volume]);
    if let Some(dir) = &agent.tls_dir {
        cmd.arg("--tls-dir").arg(dir);
        if let Some(name) = &agent.storaged_name {
            cmd.args(["--server-name", name]);
        }
    }
    if spec.read_only {
        cmd.arg("--read-only");
    }
    if agent.log_json {
        cmd.arg("--log-json");
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .current_dir(&rec.work_dir)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd
        .spawn()
        .map_err(|e| DiskBackendError::Spawn(binary.to_path_buf(), e))?;
    let pid = child.id().unwrap_or(0);
    let pf = pid_file(&rec.work_dir, spec.disk);
    let start = proc_start_time(pid).unwrap_or(0);
    std::fs::write(&pf, format!("{pid} {start}\n"))
        .map_err(|e| DiskBackendError::WorkDir(pf, e))?;
    tracing::info!(instance = %rec.name, disk = spec.disk, volume = spec.volume, pid,
        lease = lease_arg(lease), "vhost-user backend started");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if sock.exists() {
            // Reaped by a task of its own: the agent ends it through its pid file.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DiskBackendError::EarlyExit {
                disk: spec.disk,
                status: status.to_string(),
                log: crate::vmm_process::log_tail(&log_path, 2000),
            });
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(DiskBackendError::Timeout(spec.disk, START_TIMEOUT));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn lease_arg(lease: LeaseMode) -> &'static str {
    match lease {
        LeaseMode::Primary => "primary",
        LeaseMode::Standby => "standby",
    }
}

/// The backend of `disk` recorded in `work_dir`, if that process still runs.
fn running(work_dir: &Path, disk: usize) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file(work_dir, disk)).ok()?;
    let mut f = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(start))) = (f.next(), f.next()) else {
        return None;
    };
    let pid = u32::try_from(pid).ok()?;
    (proc_start_time(pid) == Some(start)).then_some(pid)
}

/// Ends the backend of `disk` (SIGTERM: it flushes and exits; SIGKILL after a deadline) and
/// waits until it is gone.
async fn stop(work_dir: &Path, disk: usize) {
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let Some(pid) = running(work_dir, disk) else {
            break;
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while running(work_dir, disk).is_some() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        if running(work_dir, disk).is_none() {
            tracing::info!(disk, pid, "vhost-user backend ended");
            break;
        }
        tracing::warn!(
            disk,
            pid,
            "vhost-user backend still running after SIGTERM; killing it"
        );
    }
    let _ = std::fs::remove_file(pid_file(work_dir, disk));
}

/// Ends every backend recorded in `work_dir`.
pub async fn stop_all(work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    let disks: Vec<usize> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("disk-")?
                .strip_suffix(".pid")?
                .parse()
                .ok()
        })
        .collect();
    for disk in disks {
        stop(work_dir, disk).await;
    }
}
