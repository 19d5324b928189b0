//! Building a VM: KVM checks, memory, devices, vCPUs, in the order the module docs of
//! [`super`] give.

use super::io::IoRuntime;
use super::{Role, StartMode, Vm, VmError, VmEvent};
use crate::api::{self, ApiError};
use crate::boot::{self, BootError};
use crate::bus::{Bus, BusError};
use crate::cpuid::{self, CpuidError};
use crate::devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use crate::devices::serial::{
    start_console, ConsoleError, ConsoleOut, InputEvents, SerialDevice, COM1_IRQ, COM1_PORT_BASE,
    COM1_PORT_LEN,
};
use crate::devices::virtio::block::{Backend, Block, Disk, FileBackend, StoragedBackend};
use crate::devices::virtio::disk::DiskDevice;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::vhost_user::VhostUserBlk;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::memory::{self, MemoryError, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::migration::transport::StreamTls;
use crate::persist::Shape;
use crate::vcpu::regs::{self, RegsError};
use crate::vcpu::{kick, Vcpu};
use crate::vcpu::{VcpuError, VcpuShared};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thiserror::Error;
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_RO;
use vmm_api::config::{ConfigError, DiskConfig, VmConfig};
use vmm_api::vm::RunState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// KVM's API version this code is written for.
const KVM_API_VERSION: i32 = 12;

/// Errors while building the VM.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error("configuration")]
    Config(#[from] ConfigError),
    /// A restored guest's memory is the snapshot's file: a memory file cannot be given too.
    #[error("memory_file cannot be used with a snapshot restore (the guest's memory is mapped from the snapshot)")]
    MemoryFileWithRestore,
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
    /// A vhost-user disk's backend could not be used.
    #[error("disk {0}")]
    VhostUser(
        String,
        #[source] crate::devices::virtio::vhost_user::VhostUserError,
    ),
    /// An eventfd could not be created.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// A build thread (kernel loading, memory registration) could not start.
    #[error("start a build thread")]
    Thread(#[source] std::io::Error),
    /// A build thread panicked (a bug).
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    /// The I/O runtime could not start.
    #[error("start the I/O runtime")]
    Runtime(#[source] std::io::Error),
    /// The API socket could not be served.
    #[error("API socket")]
    Api(#[from] ApiError),
    /// The kick signal handler could not be installed.
    #[error("install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A vCPU did not do as told.
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    /// The migration listener could not be bound.
    #[error("listen for the migration stream on {0}")]
    Listen(String, #[source] std::io::Error),
    /// The TLS directory cannot serve migration streams.
    #[error(transparent)]
    StreamTls(#[from] crate::migration::transport::TransportError),
    /// With TLS an incoming migration must name the source host it accepts.
    #[error("with tls_dir, --incoming-from must name the source host to accept")]
    IncomingFromMissing,
    /// Without TLS the source's identity cannot be checked.
    #[error("--incoming-from needs tls_dir: without TLS no identity can be checked")]
    IncomingFromWithoutTls,
    /// A snapshot could not be loaded.
    #[error("restore the snapshot")]
    Restore(#[source] crate::snapshot::SnapshotError),
    /// The snapshot's state could not be loaded or run.
    #[error("load the saved state")]
    LoadState(#[source] VmError),
}

/// IRQ lines for disks, in order: ISA lines not taken by legacy devices, then the I/O APIC's
/// upper pins.
const DISK_IRQS: [u32; vmm_api::config::MAX_DISKS] =
    [5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21];

fn check_kvm(kvm: &Kvm) -> Result<(), BuildError> {
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(BuildError::KvmVersion(v));
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
            return Err(BuildError::MissingCap(cap));
        }
    }
    Ok(())
}

/// Opens the backend of a disk served in the VMM.
fn open_backend(
    disk: &DiskConfig,
    vm_name: &str,
    runtime: &IoRuntime,
) -> Result<Backend, BuildError> {
    let name = disk.describe();
    match (&disk.path, &disk.storaged) {
        (Some(path), _) => Ok(Backend::File(
            FileBackend::open(path, disk.read_only).map_err(|e| BuildError::Disk(name, e))?,
        )),
        (None, Some(volume)) => Ok(Backend::Storaged(
            runtime
                .block_on(StoragedBackend::connect(volume, vm_name))
                .map_err(|e| BuildError::Disk(name, e))?,
        )),
        (None, None) => Err(BuildError::DiskUnsupported(
            name,
            "neither path nor storaged",
        )),
    }
}

fn irq_line(vm_fd: &VmFd, gsi: u32) -> Result<IrqLine, BuildError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm_fd
        .register_irqfd(&evt, gsi)
        .map_err(|e| BuildError::Kvm("KVM_IRQFD", e))?;
    Ok(IrqLine { evt, gsi })
}

impl Vm {
    /// Builds the VM and starts its vCPUs (paused unless it boots). `started` is when the
    /// process began.
    pub fn build(config: VmConfig, started: Instant, mode: StartMode) -> Result<Vm, BuildError> {
        config.validate()?;
        let stream_tls = config.tls_dir.as_deref().map(StreamTls::load).transpose()?;
        if let StartMode::Incoming(incoming) = &mode {
            match (&stream_tls, &incoming.from) {
                (Some(_), None) => return Err(BuildError::IncomingFromMissing),
                (None, Some(_)) => return Err(BuildError::IncomingFromWithoutTls),
                _ => {}
            }
        }
        if matches!(mode, StartMode::Restore(_)) && config.memory_file.is_some() {
            return Err(BuildError::MemoryFileWithRestore);
        }
        // A vhost-user backend maps guest memory: it must be a shared memfd.
        let shared = config.disks.iter().any(|d| d.vhost_user.is_some());
        let (mem, memfd, snapshot_state) = match &mode {
            StartMode::Restore(path) => {
                let r = crate::snapshot::open(path, config.memory_mib, shared)
                    .map_err(BuildError::Restore)?;
                (r.mem, r.memfd, Some(r.state))
            }
            _ => {
                // An incoming guest's memory must start zeroed: the stream skips zero pages.
                let emptied = matches!(mode, StartMode::Incoming(_));
                let (mem, fd) = match &config.memory_file {
                    Some(path) => memory::open_guest_memory_file(config.memory_mib, path, emptied)?,
                    None => memory::create_guest_memory(config.memory_mib)?,
                };
                (mem, Some(fd), None)
            }
        };
        // The kernel is copied into guest memory on its own thread while the VM is built; joined
        // before the boot structures are written. The copy is the longest step of a start
        // (~5 ms for the 7 MiB of the test guest's kernel: new memfd pages, not the bytes).
        let booting = matches!(mode, StartMode::Boot);
        let kernel_loader = if booting {
            let (mem, path) = (mem.clone(), config.kernel.clone());
            let loader = std::thread::Builder::new()
                .name("kernel-load".into())
                .spawn(move || boot::load_kernel(&mem, &path))
                .map_err(BuildError::Thread)?;
            Some(loader)
        } else {
            None
        };
        kick::install_handler().map_err(BuildError::Signal)?;
        let runtime = IoRuntime::start().map_err(BuildError::Runtime)?;
        let (events_tx, events) = std::sync::mpsc::channel();

        let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
        check_kvm(&kvm)?;
        let vm_fd = Arc::new(
            kvm.create_vm()
                .map_err(|e| BuildError::Kvm("KVM_CREATE_VM", e))?,
        );
        vm_fd
            .set_tss_address(memory::KVM_TSS_ADDR)
            .map_err(|e| BuildError::Kvm("KVM_SET_TSS_ADDR", e))?;
        // The memory is registered before the in-kernel irqchip and PIT exist: registering
        // it then costs a fraction of a millisecond, after them KVM waits for a grace period
        // of its SRCU (a timer tick, 4-8 ms on these hosts) to retire the old memory slots.
        memory::register_slots(&vm_fd, &mem, false)
            .map_err(|e| BuildError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| BuildError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| BuildError::Kvm("KVM_CREATE_PIT2", e))?;

        let mut pio = Bus::default();
        let (console_tx, console_rx) = std::sync::mpsc::channel();
        let fifo_empty = EventFd::new(0).map_err(BuildError::EventFd)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq_line(&vm_fd, COM1_IRQ)?,
            InputEvents {
                fifo_empty: fifo_empty.try_clone().map_err(BuildError::EventFd)?,
            },
            ConsoleOut(console_tx),
            matches!(mode, StartMode::Boot),
        )));
        start_console(&config.serial, console_rx, serial.clone(), &fifo_empty)?;
        pio.insert(serial.clone(), COM1_PORT_BASE, COM1_PORT_LEN)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(events_tx.clone())));
        pio.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;

        let mut mmio = Bus::default();
        let mut announced = Vec::new();
        let mut disks = Vec::new();
        let mut disk_stats = Vec::new();
        let mut dirty_backends = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let irq = DISK_IRQS[i];
            let name = disk.describe();
            let line = irq_line(&vm_fd, irq)?;
            let (device, interrupt) = match &disk.vhost_user {
                Some(vu) => {
                    let dev = VhostUserBlk::connect(vu, disk.read_only, &mem)
                        .map_err(|e| BuildError::VhostUser(name.clone(), e))?;
                    dirty_backends.push((i, dev.dirty_logging()));
                    disk_stats.push((device_name(i), None));
                    (
                        DiskDevice::VhostUser(dev),
                        VirtioInterrupt::raised_by_backend(line),
                    )
                }
                None => {
                    let backend = open_backend(disk, &config.name, &runtime)?;
                    let id = format!("vmhop-disk{i}");
                    let served = Disk::new(backend, disk.read_only, &id);
                    disk_stats.push((device_name(i), Some(served.stats().clone())));
                    let block = Block::new(served, runtime.handle().clone());
                    (DiskDevice::Block(block), VirtioInterrupt::new(line))
                }
            };
            let read_only = device.features() & (1 << VIRTIO_BLK_F_RO) != 0;
            // Each queue's notification: KVM signals its eventfd on a 4-byte write of the
            // queue's index to QueueNotify without leaving the kernel.
            let mut notify = Vec::new();
            for q in 0..disk.queues() {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
                vm_fd
                    .register_ioevent(
                        &evt,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                        u32::from(q),
                    )
                    .map_err(|e| BuildError::Kvm("KVM_IOEVENTFD", e))?;
                notify.push(evt);
            }
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                device,
                mem.clone(),
                Arc::new(interrupt),
                notify,
            )));
            mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            disks.push(transport);
            announced.push((base, VIRTIO_MMIO_SIZE, irq));
            tracing::info!(disk = %name, base, irq, read_only, "disk");
        }

        let mut entry = None;
        let mut cmdline = config.cmdline.clone();
        if let Some(loader) = kernel_loader {
            let kernel = loader
                .join()
                .map_err(|_| BuildError::Panicked("kernel-load"))??;
            let loaded = boot::load(
                &mem,
                kernel,
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
            .map_err(|e| BuildError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(|e| BuildError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
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
                .map_err(|e| BuildError::Kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported, i, config.vcpus)?)
                .map_err(|e| BuildError::Kvm("KVM_SET_CPUID2", e))?;
            regs::setup_common(&fd)?;
            if let (0, Some(entry)) = (i, entry) {
                regs::setup_boot_vcpu(&fd, &mem, entry)?;
            }
            vcpu_fds.push(fd);
        }

        let api_tx = events_tx.clone();
        let mut api_server = None;
        let migration = crate::migration::SharedStatus::default();
        if let Some(path) = &config.api_socket {
            let _guard = runtime.handle().enter();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let counters = api::Counters {
                vcpus: vcpu_shared.clone(),
                disks: disk_stats,
                migration: migration.clone(),
            };
            let server = api::bind(path, api_tx, counters, stop_rx)?;
            api_server = Some((stop_tx, runtime.handle().spawn(server)));
        }
        let sig_tx = events_tx.clone();
        runtime.handle().spawn(async move {
            if let Ok(name) = vmhop_common::signal::stop_requested().await {
                let _ = sig_tx.send(VmEvent::Terminate(name));
            }
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
            vm_fd,
            mem,
            memfd,
            serial,
            i8042,
            disks,
            dirty_backends,
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
            migration,
            sending: None,
            source_paused_at_us: 0,
            source_started_at_us: 0,
            api_server,
            stream_tls,
        };
        match mode {
            StartMode::Boot => {}
            StartMode::Incoming(incoming) => vm.listen(&incoming)?,
            StartMode::Restore(path) => {
                let st = snapshot_state.expect("restore mode has a state");
                if let Err(e) = vm.load_state(st).and_then(|_| vm.resume_here()) {
                    vm.stop();
                    return Err(BuildError::LoadState(e));
                }
                tracing::info!(snapshot = %path.display(), "restored and running");
            }
        }
        Ok(vm)
    }

    pub(super) fn shape(&self) -> Shape {
        Shape {
            memory_mib: self.config.memory_mib,
            vcpus: self.config.vcpus,
            disks: self.config.disks.len(),
        }
    }
}

/// The guest's name for disk `i` (`vda`, `vdb`, ...).
fn device_name(i: usize) -> String {
    format!("vd{}", char::from(b'a' + (i % 26) as u8))
}
