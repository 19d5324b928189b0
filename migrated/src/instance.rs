//! Guest instances on this host: their durable record, their lifecycle states, and how the
//! VMM process behind each is recognised. A VMM is identified by its pid AND the start time
//! the kernel records for that pid (`/proc/PID/stat` field 22), so a pid reused by another
//! process after a crash is never mistaken for the guest. The processes themselves are
//! managed in [`crate::vmm_process`].

use crate::config::InstanceConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Lifecycle of an instance on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

    /// The state's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Incoming => "incoming",
            InstanceState::Migrating => "migrating",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Exited => "exited",
            InstanceState::Lost => "lost",
            InstanceState::MigratedAway => "migrated-away",
            InstanceState::Failed => "failed",
        }
    }
}

impl InstanceState {
    /// The state as words in a sentence ("migrated away"), for messages.
    pub fn words(self) -> &'static str {
        match self {
            InstanceState::MigratedAway => "migrated away",
            s => s.as_str(),
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The durable record of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[schema(value_type = String)]
    pub work_dir: PathBuf,
    /// VMM API socket.
    #[schema(value_type = String)]
    pub api_socket: PathBuf,
    /// Guest serial socket.
    #[schema(value_type = String)]
    pub serial_socket: PathBuf,
    /// VMM log.
    #[schema(value_type = String)]
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
            created_ms: crate::now_ms(),
            updated_ms: crate::now_ms(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_found_and_pid_reuse_is_detected() {
        let me = std::process::id();
        let t = proc_start_time(me).unwrap();
        let mut rec = InstanceRecord::new(
            InstanceConfig::for_tests("x"),
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
    fn state_names_are_the_wire_names() {
        let names = "starting running incoming migrating stopping stopped exited lost \
            migrated-away failed";
        for name in names.split_whitespace() {
            let state: InstanceState = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(state.as_str(), name);
        }
    }
}
