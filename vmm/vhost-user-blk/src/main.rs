//! `vhost-user-blk`: serves one disk to a vhost-user frontend (our VMM's
//! `--disk vhost-user=SOCKET`, or QEMU's `-device vhost-user-blk`) on a Unix socket.
//!
//! ```text
//! vhost-user-blk --socket /run/vmhop/vm1-data.sock \
//!     --storaged 10.0.0.9:10809 --volume data1 --host-id host-a --instance-id vm1 \
//!     [--tls-dir DIR [--server-name NAME]] [--lease primary|standby] [--read-only] \
//!     [--queues N] [--id SERIAL]
//! vhost-user-blk --socket /tmp/disk.sock --file disk.img [--read-only]
//! ```
//! Exit status: 0 on SIGTERM or SIGINT (the disk is flushed and the socket removed first);
//! 1 when the disk cannot be opened (storaged refused the lease, the file is locked...) or
//! the socket cannot be served.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use std::path::PathBuf;
use std::time::Duration;
use vhost_user_blk::MAX_QUEUES;
use vmm_api::config::{LeaseMode, StoragedDiskConfig};
use vmm_disk::{Backend, Disk, FileBackend, StoragedBackend};

/// How long the flush at exit may take.
const EXIT_FLUSH: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "vhost-user-blk",
    version,
    about = "Serve one disk (a storaged volume or a local file) to a vhost-user frontend",
    long_about = "Serve one disk (a storaged volume or a local file) to a vhost-user frontend \
        (vmm run --disk vhost-user=SOCKET, or QEMU's -device vhost-user-blk) on a Unix socket, \
        one frontend connection after another, until SIGTERM or SIGINT.\n\n\
        A storaged volume is opened with a lease exactly as the VMM opens one itself: as \
        primary, or as standby on a migration's destination (promoted when storaged flips the \
        lease); a lost connection is re-established with the same lease, and a host that was \
        deactivated on the volume gets I/O errors from then on.\n\n\
        Per disk, a host agent spawns one process: --socket, then --storaged, --volume, \
        --host-id (or --tls-dir), --instance-id and --lease (or --file), and gives the VMM \
        the same socket."
)]
struct Cli {
    /// Unix socket to listen on (created; a file already there is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Serve a raw image file (locked against a second writer).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "storaged",
        required_unless_present = "storaged"
    )]
    file: Option<PathBuf>,
    /// Serve a storaged volume: the NBD address of storaged (cluster mode: the addresses of
    /// the volume's nodes, comma-separated, tried in order).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]", requires_all = ["volume", "instance_id"])]
    storaged: Option<String>,
    /// The volume (export) name.
    #[arg(long, value_name = "NAME")]
    volume: Option<String>,
    /// This host's id: the lease holder (with --tls-dir, the certificate's host id: given, it
    /// must be the same; absent, it is taken from the certificate).
    #[arg(long, value_name = "ID", required_unless_present_any = ["file", "tls_dir"])]
    host_id: Option<String>,
    /// This host's TLS directory (`storaged pki host`): the NBD connection runs over TLS and
    /// proves the host id with the certificate.
    #[arg(long, value_name = "DIR", requires = "storaged")]
    tls_dir: Option<PathBuf>,
    /// The name storaged's certificate must carry [default: the host of --storaged].
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    server_name: Option<String>,
    /// The VM's instance id (the VMM uses the VM's name).
    #[arg(long, value_name = "ID")]
    instance_id: Option<String>,
    /// The lease to ask for: `primary` for a VM that runs, `standby` on a migration's
    /// destination.
    #[arg(long, value_name = "MODE", default_value = "primary")]
    lease: LeaseMode,
    /// How long guest I/O is held, and retried, while storaged cannot be reached (a restart)
    /// before a request fails (default 60).
    #[arg(long, value_name = "SECS")]
    io_hold_secs: Option<u64>,
    /// Offer the disk read-only and refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Request queues offered (the frontend uses as many as it wants of them).
    #[arg(long, value_name = "N", default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    queues: u16,
    /// What the guest reads as the disk's serial (GET_ID, at most 20 bytes).
    #[arg(long, value_name = "SERIAL", default_value = "vmhop-vhost-user")]
    id: String,
    /// Log JSON lines instead of text (the same flag as the other daemons; `--json-logs` is
    /// still taken).
    #[arg(long, alias = "json-logs")]
    log_json: bool,
}

fn main() {
    vmhop_common::man::generate_if_asked(Cli::command);
    let cli = Cli::parse();
    vmhop_common::logging::init(cli.log_json);
    let json = cli.log_json;
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let why = vmhop_common::error::chain(e.as_ref());
            if json {
                tracing::error!("{why}; exiting (1)");
            } else {
                eprintln!("vhost-user-blk: {why}");
            }
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("blk-io")
        .enable_all()
        .build()
        .context("start the I/O runtime")?;
    let backend = match (&cli.file, &cli.storaged) {
        (Some(path), _) => Backend::File(FileBackend::open(path, cli.read_only)?),
        (None, Some(address)) => {
            let mut nodes = address.split(',').map(str::trim).map(String::from);
            let cfg = StoragedDiskConfig {
                address: nodes.next().unwrap_or_default(),
                addresses: nodes.collect(),
                volume: cli.volume.clone().context("--volume")?,
                host_id: cli.host_id.clone(),
                instance_id: cli.instance_id.clone(),
                lease: cli.lease,
                io_hold_secs: cli.io_hold_secs,
                tls_dir: cli.tls_dir.clone(),
                server_name: cli.server_name.clone(),
            };
            let instance = cli.instance_id.clone().unwrap_or_default();
            Backend::Storaged(
                runtime
                    .block_on(StoragedBackend::connect(&cfg, &instance))
                    .with_context(|| format!("storaged://{address}/{}", cfg.volume))?,
            )
        }
        (None, None) => anyhow::bail!("--file or --storaged is required"),
    };
    let disk = Disk::new(backend, cli.read_only, &cli.id);

    let socket = cli.socket.clone();
    let on_signal = disk.clone();
    runtime.spawn(async move {
        let Ok(name) = vmhop_common::signal::stop_requested().await else {
            return;
        };
        tracing::info!(signal = name, "stopping: flushing the disk");
        match tokio::time::timeout(EXIT_FLUSH, on_signal.backend().flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flush at exit failed"),
            Err(_) => tracing::warn!(timeout = ?EXIT_FLUSH, "flush at exit did not finish"),
        }
        let _ = std::fs::remove_file(&socket);
        std::process::exit(0);
    });

    match vhost_user_blk::serve(&cli.socket, disk, cli.queues, runtime.handle().clone()) {
        Ok(never) => match never {},
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}
