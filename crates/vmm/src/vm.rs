//! The VM: built from a [`VmConfig`], then driven by one control loop that owns all state
//! changes. vCPU threads, devices, the API server and signal handlers only send [`VmEvent`]s.
//!
//! Order of KVM calls while building (the order matters):
//! 1. `KVM_CREATE_VM`, then `KVM_SET_TSS_ADDR` (Intel needs it before any vCPU runs).
//! 2. `KVM_CREATE_IRQCHIP` before any vCPU exists: each vCPU gets its in-kernel LAPIC only
//!    when the irqchip is already there. Then `KVM_CREATE_PIT2`, which needs the irqchip.
//! 3. `KVM_SET_USER_MEMORY_REGION` for each RAM region.
//! 4. Devices: `KVM_IRQFD` for each interrupt line (needs the irqchip), `KVM_IOEVENTFD` for each
//!    virtio queue's notify register.
//! 5. The kernel and boot structures are written into guest memory.
//! 6. `KVM_CREATE_VCPU` and each vCPU's setup (see [`crate::vcpu::regs`] for its own order),
//!    then the vCPU threads start.
//!
//! A VM started for an incoming migration (or from a snapshot) skips step 5 and the boot
//! registers: its vCPU threads start paused, and the saved state replaces everything, in the
//! order given in [`crate::state`] (VM-wide) and [`crate::vcpu::state`] (per vCPU).

use crate::api::{self, ApiRequest, ApiResponse, DiskInfo, VmInfo};
use crate::boot::{self, BootError};
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, VmConfig};
use crate::cpuid::{self, CpuidError};
use crate::devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use crate::devices::serial::{
    start_console, ConsoleError, ConsoleOut, InputEvents, SerialDevice, COM1_IRQ, COM1_PORT_BASE,
    COM1_PORT_LEN,
};
use crate::devices::virtio::block::{Backend, Block, FileBackend, StoragedBackend};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::IrqLine;
use crate::error_chain;
use crate::memory::{self, GuestMem, MemoryError, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::migration::dirty::DirtyLog;
use crate::migration::receive::{CommitDone, DestCtx};
use crate::migration::send::{Outcome, SourceCtx, StopCopy};
use crate::migration::wire::Commit;
use crate::migration::{self, MigrationStatus, Phase, SendParams, SharedStatus};
use crate::state::{self, KvmVmState, Shape, VmState};
use crate::vcpu::regs::{self, RegsError};
use crate::vcpu::{kick, Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuState};
use crate::vcpu::{wall_us, VcpuShared};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use std::fs::File;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long the API server may take to finish the answers in progress at exit.
const API_DRAIN: Duration = Duration::from_secs(2);
/// How long a vCPU may take to acknowledge pause, resume or exit.
pub const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// IRQ lines for disks, in order: ISA lines not taken by legacy devices, then the I/O APIC's
/// upper pins.
const DISK_IRQS: [u32; crate::config::MAX_DISKS] =
    [5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21];
/// KVM's API version this code is written for.
const KVM_API_VERSION: i32 = 12;

/// Errors while building or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("configuration")]
    Config(#[from] ConfigError),
    /// /dev/kvm could not be opened.
    #[error("open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the one this VMM speaks.
    #[error("KVM API version {0}, expected {KVM_API_VERSION}")]
    KvmVersion(i32),
    /// A KVM capability the VMM depends on is missing.
    #[error("KVM lacks {0:?}")]
    MissingCap(Cap),
    /// A VM-level KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    /// Boot preparation.
    #[error("boot")]
    Boot(#[from] BootError),
    /// vCPU register setup.
    #[error("vCPU setup")]
    Regs(#[from] RegsError),
    /// CPUID policy.
    #[error("CPUID")]
    Cpuid(#[from] CpuidError),
    /// Device layout.
    #[error("device layout")]
    Bus(#[from] BusError),
    /// Console.
    #[error("serial console")]
    Console(#[from] ConsoleError),
    /// A disk could not be opened.
    #[error("disk {0}")]
    Disk(
        String,
        #[source] crate::devices::virtio::block::BackendError,
    ),
    /// A disk kind this build cannot open.
    #[error("disk {0}: {1}")]
    DiskUnsupported(String, &'static str),
    /// An eventfd could not be created.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// The I/O runtime could not start.
    #[error("start the I/O runtime")]
    Runtime(#[source] std::io::Error),
    /// The API socket could not be served.
    #[error("API socket")]
    Api(#[from] api::ApiError),
    /// The kick signal handler could not be installed.
    #[error("install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A vCPU did not do as told.
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    /// The migration listener could not be bound.
    #[error("listen for the migration stream on {0}")]
    Listen(String, #[source] std::io::Error),
    /// A snapshot could not be loaded.
    #[error("restore the snapshot")]
    Restore(#[source] crate::snapshot::SnapshotError),
    /// A saved state could not be loaded.
    #[error("load the saved state: {0}")]
    LoadState(String),
}

/// How a VM starts.
#[derive(Debug, Clone)]
pub enum StartMode {
    /// Boot the kernel.
    Boot,
    /// Receive a running guest on this `HOST:PORT` (see [`crate::migration`]).
    Incoming(String),
    /// Load a snapshot file (see [`crate::snapshot`]) and run it.
    Restore(std::path::PathBuf),
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
    MigrationStop(Sender<Result<StopCopy, String>>),
    /// Source: the migration thread ended.
    MigrationEnded(Outcome),
    /// Destination: the state arrived; load it.
    IncomingState(Vec<u8>, Sender<Result<(), String>>),
    /// Destination: the guest is ours (resume now if the flag says `auto`).
    IncomingCommit(Commit, bool, Sender<Result<CommitDone, String>>),
    /// Destination: the stream failed before the hand-over.
    IncomingFailed(String),
}

/// Why the VM ended: decides the process exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (`reboot=k`): a clean end.
    GuestReset,
    /// The guest powered off.
    GuestShutdown,
    /// `PUT /v1/vm/shutdown`.
    ApiShutdown,
    /// A signal.
    Terminated(&'static str),
    /// A triple fault.
    TripleFault(String),
    /// A vCPU failure.
    VcpuFailed(String),
    /// An incoming migration failed before the hand-over (the source keeps the guest).
    IncomingFailed(String),
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

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs are running.
    Running,
    /// vCPUs are paused.
    Paused,
}

/// Who has the guest while a migration is under way or after one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// No migration, or one that ended with the guest here.
    Own,
    /// Source: a migration thread runs.
    Sending,
    /// Source: the guest was handed over and the destination waits; it stays paused here
    /// and an abort can still take it back.
    HandedOver,
    /// Source: the destination runs the guest; only a shutdown remains.
    Gone,
    /// Destination: waiting for the stream.
    Incoming,
    /// Destination: the state is loaded; waiting for COMMIT.
    Loaded,
    /// Destination: committed, waiting for `PUT /v1/vm/resume`.
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
    disks: Vec<Arc<Mutex<MmioTransport>>>,
    vcpu_shared: Arc<VcpuShared>,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    runtime: Option<tokio::runtime::Runtime>,
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
}

fn check_kvm(kvm: &Kvm) -> Result<(), VmError> {
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(VmError::KvmVersion(v));
    }
    for cap in [
        Cap::Irqchip,
        Cap::UserMemory,
        Cap::Ioeventfd,
        Cap::Irqfd,
        Cap::Pit2,
        Cap::ImmediateExit,
        Cap::ExtCpuid,
        Cap::SetTssAddr,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(())
}

fn irq_line(vm_fd: &VmFd, gsi: u32) -> Result<IrqLine, VmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&evt, gsi)
        .map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
    Ok(IrqLine { evt, gsi })
}

impl Vm {
    /// Builds the VM and starts its vCPUs (paused unless it boots). `started` is when the
    /// process began.
    pub fn build(config: VmConfig, started: Instant, mode: StartMode) -> Result<Vm, VmError> {
        config.validate()?;
        kick::install_handler().map_err(VmError::Signal)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmm-io")
            .enable_all()
            .build()
            .map_err(VmError::Runtime)?;
        let (events_tx, events) = std::sync::mpsc::channel();

        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        check_kvm(&kvm)?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        vm_fd
            .set_tss_address(memory::KVM_TSS_ADDR)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;

        let (mem, memfd, snapshot_state) = match &mode {
            StartMode::Restore(path) => {
                let (mem, st) =
                    crate::snapshot::open(path, config.memory_mib).map_err(VmError::Restore)?;
                (mem, None, Some(st))
            }
            _ => {
                let (mem, fd) = memory::create_guest_memory(config.memory_mib)?;
                (mem, Some(fd), None)
            }
        };
        memory::register_slots(&vm_fd, &mem, false)
            .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;

        let mut pio = Bus::default();
        let (console_tx, console_rx) = std::sync::mpsc::channel();
        let fifo_empty = EventFd::new(0).map_err(VmError::EventFd)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq_line(&vm_fd, COM1_IRQ)?,
            InputEvents {
                fifo_empty: fifo_empty.try_clone().map_err(VmError::EventFd)?,
            },
            ConsoleOut(console_tx),
            matches!(mode, StartMode::Boot),
        )));
        start_console(&config.serial, console_rx, serial.clone(), &fifo_empty)?;
        pio.insert(serial.clone(), COM1_PORT_BASE, COM1_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        )?;

        let mut mmio = Bus::default();
        let mut announced = Vec::new();
        let mut disks = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let irq = DISK_IRQS[i];
            let name = disk.describe();
            let backend = match (&disk.path, &disk.storaged) {
                (Some(path), _) => Backend::File(
                    FileBackend::open(path, disk.read_only)
                        .map_err(|e| VmError::Disk(name.clone(), e))?,
                ),
                (None, Some(volume)) => Backend::Storaged(
                    runtime
                        .block_on(StoragedBackend::connect(volume, &config.name))
                        .map_err(|e| VmError::Disk(name.clone(), e))?,
                ),
                (None, None) => {
                    return Err(VmError::DiskUnsupported(name, "neither path nor storaged"))
                }
            };
            let read_only = disk.read_only || backend.read_only();
            let id = format!("vmhop-disk{i}");
            let block = Block::new(backend, read_only, &id, runtime.handle().clone());
            let interrupt = Arc::new(VirtioInterrupt::new(irq_line(&vm_fd, irq)?));
            let notify = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
            // Queue 0's notification: KVM signals the eventfd on a 4-byte write of 0 to
            // QueueNotify without leaving the kernel.
            vm_fd
                .register_ioevent(
                    &notify,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    0u32,
                )
                .map_err(|e| VmError::Kvm("KVM_IOEVENTFD", e))?;
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                Box::new(block),
                mem.clone(),
                interrupt,
                vec![notify],
            )));
            mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            disks.push(transport);
            announced.push((base, VIRTIO_MMIO_SIZE, irq));
            tracing::info!(disk = %name, base, irq, read_only, "disk");
        }

        let booting = matches!(mode, StartMode::Boot);
        let mut entry = None;
        let mut cmdline = config.cmdline.clone();
        if booting {
            let loaded = boot::load(
                &mem,
                &config.kernel,
                config.initramfs.as_deref(),
                &config.cmdline,
                &announced,
                config.vcpus,
                config.boot,
            )?;
            tracing::info!(entry = ?loaded.entry, cmdline = %loaded.cmdline, "kernel loaded");
            entry = Some(loaded.entry);
            cmdline = loaded.cmdline;
        }

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|e| VmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .to_vec();
        let vcpu_shared = Arc::new(VcpuShared {
            msr_list,
            ..Default::default()
        });
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let mut vcpu_fds = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported, i, config.vcpus)?)
                .map_err(|e| VmError::Kvm("KVM_SET_CPUID2", e))?;
            regs::setup_common(&fd)?;
            if let (0, Some(entry)) = (i, entry) {
                regs::setup_boot_vcpu(&fd, &mem, entry)?;
            }
            vcpu_fds.push(fd);
        }

        let api_tx = events_tx.clone();
        let mut api_server = None;
        if let Some(path) = &config.api_socket {
            let _guard = runtime.enter();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let server = api::bind(path, api_tx, stop_rx)?;
            api_server = Some((stop_tx, runtime.spawn(server)));
        }
        let sig_tx = events_tx.clone();
        runtime.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let _ = sig_tx.send(VmEvent::Terminate(name));
        });

        let mut vcpus = Vec::new();
        for (i, fd) in vcpu_fds.into_iter().enumerate() {
            let vcpu = Vcpu::new(
                i as u8,
                fd,
                pio.clone(),
                mmio.clone(),
                mem.clone(),
                events_tx.clone(),
                started,
                vcpu_shared.clone(),
            );
            vcpus.push(vcpu.spawn(!booting)?);
        }
        let mut vm = Vm {
            config,
            _kvm: kvm,
            vm_fd: Arc::new(vm_fd),
            mem,
            memfd,
            serial,
            disks,
            vcpu_shared,
            vcpus,
            events,
            events_tx,
            runtime: Some(runtime),
            state: if booting {
                RunState::Running
            } else {
                RunState::Paused
            },
            cmdline,
            started,
            role: Role::Own,
            migration: Arc::new(Mutex::new(MigrationStatus::default())),
            sending: None,
            source_paused_at_us: 0,
            source_started_at_us: 0,
            api_server,
        };
        match mode {
            StartMode::Boot => {}
            StartMode::Incoming(addr) => vm.listen(&addr)?,
            StartMode::Restore(path) => {
                let st = snapshot_state.expect("restore mode has a state");
                if let Err(e) = vm.load_state(st).and_then(|_| vm.resume_here()) {
                    vm.stop();
                    return Err(VmError::LoadState(e));
                }
                tracing::info!(snapshot = %path.display(), "restored and running");
            }
        }
        Ok(vm)
    }

    fn shape(&self) -> Shape {
        Shape {
            memory_mib: self.config.memory_mib,
            vcpus: self.config.vcpus,
            disks: self.config.disks.len(),
        }
    }

    /// Destination: binds the stream listener and starts the receiving thread.
    fn listen(&mut self, addr: &str) -> Result<(), VmError> {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| VmError::Listen(addr.to_string(), e))?;
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "waiting for an incoming migration");
        self.role = Role::Incoming;
        migration::update(&self.migration, |s| {
            s.role = "destination".into();
            s.phase = Phase::Idle;
        });
        let ctx = DestCtx {
            listener,
            shape: self.shape(),
            mem: self.mem.clone(),
            status: self.migration.clone(),
            events: self.events_tx.clone(),
        };
        std::thread::Builder::new()
            .name("mig-receive".into())
            .spawn(move || migration::receive::run(ctx))
            .map_err(|e| VmError::Listen(addr.to_string(), e))?;
        Ok(())
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            name: self.config.name.clone(),
            state: match self.state {
                RunState::Running => "running",
                RunState::Paused => "paused",
            }
            .into(),
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
    fn pause_vcpus(&mut self) -> Result<u64, String> {
        if self.state == RunState::Running {
            let t = Instant::now();
            self.all_vcpus(|| VcpuCommand::Pause, VcpuState::Paused)
                .map_err(|e| error_chain(&e))?;
            self.state = RunState::Paused;
            tracing::info!(took_us = t.elapsed().as_micros() as u64, "vm paused");
        }
        Ok(wall_us())
    }

    /// Runs the guest here: the devices' data paths first, then the vCPUs.
    fn resume_here(&mut self) -> Result<(), String> {
        self.restart_data_paths()?;
        if self.state == RunState::Paused {
            self.vcpu_shared.resumed_at_us.store(0, Ordering::SeqCst);
            self.all_vcpus(|| VcpuCommand::Resume, VcpuState::Running)
                .map_err(|e| error_chain(&e))?;
            self.state = RunState::Running;
            tracing::info!("vm resumed");
        }
        Ok(())
    }

    /// Pauses the guest, drains every device and saves the whole state (see
    /// [`crate::state`] and [`crate::vcpu::state`] for the order of the KVM calls). Returns
    /// the state and when the vCPUs stopped. On failure the VM is as it was.
    fn pause_and_save(&mut self) -> Result<(VmState, u64), String> {
        let was_running = self.state == RunState::Running;
        let paused_at = self.pause_vcpus()?;
        let saved = self.save_paused();
        if saved.is_err() {
            let r = if was_running {
                self.resume_here()
            } else {
                self.restart_data_paths()
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "could not resume after a failed save");
            }
        }
        saved.map(|st| (st, paused_at))
    }

    fn save_paused(&mut self) -> Result<VmState, String> {
        let t = Instant::now();
        for d in &self.disks {
            lock(d).quiesce().map_err(|e| error_chain(&e))?;
        }
        let drained_us = t.elapsed().as_micros() as u64;
        let kvm = KvmVmState::save(&self.vm_fd).map_err(|e| error_chain(&e))?;
        let (tx, rx) = std::sync::mpsc::channel();
        for v in &self.vcpus {
            v.send(VcpuCommand::Save(tx.clone()))
                .map_err(|e| error_chain(&e))?;
        }
        let mut vcpus = Vec::new();
        for _ in &self.vcpus {
            let r = rx
                .recv_timeout(VCPU_ACK_TIMEOUT)
                .map_err(|_| "a vCPU did not save its state in time".to_string())?;
            vcpus.push(*r?);
        }
        vcpus.sort_by_key(|v| v.index);
        let serial = lock(&self.serial).save();
        let mut disks = Vec::new();
        for d in &self.disks {
            disks.push(lock(d).save()?);
        }
        tracing::info!(
            drained_us,
            total_us = t.elapsed().as_micros() as u64,
            "vm state saved"
        );
        Ok(VmState {
            shape: self.shape(),
            kvm,
            vcpus,
            serial,
            disks,
        })
    }

    /// Loads a saved state into this VM, whose vCPUs have never run; the data paths stay
    /// stopped until [`Self::resume_here`].
    fn load_state(&mut self, st: VmState) -> Result<(), String> {
        let t = Instant::now();
        st.check_shape(&self.shape()).map_err(|e| error_chain(&e))?;
        st.kvm.restore(&self.vm_fd).map_err(|e| error_chain(&e))?;
        let (tx, rx) = std::sync::mpsc::channel();
        for (v, saved) in self.vcpus.iter().zip(st.vcpus) {
            v.send(VcpuCommand::Restore(Box::new(saved), tx.clone()))
                .map_err(|e| error_chain(&e))?;
        }
        for _ in &self.vcpus {
            rx.recv_timeout(VCPU_ACK_TIMEOUT)
                .map_err(|_| "a vCPU did not load its state in time".to_string())??;
        }
        {
            let mut serial = lock(&self.serial);
            serial.restore(&st.serial)?;
            serial.open_input();
        }
        for (i, (d, saved)) in self.disks.iter().zip(&st.disks).enumerate() {
            lock(d)
                .restore(saved)
                .map_err(|e| format!("disk {i}: {e}"))?;
        }
        tracing::info!(took_us = t.elapsed().as_micros() as u64, "vm state loaded");
        Ok(())
    }

    fn start_migration(&mut self, params: SendParams) -> Result<ApiResponse, String> {
        params.validate()?;
        if self.role != Role::Own {
            return Ok(ApiResponse::Refused(format!(
                "a migration is already under way or done here ({:?})",
                self.role
            )));
        }
        let abort = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(Mutex::new(None));
        *lock(&self.migration) = MigrationStatus {
            role: "source".into(),
            phase: Phase::Precopy,
            ..Default::default()
        };
        let ctx = SourceCtx {
            params: params.clone(),
            name: self.config.name.clone(),
            shape: self.shape(),
            mem: self.mem.clone(),
            private_memory: self.memfd.is_none(),
            dirty: DirtyLog::new(self.vm_fd.clone(), self.mem.clone()),
            status: self.migration.clone(),
            abort: abort.clone(),
            stream: stream.clone(),
            events: self.events_tx.clone(),
            kickers: self.vcpus.iter().filter_map(|v| v.kicker()).collect(),
        };
        let thread = std::thread::Builder::new()
            .name("mig-send".into())
            .spawn(move || migration::send::run(ctx))
            .map_err(|e| format!("start the migration thread: {e}"))?;
        tracing::info!(destination = %params.destination, downtime_limit_ms = params.downtime_limit_ms,
            max_iterations = params.max_iterations, throttle = params.throttle,
            resume = %params.resume, "migration started");
        self.sending = Some(Sending {
            abort,
            stream,
            thread: Some(thread),
            paused: false,
            auto: params.resume == "auto",
        });
        self.role = Role::Sending;
        Ok(ApiResponse::Accepted(migration::current(&self.migration)))
    }

    fn abort_sending(&mut self) {
        if let Some(s) = &self.sending {
            s.abort.store(true, Ordering::SeqCst);
            if let Some(stream) = lock(&s.stream).as_ref() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn on_migration_stop(&mut self) -> Result<StopCopy, String> {
        let Some(sending) = &self.sending else {
            return Err("no migration".into());
        };
        if sending.abort.load(Ordering::SeqCst) {
            return Err("aborted on request".into());
        }
        let was_running = self.state == RunState::Running;
        let (st, paused_at_us) = self.pause_and_save()?;
        if let Some(s) = &mut self.sending {
            s.paused = was_running;
        }
        let state = state::encode(&st).map_err(|e| error_chain(&e))?;
        Ok(StopCopy {
            state,
            paused_at_us,
        })
    }

    fn on_migration_ended(&mut self, outcome: Outcome) {
        let Some(mut sending) = self.sending.take() else {
            return;
        };
        if let Some(t) = sending.thread.take() {
            let _ = t.join();
        }
        match outcome {
            Outcome::HandedOver => {
                self.role = if sending.auto {
                    Role::Gone
                } else {
                    Role::HandedOver
                };
            }
            Outcome::NotHandedOver => {
                self.role = Role::Own;
                // The guest runs again as it did before: the data paths restart, and the vCPUs
                // if the stop-and-copy paused them (an operator's pause stays).
                let r = if sending.paused {
                    self.resume_here()
                } else {
                    self.restart_data_paths()
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "could not resume the guest after the failed migration");
                }
            }
        }
    }

    fn restart_data_paths(&self) -> Result<(), String> {
        for d in &self.disks {
            lock(d).unquiesce().map_err(|e| error_chain(&e))?;
        }
        Ok(())
    }

    fn on_incoming_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.role != Role::Incoming {
            return Err(format!("unexpected state (role {:?})", self.role));
        }
        let st = state::decode(bytes).map_err(|e| error_chain(&e))?;
        self.load_state(st)?;
        self.role = Role::Loaded;
        Ok(())
    }

    fn on_incoming_commit(&mut self, c: Commit, auto: bool) -> Result<CommitDone, String> {
        if self.role != Role::Loaded {
            return Err(format!("unexpected commit (role {:?})", self.role));
        }
        self.source_paused_at_us = c.paused_at_us;
        self.source_started_at_us = c.started_at_us;
        if !auto {
            self.role = Role::Committed;
            migration::update(&self.migration, |s| s.phase = Phase::HandedOver);
            tracing::info!("migration handed over; waiting for PUT /v1/vm/resume");
            return Ok(CommitDone { resumed_at_us: 0 });
        }
        self.finish_incoming()
    }

    /// Destination: runs the guest and records the final figures.
    fn finish_incoming(&mut self) -> Result<CommitDone, String> {
        self.resume_here()?;
        self.role = Role::Own;
        let resumed_at_us = match self.vcpu_shared.resumed_at_us.load(Ordering::SeqCst) {
            0 => wall_us(),
            t => t,
        };
        let downtime_us = resumed_at_us.saturating_sub(self.source_paused_at_us);
        let total_ms = resumed_at_us.saturating_sub(self.source_started_at_us) / 1000;
        migration::update(&self.migration, |s| {
            s.phase = Phase::Completed;
            s.downtime_us = downtime_us;
            s.downtime_ms = downtime_us.div_ceil(1000);
            s.total_ms = total_ms;
            s.bytes_remaining = 0;
        });
        tracing::info!(
            downtime_us,
            total_ms,
            "incoming migration completed; the guest runs here"
        );
        Ok(CommitDone { resumed_at_us })
    }

    fn handle_api(&mut self, req: ApiRequest) -> Result<ApiResponse, String> {
        match req {
            ApiRequest::Info | ApiRequest::Shutdown => {}
            ApiRequest::Pause => {
                self.pause_vcpus()?;
            }
            ApiRequest::Resume => {
                match self.role {
                    Role::Own => self.resume_here()?,
                    Role::Committed => {
                        self.finish_incoming()?;
                    }
                    Role::Incoming | Role::Loaded => {
                        return Ok(ApiResponse::Refused(
                            "no guest here yet: the incoming migration has not handed over".into(),
                        ))
                    }
                    Role::Sending => {
                        return Ok(ApiResponse::Refused(
                            "a migration is under way: PUT /v1/migration/abort first".into(),
                        ))
                    }
                    Role::HandedOver => return Ok(ApiResponse::Refused(
                        "the guest was handed over to the destination: PUT /v1/migration/abort \
                         takes it back"
                            .into(),
                    )),
                    Role::Gone => {
                        return Ok(ApiResponse::Refused(
                            "the guest runs on the destination now".into(),
                        ))
                    }
                }
            }
            ApiRequest::MigrationSend(params) => return self.start_migration(params),
            ApiRequest::MigrationStatus => {
                return Ok(ApiResponse::Migration(migration::current(&self.migration)))
            }
            ApiRequest::MigrationAbort => {
                match self.role {
                    Role::Sending => self.abort_sending(),
                    Role::HandedOver => {
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
                    _ => {
                        return Ok(ApiResponse::Refused(format!(
                            "no migration to abort here ({:?})",
                            self.role
                        )))
                    }
                }
                return Ok(ApiResponse::Migration(migration::current(&self.migration)));
            }
            ApiRequest::Snapshot(path) => {
                if self.role != Role::Own {
                    return Ok(ApiResponse::Refused(format!(
                        "cannot snapshot during a migration ({:?})",
                        self.role
                    )));
                }
                let was_running = self.state == RunState::Running;
                let (st, _) = self.pause_and_save()?;
                let written =
                    crate::snapshot::write(&path, &st, &self.mem).map_err(|e| error_chain(&e));
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
                    let resp = self.handle_api(req).unwrap_or_else(ApiResponse::Error);
                    let _ = reply.send(resp);
                }
                VmEvent::MigrationStop(reply) => {
                    let _ = reply.send(self.on_migration_stop());
                }
                VmEvent::MigrationEnded(outcome) => self.on_migration_ended(outcome),
                VmEvent::IncomingState(bytes, reply) => {
                    let r = self.on_incoming_state(&bytes);
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "incoming state refused");
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
                    tracing::warn!(error = %e, "migration stream error after the hand-over");
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
                tracing::warn!(error = %e, "vCPU did not exit");
                continue;
            }
            v.join();
        }
        if let Some(rt) = self.runtime.take() {
            if let Some((stop, server)) = self.api_server.take() {
                let _ = stop.send(());
                let _ = rt.block_on(async { tokio::time::timeout(API_DRAIN, server).await });
            }
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
