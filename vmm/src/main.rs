//! `vmm`: runs one KVM guest.
//!
//! ```text
//! vmm run --kernel vmlinux --disk path=rootfs.ext4,ro --disk path=data.img \
//!         --cmdline "console=ttyS0 root=/dev/vda ro" --memory 256 --vcpus 2 \
//!         --serial unix:/tmp/vm.serial --api-socket /tmp/vm.api
//! vmm run --config vm.toml [flags override the file; --disk flags append]
//! ```
//! Exit status: 0 when the guest reset or powered off, or an operator ended it (API shutdown,
//! SIGTERM, SIGINT); 1 when the VM could not be built; 3 on a guest triple fault; 4 when a
//! vCPU stopped on a KVM internal error or an unhandled exit (the registers and instruction
//! bytes are printed on stderr); 5 when an incoming migration failed or was aborted before
//! the hand-over.

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmm::vm::{ExitReason, Incoming, StartMode, Vm};
use vmm_api::config::{BootProtocol, DiskConfig, SerialConfig, VmConfig};

#[derive(Parser)]
#[command(name = "vmm", version, about = "A minimal KVM VMM")]
struct Cli {
    /// Log as JSON lines on stderr instead of text (the exit message too), as migrated and
    /// storaged do with the same flag; migrated passes its own setting to the VMMs it starts.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it ends.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// TOML file with the VM configuration (the fields of `vmm_api::config::VmConfig`, vmm/api/src/config.rs).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The VM's name (default `vm`): the lease instance id of its storaged volumes.
    #[arg(long)]
    name: Option<String>,
    /// Uncompressed ELF vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line (the VMM appends its virtio-mmio devices).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// Guest RAM in this file (mapped shared; created if missing, extended to --memory,
    /// locked while the VM runs) instead of anonymous memory: RAM the guest has not written
    /// holds the file's bytes (with --incoming the file is emptied first: the guest arrives
    /// into zeroed memory). A file on hugetlbfs gives huge pages.
    #[arg(long, value_name = "FILE", conflicts_with = "restore")]
    memory_file: Option<PathBuf>,
    /// vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Boot protocol.
    #[arg(long, value_enum)]
    boot: Option<BootProtocol>,
    /// A disk: `path=FILE[,ro]`, `storaged=HOST:PORT,volume=NAME,host=ID[,instance=ID]
    /// [,lease=standby][,ro]`, or `vhost-user=SOCKET[,queues=N][,ro]` (a vhost-user-blk
    /// backend listening on SOCKET serves the disk). Repeat for more; the first is /dev/vda.
    #[arg(long = "disk")]
    disks: Vec<DiskConfig>,
    /// COM1: `stdio`, `none`, `file:PATH` or `unix:PATH`.
    #[arg(long)]
    serial: Option<SerialConfig>,
    /// Path of the API socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// This host's TLS directory (`storaged pki host`): migration streams run in TLS with its
    /// certificate, and the other VMM must prove its host id with one of the same CA.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Boot nothing: receive a running guest from another VMM on this `HOST:PORT`
    /// (`POST /v1/migration/send` on the source). Give the same VM configuration as the source.
    /// Connections that do not prove to be the source (in TLS: the host of `--incoming-from`)
    /// are refused and the VMM keeps listening.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "restore")]
    incoming: Option<String>,
    /// With TLS: the host id the source's certificate must prove; nobody else gets in.
    #[arg(long, value_name = "HOST", requires = "incoming")]
    incoming_from: Option<String>,
    /// How long to wait for the source before the incoming migration fails.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 600,
        requires = "incoming"
    )]
    accept_timeout: u64,
    /// Boot nothing: load this snapshot (`POST /v1/vm/snapshot`) and run it. Give the same VM
    /// configuration as when it was taken, with its disks in the state they had then. The
    /// guest's memory is mapped from the file: do not write into it while the VM runs.
    #[arg(long, value_name = "FILE")]
    restore: Option<PathBuf>,
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig> {
        let mut c = match &self.config {
            Some(path) => VmConfig::from_toml_file(path)?,
            None => VmConfig {
                name: vmm_api::config::default_name(),
                kernel: self
                    .kernel
                    .clone()
                    .context("--kernel or --config is required")?,
                initramfs: None,
                cmdline: String::new(),
                memory_mib: 256,
                memory_file: None,
                vcpus: 1,
                boot: BootProtocol::Auto,
                disks: Vec::new(),
                serial: SerialConfig::Stdio,
                api_socket: None,
                tls_dir: None,
            },
        };
        if let Some(n) = self.name {
            c.name = n;
        }
        if let Some(k) = self.kernel {
            c.kernel = k;
        }
        if let Some(i) = self.initramfs {
            c.initramfs = Some(i);
        }
        if let Some(s) = self.cmdline {
            c.cmdline = s;
        }
        if let Some(m) = self.memory {
            c.memory_mib = m;
        }
        if let Some(f) = self.memory_file {
            c.memory_file = Some(f);
        }
        if let Some(v) = self.vcpus {
            c.vcpus = v;
        }
        if let Some(b) = self.boot {
            c.boot = b;
        }
        c.disks.extend(self.disks);
        if let Some(s) = self.serial {
            c.serial = s;
        }
        if let Some(a) = self.api_socket {
            c.api_socket = Some(a);
        }
        if let Some(t) = self.tls_dir {
            c.tls_dir = Some(t);
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() {
    vmhop_common::man::generate_if_asked(Cli::command);
    let started = Instant::now();
    let cli = Cli::parse();
    vmhop_common::logging::init(cli.log_json);
    let say = Say { json: cli.log_json };
    let code = match cli.command {
        Command::Run(args) => match run(args, started) {
            Ok(reason) => report(&reason, say),
            Err(e) => {
                say.error(format_args!("{e:#}"));
                1
            }
        },
    };
    std::process::exit(code);
}

/// Where the exit message goes: a plain `vmm: ...` line on stderr, or with `--log-json` a log
/// event like every other line.
#[derive(Clone, Copy)]
struct Say {
    json: bool,
}

impl Say {
    fn info(self, msg: std::fmt::Arguments) {
        if self.json {
            tracing::info!("{msg}");
        } else {
            eprintln!("vmm: {msg}");
        }
    }

    fn error(self, msg: std::fmt::Arguments) {
        if self.json {
            tracing::error!("{msg}");
        } else {
            eprintln!("vmm: {msg}");
        }
    }
}

fn run(args: RunArgs, started: Instant) -> Result<ExitReason> {
    let mode = match (&args.incoming, &args.restore) {
        (Some(addr), _) => StartMode::Incoming(Incoming {
            addr: addr.clone(),
            from: args.incoming_from.clone(),
            accept_timeout: Duration::from_secs(args.accept_timeout),
        }),
        (None, Some(path)) => StartMode::Restore(path.clone()),
        (None, None) => StartMode::Boot,
    };
    let config = args.into_config()?;
    let vm = Vm::build(config, started, mode).context("build the VM")?;
    Ok(vm.run())
}

fn report(reason: &ExitReason, say: Say) -> i32 {
    let code = reason.exit_code();
    match reason {
        ExitReason::GuestReset => say.info(format_args!(
            "the guest reset the machine; exiting ({code})"
        )),
        ExitReason::GuestShutdown => {
            say.info(format_args!("the guest powered off; exiting ({code})"))
        }
        ExitReason::ApiShutdown => {
            say.info(format_args!("shut down through the API; exiting ({code})"))
        }
        ExitReason::Terminated(sig) => say.info(format_args!("stopped by {sig}; exiting ({code})")),
        ExitReason::TripleFault(r) => {
            say.error(format_args!("guest triple fault; exiting ({code})\n{r}"))
        }
        ExitReason::VcpuFailed(r) => say.error(format_args!("vCPU failed; exiting ({code})\n{r}")),
        ExitReason::IncomingFailed(e) => {
            let why = vmhop_common::error::chain(e);
            say.error(format_args!(
                "incoming migration failed: {why}; exiting ({code})"
            ))
        }
        ExitReason::IncomingAborted => {
            say.info(format_args!("incoming migration aborted; exiting ({code})"))
        }
    }
    code
}
