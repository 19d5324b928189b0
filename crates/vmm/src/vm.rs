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
use crate::memory::{self, GuestMem, MemoryError, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::vcpu::regs::{self, RegsError};
use crate::vcpu::{kick, Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuState};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
}

impl ExitReason {
    /// Exit status: 0 for ends the guest or an operator asked for, 3 for a triple fault, 4 for
    /// a vCPU failure (KVM internal error, unhandled exit).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestShutdown
            | ExitReason::ApiShutdown
            | ExitReason::Terminated(_) => 0,
            ExitReason::TripleFault(_) => 3,
            ExitReason::VcpuFailed(_) => 4,
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

/// A built, running VM.
pub struct Vm {
    config: VmConfig,
    _kvm: Kvm,
    _vm_fd: VmFd,
    _mem: Arc<GuestMem>,
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VmEvent>,
    _events_tx: Sender<VmEvent>,
    runtime: Option<tokio::runtime::Runtime>,
    state: RunState,
    cmdline: String,
    started: Instant,
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
    /// Builds the VM and starts its vCPUs. `started` is when the process began.
    pub fn build(config: VmConfig, started: Instant) -> Result<Vm, VmError> {
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

        let (mem, _memfd) = memory::create_guest_memory(config.memory_mib)?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the mapping is owned by `mem`, which this VM keeps alive (and the vCPUs
            // and devices hold references to) for as long as the VM fd exists.
            unsafe { vm_fd.set_user_memory_region(r) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        let mut pio = Bus::default();
        let (console_tx, console_rx) = std::sync::mpsc::channel();
        let fifo_empty = EventFd::new(0).map_err(VmError::EventFd)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq_line(&vm_fd, COM1_IRQ)?,
            InputEvents {
                fifo_empty: fifo_empty.try_clone().map_err(VmError::EventFd)?,
            },
            ConsoleOut(console_tx),
        )));
        start_console(&config.serial, console_rx, serial.clone(), &fifo_empty)?;
        pio.insert(serial, COM1_PORT_BASE, COM1_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        )?;

        let mut mmio = Bus::default();
        let mut announced = Vec::new();
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
            let transport =
                MmioTransport::new(Box::new(block), mem.clone(), interrupt, vec![notify]);
            mmio.insert(Arc::new(Mutex::new(transport)), base, VIRTIO_MMIO_SIZE)?;
            announced.push((base, VIRTIO_MMIO_SIZE, irq));
            tracing::info!(disk = %name, base, irq, read_only, "disk");
        }

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

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let mut vcpu_fds = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported, i, config.vcpus)?)
                .map_err(|e| VmError::Kvm("KVM_SET_CPUID2", e))?;
            regs::setup_common(&fd)?;
            if i == 0 {
                regs::setup_boot_vcpu(&fd, &mem, loaded.entry)?;
            }
            vcpu_fds.push(fd);
        }

        let api_tx = events_tx.clone();
        if let Some(path) = &config.api_socket {
            let _guard = runtime.enter();
            let server = api::bind(path, api_tx)?;
            runtime.spawn(server);
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
            );
            vcpus.push(vcpu.spawn(false)?);
        }
        Ok(Vm {
            config,
            _kvm: kvm,
            _vm_fd: vm_fd,
            _mem: mem,
            vcpus,
            events,
            _events_tx: events_tx,
            runtime: Some(runtime),
            state: RunState::Running,
            cmdline: loaded.cmdline,
            started,
        })
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
    fn all_vcpus(&mut self, cmd: VcpuCommand, want: VcpuState) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.send(cmd)?;
        }
        for v in &mut self.vcpus {
            v.wait_for(want, VCPU_ACK_TIMEOUT)?;
        }
        Ok(())
    }

    fn handle_api(&mut self, req: ApiRequest) -> Result<ApiResponse, String> {
        match req {
            ApiRequest::Info => {}
            ApiRequest::Pause => {
                if self.state == RunState::Running {
                    let t = Instant::now();
                    self.all_vcpus(VcpuCommand::Pause, VcpuState::Paused)
                        .map_err(|e| e.to_string())?;
                    self.state = RunState::Paused;
                    tracing::info!(took_us = t.elapsed().as_micros() as u64, "vm paused");
                }
            }
            ApiRequest::Resume => {
                if self.state == RunState::Paused {
                    self.all_vcpus(VcpuCommand::Resume, VcpuState::Running)
                        .map_err(|e| e.to_string())?;
                    self.state = RunState::Running;
                    tracing::info!("vm resumed");
                }
            }
            ApiRequest::Shutdown => {}
        }
        Ok(ApiResponse::Info(self.info()))
    }

    /// Runs the control loop until the VM ends, then stops every vCPU.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            let Ok(event) = self.events.recv() else {
                // Unreachable while `_events_tx` lives; end cleanly if it ever happens.
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
                VmEvent::Api(req, reply) => {
                    let resp = self.handle_api(req).unwrap_or_else(ApiResponse::Error);
                    let _ = reply.send(resp);
                }
            }
        };
        self.stop();
        reason
    }

    /// Stops the vCPU threads and the I/O runtime.
    fn stop(&mut self) {
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
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
