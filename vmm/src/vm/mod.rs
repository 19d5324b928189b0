//! The VM: built from a [`VmConfig`], then driven by one control loop that owns all state
//! changes. vCPU threads, devices, the API server and signal handlers only send [`VmEvent`]s.
//!
//! Order of KVM calls while building (the order matters):
//! 1. `KVM_CREATE_VM`, then `KVM_SET_TSS_ADDR` (Intel needs it before any vCPU runs).
//! 2. `KVM_CREATE_IRQCHIP` before any vCPU exists: each vCPU gets its in-kernel LAPIC only
//!    when the irqchip is already there. Then `KVM_CREATE_PIT2`, which needs the irqchip.
//! 3. `KVM_SET_USER_MEMORY_REGION` for each RAM region, on its own thread started right after
//!    step 1 and joined before the vCPU threads start (a memory slot change waits for an SRCU
//!    grace period, milliseconds on a busy host; nothing before the first `KVM_RUN` needs it).
//! 4. Devices: `KVM_IRQFD` for each interrupt line (needs the irqchip), `KVM_IOEVENTFD` for each
//!    virtio queue's notify register.
//! 5. The kernel and boot structures are written into guest memory. The kernel's segments are
//!    copied on their own thread, started as soon as the guest memory exists (before step 1):
//!    the copy needs no KVM call, and the KVM calls of steps 1-4 mostly wait (SRCU grace
//!    periods), so the two overlap; the thread is joined here, before the boot structures.
//! 6. `KVM_CREATE_VCPU` and each vCPU's setup (see [`crate::vcpu::regs`] for its own order),
//!    then the vCPU threads start.
//!
//! A VM started for an incoming migration (or from a snapshot) skips step 5 and the boot
//! registers: its vCPU threads start paused, and the saved state replaces everything, in the
//! order given in [`kvm_state`] (VM-wide), [`crate::vcpu::state`] (per vCPU) and
//! [`crate::persist`] (devices).

mod build;
mod handover;
mod io;
pub mod kvm_state;

pub use build::BuildError;

use crate::api::{ApiRequest, ApiResponse};
use crate::devices::i8042::I8042;
use crate::devices::serial::{SerialDevice, SerialStateError};
use crate::devices::virtio::block::BlockStateError;
use crate::devices::virtio::disk::DiskDevice;
use crate::devices::virtio::mmio::{MmioTransport, TransportStateError};
use crate::devices::virtio::vhost_user::DirtyLogging;
use crate::devices::virtio::VirtioError;
use crate::memory::GuestMem;
use crate::migration::receive::{CommitDone, ReceiveError};
use crate::migration::send::{Outcome, StopCopy};
use crate::migration::wire::Commit;
use crate::migration::{self, Phase, SharedStatus};
use crate::persist::PersistError;
use crate::vcpu::{wall_us, VcpuShared};
use crate::vcpu::{VcpuCommand, VcpuError, VcpuHandle, VcpuState};
use kvm_ioctls::{Kvm, VmFd};
use kvm_state::KvmStateError;
use std::fs::File;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use vmhop_common::error::chain as error_chain;
use vmm_api::config::VmConfig;
use vmm_api::migration::SendParamsError;
use vmm_api::vm::{DiskInfo, RunState, VmInfo};

/// How long the API server may take to finish the answers in progress at exit.
const API_DRAIN: Duration = Duration::from_secs(2);
/// How long a vCPU may take to acknowledge pause, resume or exit.
pub const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the control loop could not do what an event asked. The first group are refusals: the
/// request does not fit the VM's current state (the API answers 409, see
/// [`VmError::is_refusal`]); the rest are failures (500).
#[derive(Debug, Error)]
pub enum VmError {
    /// Resume on a destination before the hand-over.
    #[error("no guest here yet: the incoming migration has not handed over")]
    NoGuestYet,
    /// Resume during an outgoing migration.
    #[error("a migration is under way: POST /v1/migration/abort first")]
    MigrationUnderWay,
    /// Resume on a source that handed the guest over.
    #[error(
        "the guest was handed over to the destination: POST /v1/migration/abort takes it back"
    )]
    HandedOver,
    /// Resume on a source whose guest runs on the destination.
    #[error("the guest runs on the destination now")]
    GuestGone,
    /// Resume on a source whose hand-over is undecided.
    #[error("the destination may hold the guest (its COMMIT was not confirmed): once it is known that it cannot run it, POST /v1/migration/abort takes it back")]
    Undecided,
    /// Abort with no migration here.
    #[error("no migration to abort here ({0:?})")]
    NothingToAbort(Role),
    /// Snapshot during a migration.
    #[error("cannot snapshot during a migration ({0:?})")]
    SnapshotDuringMigration(Role),
    /// A second migration.
    #[error("a migration is already under way or done here ({0:?})")]
    MigrationExists(Role),
    /// A saved state arrived while the VM was not waiting for one.
    #[error("unexpected state (role {0:?})")]
    UnexpectedState(Role),
    /// A COMMIT arrived while the VM was not waiting for one.
    #[error("unexpected commit (role {0:?})")]
    UnexpectedCommit(Role),
    /// The stop-and-copy was asked for with no migration under way.
    #[error("no migration")]
    NoMigration,
    /// The stop-and-copy was asked for after an abort.
    #[error("aborted on request")]
    Aborted,
    /// The vCPUs did not pause.
    #[error("pause the vCPUs")]
    Pause(#[source] VcpuError),
    /// The vCPUs did not resume.
    #[error("resume the vCPUs")]
    Resume(#[source] VcpuError),
    /// A disk's data path did not drain.
    #[error("disk {0}: drain the data path")]
    Quiesce(usize, #[source] VirtioError),
    /// A disk's data path did not restart.
    #[error("disk {0}: restart the data path")]
    Unquiesce(usize, #[source] VirtioError),
    /// The VM-wide KVM state could not be read.
    #[error("save the VM-wide KVM state")]
    SaveKvm(#[source] KvmStateError),
    /// The VM-wide KVM state could not be loaded.
    #[error("load the VM-wide KVM state")]
    LoadKvm(#[source] KvmStateError),
    /// A vCPU could not save its state.
    #[error("save the vCPU state")]
    SaveVcpu(#[source] VcpuError),
    /// A vCPU could not load its state.
    #[error("load the vCPU state")]
    LoadVcpu(#[source] VcpuError),
    /// A vCPU did not answer the save in time.
    #[error("a vCPU did not save its state in time")]
    SaveVcpuTimeout,
    /// A vCPU did not answer the load in time.
    #[error("a vCPU did not load its state in time")]
    LoadVcpuTimeout,
    /// COM1's state.
    #[error("COM1")]
    Serial(#[source] SerialStateError),
    /// A disk's state.
    #[error("disk {0}")]
    Disk(usize, #[source] TransportStateError<BlockStateError>),
    /// The state envelope, or a state for another VM shape.
    #[error("VM state")]
    State(#[source] PersistError),
    /// The snapshot could not be written.
    #[error("write the snapshot")]
    Snapshot(#[source] crate::snapshot::SnapshotError),
    /// Unusable migration parameters.
    #[error("migration parameters")]
    Params(#[source] SendParamsError),
    /// The migration thread could not start.
    #[error("start the migration thread")]
    SpawnMigration(#[source] std::io::Error),
    /// A destination identity to check, but no certificates to check it with.
    #[error("destination_host needs the VM's tls_dir: without TLS no identity can be checked")]
    NoStreamTls,
}

impl VmError {
    /// The request does not fit the VM's current state (a conflict, not a failure): the API
    /// answers 409 rather than 500.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            VmError::NoGuestYet
                | VmError::MigrationUnderWay
                | VmError::HandedOver
                | VmError::GuestGone
                | VmError::Undecided
                | VmError::NothingToAbort(_)
                | VmError::SnapshotDuringMigration(_)
                | VmError::MigrationExists(_)
                | VmError::UnexpectedState(_)
                | VmError::UnexpectedCommit(_)
                | VmError::NoMigration
                | VmError::Aborted
                | VmError::NoStreamTls
        )
    }
}

/// How a VM starts.
#[derive(Debug, Clone)]
pub enum StartMode {
    /// Boot the kernel.
    Boot,
    /// Receive a running guest (see [`crate::migration`]).
    Incoming(Incoming),
    /// Load a snapshot file (see [`crate::snapshot`]) and run it.
    Restore(std::path::PathBuf),
}

/// Where, from whom and until when an incoming migration is accepted.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// `HOST:PORT` to listen on.
    pub addr: String,
    /// The host id the source's certificate must prove (required with TLS).
    pub from: Option<String>,
    /// How long to wait for the source to connect and prove who it is.
    pub accept_timeout: Duration,
}

/// Everything the control loop reacts to.
pub enum VmEvent {
    /// The guest reset the machine (i8042 reset line or a KVM reset event).
    GuestReset,
    /// The guest asked for power off.
    GuestShutdown,
    /// A vCPU triple-faulted; the report has its registers.
    TripleFault(String),
    /// A vCPU stopped on an error or unhandled exit; the report has its registers.
    VcpuFailed(String),
    /// An API request with the channel for its answer.
    Api(ApiRequest, tokio::sync::oneshot::Sender<ApiResponse>),
    /// The VMM process was asked to stop (SIGTERM, SIGINT).
    Terminate(&'static str),
    /// Source: pre-copy is done; pause, drain and save (the answer carries the state).
    MigrationStop(Sender<Result<StopCopy, VmError>>),
    /// Source: the migration thread ended.
    MigrationEnded(Outcome),
    /// Destination: the state arrived; load it.
    IncomingState(Vec<u8>, Sender<Result<(), VmError>>),
    /// Destination: the guest is ours (resume now if the flag says `auto`).
    IncomingCommit(Commit, bool, Sender<Result<CommitDone, VmError>>),
    /// Destination: the stream failed before the hand-over.
    IncomingFailed(ReceiveError),
}

/// Why the VM ended: decides the process exit status.
#[derive(Debug)]
pub enum ExitReason {
    /// The guest reset itself (`reboot=k`): a clean end.
    GuestReset,
    /// The guest powered off.
    GuestShutdown,
    /// `POST /v1/vm/shutdown`.
    ApiShutdown,
    /// A signal.
    Terminated(&'static str),
    /// A triple fault.
    TripleFault(String),
    /// A vCPU failure.
    VcpuFailed(String),
    /// An incoming migration failed before the hand-over (the source keeps the guest).
    IncomingFailed(ReceiveError),
    /// An incoming migration was aborted through the API.
    IncomingAborted,
}

impl ExitReason {
    /// Exit status: 0 for ends the guest or an operator asked for, 3 for a triple fault, 4 for
    /// a vCPU failure (KVM internal error, unhandled exit), 5 for an incoming migration that
    /// did not complete.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestShutdown
            | ExitReason::ApiShutdown
            | ExitReason::Terminated(_) => 0,
            ExitReason::TripleFault(_) => 3,
            ExitReason::VcpuFailed(_) => 4,
            ExitReason::IncomingFailed(_) | ExitReason::IncomingAborted => 5,
        }
    }
}

/// Who has the guest while a migration is under way or after one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No migration, or one that ended with the guest here.
    Own,
    /// Source: a migration thread runs.
    Sending,
    /// Source: the guest was handed over and the destination waits; it stays paused here
    /// and an abort can still take it back.
    HandedOver,
    /// Source: the destination runs the guest; only a shutdown remains.
    Gone,
    /// Source: the stream failed after COMMIT was on its way, so the destination may hold the
    /// guest; it stays paused here until an abort takes it back.
    Undecided,
    /// Destination: waiting for the stream.
    Incoming,
    /// Destination: the state is loaded; waiting for COMMIT.
    Loaded,
    /// Destination: committed, waiting for `POST /v1/vm/resume`.
    Committed,
}

/// A source migration in progress.
struct Sending {
    abort: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The loop paused the guest for the stop-and-copy.
    paused: bool,
    /// The destination resumes by itself after the hand-over.
    auto: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A built, running VM.
pub struct Vm {
    config: VmConfig,
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: Arc<GuestMem>,
    memfd: Option<Arc<File>>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    disks: Vec<Arc<Mutex<MmioTransport<DiskDevice>>>>,
    /// The dirty logs of the vhost-user disks, with their disk index.
    dirty_backends: Vec<(usize, DirtyLogging)>,
    vcpu_shared: Arc<VcpuShared>,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    runtime: Option<io::IoRuntime>,
    state: RunState,
    cmdline: String,
    started: Instant,
    role: Role,
    migration: SharedStatus,
    sending: Option<Sending>,
    /// Destination: when the source paused (for the downtime).
    source_paused_at_us: u64,
    /// Destination: when the source started (for the total time).
    source_started_at_us: u64,
    /// Stops the API server gracefully (the last answers are written before the exit).
    api_server: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    /// This host's certificates for migration streams (`tls_dir`); `None`: plaintext.
    stream_tls: Option<crate::migration::transport::StreamTls>,
}

impl Vm {
    fn info(&self) -> VmInfo {
        VmInfo {
            name: self.config.name.clone(),
            state: self.state,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            kernel: self.config.kernel.display().to_string(),
            cmdline: self.cmdline.clone(),
            disks: self
                .config
                .disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.describe(),
                    read_only: d.read_only,
                })
                .collect(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pid: std::process::id(),
        }
    }

    /// Sends `cmd` to every vCPU, then waits until each reports `want`.
    fn all_vcpus(
        &mut self,
        cmd: impl Fn() -> VcpuCommand,
        want: VcpuState,
    ) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.send(cmd())?;
        }
        for v in &mut self.vcpus {
            v.wait_for(want, VCPU_ACK_TIMEOUT)?;
        }
        Ok(())
    }

    /// Pauses every vCPU; returns the wall-clock time when the last one stopped.
    fn pause_vcpus(&mut self) -> Result<u64, VmError> {
        if self.state == RunState::Running {
            let t = Instant::now();
            self.all_vcpus(|| VcpuCommand::Pause, VcpuState::Paused)
                .map_err(VmError::Pause)?;
            self.state = RunState::Paused;
            tracing::info!(took_us = t.elapsed().as_micros() as u64, "vm paused");
        }
        Ok(wall_us())
    }

    /// Runs the guest here: the devices' data paths first, then the vCPUs.
    fn resume_here(&mut self) -> Result<(), VmError> {
        self.restart_data_paths()?;
        if self.state == RunState::Paused {
            self.vcpu_shared.resumed_at_us.store(0, Ordering::SeqCst);
            self.all_vcpus(|| VcpuCommand::Resume, VcpuState::Running)
                .map_err(VmError::Resume)?;
            self.state = RunState::Running;
            tracing::info!("vm resumed");
        }
        Ok(())
    }

    fn handle_api(&mut self, req: ApiRequest) -> Result<ApiResponse, VmError> {
        match req {
            ApiRequest::Info | ApiRequest::Shutdown => {}
            ApiRequest::Pause => {
                self.pause_vcpus()?;
            }
            ApiRequest::Resume => match self.role {
                Role::Own => self.resume_here()?,
                Role::Committed => {
                    self.finish_incoming()?;
                }
                Role::Incoming | Role::Loaded => return Err(VmError::NoGuestYet),
                Role::Sending => return Err(VmError::MigrationUnderWay),
                Role::HandedOver => return Err(VmError::HandedOver),
                Role::Undecided => return Err(VmError::Undecided),
                Role::Gone => return Err(VmError::GuestGone),
            },
            ApiRequest::MigrationSend(params) => return self.start_migration(params),
            ApiRequest::MigrationStatus => {
                return Ok(ApiResponse::Migration(migration::current(&self.migration)))
            }
            ApiRequest::MigrationAbort => {
                match self.role {
                    Role::Sending => self.abort_sending(),
                    Role::HandedOver | Role::Undecided => {
                        self.resume_here()?;
                        self.role = Role::Own;
                        migration::update(&self.migration, |s| {
                            s.phase = Phase::Aborted;
                            s.error =
                                Some("aborted after the hand-over; the guest runs here".into());
                        });
                        tracing::warn!(
                            "migration aborted after the hand-over; the guest runs here again"
                        );
                    }
                    role => return Err(VmError::NothingToAbort(role)),
                }
                return Ok(ApiResponse::Migration(migration::current(&self.migration)));
            }
            ApiRequest::Snapshot(path) => {
                if self.role != Role::Own {
                    return Err(VmError::SnapshotDuringMigration(self.role));
                }
                let was_running = self.state == RunState::Running;
                let (st, _) = self.pause_and_save()?;
                let written =
                    crate::snapshot::write(&path, &st, &self.mem).map_err(VmError::Snapshot);
                if was_running {
                    self.resume_here()?;
                } else {
                    self.restart_data_paths()?;
                }
                written?;
            }
        }
        Ok(ApiResponse::Info(self.info()))
    }

    /// Runs the control loop until the VM ends, then stops every vCPU.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            let Ok(event) = self.events.recv() else {
                // Unreachable while `events_tx` lives; end cleanly if it ever happens.
                break ExitReason::Terminated("event channel closed");
            };
            match event {
                VmEvent::GuestReset => break ExitReason::GuestReset,
                VmEvent::GuestShutdown => break ExitReason::GuestShutdown,
                VmEvent::TripleFault(r) => break ExitReason::TripleFault(r),
                VmEvent::VcpuFailed(r) => break ExitReason::VcpuFailed(r),
                VmEvent::Terminate(sig) => break ExitReason::Terminated(sig),
                VmEvent::Api(ApiRequest::Shutdown, reply) => {
                    let _ = reply.send(ApiResponse::Info(self.info()));
                    break ExitReason::ApiShutdown;
                }
                VmEvent::Api(ApiRequest::MigrationAbort, reply)
                    if matches!(self.role, Role::Incoming | Role::Loaded | Role::Committed) =>
                {
                    migration::update(&self.migration, |s| {
                        s.phase = Phase::Aborted;
                        s.error = Some("aborted on request".into());
                    });
                    let _ = reply.send(ApiResponse::Migration(migration::current(&self.migration)));
                    break ExitReason::IncomingAborted;
                }
                VmEvent::Api(req, reply) => {
                    let resp = self.handle_api(req).unwrap_or_else(ApiResponse::Failed);
                    let _ = reply.send(resp);
                }
                VmEvent::MigrationStop(reply) => {
                    let _ = reply.send(self.on_migration_stop());
                }
                VmEvent::MigrationEnded(outcome) => self.on_migration_ended(outcome),
                VmEvent::IncomingState(bytes, reply) => {
                    let r = self.on_incoming_state(&bytes);
                    if let Err(e) = &r {
                        tracing::error!(error = %error_chain(e), "incoming state refused");
                    }
                    let _ = reply.send(r);
                }
                VmEvent::IncomingCommit(c, auto, reply) => {
                    let _ = reply.send(self.on_incoming_commit(c, auto));
                }
                VmEvent::IncomingFailed(e) => {
                    if matches!(self.role, Role::Incoming | Role::Loaded) {
                        break ExitReason::IncomingFailed(e);
                    }
                    tracing::warn!(
                        error = %error_chain(&e),
                        "migration stream error after the hand-over"
                    );
                }
            }
        };
        self.stop();
        reason
    }

    /// Stops the vCPU threads and the I/O runtime.
    fn stop(&mut self) {
        // A migration thread still running is cut off and waited for (it kicks the vCPU
        // threads, which must outlive it). Events still queued are dropped, so that a request
        // of it waiting for an answer fails at once.
        self.abort_sending();
        if let Some(mut s) = self.sending.take() {
            while self.events.try_recv().is_ok() {}
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
        for v in &self.vcpus {
            let _ = v.send(VcpuCommand::Exit);
        }
        for v in &mut self.vcpus {
            if let Err(e) = v.wait_for(VcpuState::Exited, VCPU_ACK_TIMEOUT) {
                tracing::warn!(error = %error_chain(&e), "vCPU did not exit");
                continue;
            }
            v.join();
        }
        if let Some(rt) = self.runtime.take() {
            if let Some((stop, server)) = self.api_server.take() {
                let _ = stop.send(());
                let _ = rt.block_on(async { tokio::time::timeout(API_DRAIN, server).await });
            }
            rt.shutdown(Duration::from_secs(2));
        }
    }
}
