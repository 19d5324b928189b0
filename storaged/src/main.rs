//! `storaged`: the block storage daemon and its command-line client.

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use storaged::config::{ServeConfig, ServeConfigFile};
use storaged::registry::Registry;
use storaged::server::{NbdTls, ServerConfig};
use storaged_client::api::{
    FlipMode, FlipRequest, GroupFlipRequest, GroupRevokeRequest, GroupRollbackRequest, LeaseState,
    RevokeRequest, RollbackRequest, VolumeEpoch,
};
use vmhop_common::tls::HostTls;
use vmhop_common::token::Token;

mod cli;
use cli::volume::{volume_cmd, VolumeCmd};
use cli::{print_json, ApiArgs};

#[derive(Parser)]
#[command(
    name = "storaged",
    version,
    about = "Block volumes over NBD with per-host leases (primary / standby / deactivated) \
             and the flip that hands a volume from one host to another."
)]
struct Cli {
    /// `volume` and `lease`: print JSON (the API's answers) instead of tables, and errors as
    /// `{"error": "..."}`.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: NBD server and REST control API.
    Serve(Box<ServeArgs>),
    /// Manage volumes through the REST API.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Inspect and change leases through the REST API.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Make the cluster's CA and its hosts' certificates (identities for TLS).
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Make a new cluster CA: DIR/ca-cert.pem and DIR/ca-key.pem (mode 0600). Keep the key off
    /// the hosts; it signs their certificates and nothing else.
    Ca {
        /// Directory for the CA (created; an existing CA is never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// The CA's name (its certificate's common name).
        #[arg(long, default_value = "vmhop cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a host's certificate and write its TLS directory (ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem: the layout of QEMU's tls-creds-x509 and
    /// libnbd's tls-certificates). The certificate's identity is HOST_ID: every daemon reads a
    /// peer's host id from its certificate and nowhere else.
    Host {
        /// The host id (a DNS label: lower-case letters, digits, '-').
        host_id: String,
        /// The CA directory (from `storaged pki ca`).
        #[arg(long)]
        ca: PathBuf,
        /// Where to write the host's TLS directory (created).
        #[arg(long)]
        out: PathBuf,
        /// An IP address the host is reached at (repeatable; standard NBD clients check it).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// A further DNS name the host is reached at (repeatable).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

fn pki_cmd(cmd: PkiCmd) -> Result<()> {
    use vmhop_common::pki::{create_ca, issue_host, HostCertRequest};
    match cmd {
        PkiCmd::Ca { dir, name, days } => {
            create_ca(&dir, &name, days)?;
            println!("CA {name:?} in {}", dir.display());
        }
        PkiCmd::Host {
            host_id,
            ca,
            out,
            ips,
            dns_names,
            days,
        } => {
            let req = HostCertRequest {
                host_id,
                ips,
                dns_names,
                days,
            };
            issue_host(&ca, &req, &out)?;
            println!("host {} in {}", req.host_id, out.display());
        }
    }
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for volume files (volumes/NAME.img) and metadata (meta.redb).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// NBD listen address [default: 127.0.0.1:10809]; port 0 picks a free port.
    #[arg(long)]
    nbd_listen: Option<std::net::SocketAddr>,
    /// REST API listen address [default: 127.0.0.1:10810]; port 0 picks a free port.
    #[arg(long)]
    api_listen: Option<std::net::SocketAddr>,
    /// Write {"nbd": ADDR, "api": ADDR} here once both listeners are bound.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Seconds open connections get to finish after SIGTERM [default: 30].
    #[arg(long)]
    shutdown_grace_secs: Option<u64>,
    /// Seconds a flip waits for the old primary's admitted requests [default: 30].
    #[arg(long)]
    drain_limit_secs: Option<u64>,
    /// The volume an NBD client gets when it names no export (the empty export name).
    #[arg(long, value_name = "VOLUME")]
    default_export: Option<String>,
    /// Threads that serve NBD connections, each connection on one of them (the one with the
    /// fewest) [default: one per CPU]. 0 serves them on the threads of the REST API.
    #[arg(long, value_name = "N")]
    nbd_threads: Option<usize>,
    #[command(flatten)]
    limits: LimitArgs,
    /// File with the cluster's token: the REST API refuses requests that do not carry it
    /// (401). Without one, anyone who reaches the API address may create volumes and flip
    /// leases.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// This host's TLS directory (ca-cert.pem, server-cert.pem, server-key.pem; see `storaged
    /// pki host`): NBD clients then upgrade with NBD_OPT_STARTTLS and prove their host id
    /// with a client certificate of the cluster's CA; a lease option naming another host is
    /// refused.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// With --tls-dir: refuse plaintext from loopback clients too (by default they may skip
    /// TLS, for development on one machine).
    #[arg(long)]
    no_plaintext_loopback: bool,
    /// Cluster mode: etcd endpoints, comma-separated (http://host:port). Volumes created with
    /// --replicas are then kept on several nodes; without it storaged is a single node.
    #[arg(long, value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Cluster mode: this node's id (unique in the cluster).
    #[arg(long)]
    node_id: Option<String>,
    /// Cluster mode: replication listen address [default: 127.0.0.1:10811].
    #[arg(long)]
    repl_listen: Option<std::net::SocketAddr>,
    /// Cluster mode: TTL of this node's etcd lease in seconds; a master cut off from etcd stops
    /// acknowledging writes within it [default: 5].
    #[arg(long)]
    etcd_lease_ttl_secs: Option<u64>,
    /// Cluster mode: ms a master waits for a slave's ack before dropping it from the in-sync
    /// set [default: 5000].
    #[arg(long)]
    replication_timeout_ms: Option<u64>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

/// What NBD clients may hold; see `storaged::server::Limits`.
#[derive(Args)]
#[command(next_help_heading = "Limits")]
struct LimitArgs {
    /// Open NBD connections in all; more are closed at once [default: 1024].
    #[arg(long)]
    max_connections: Option<usize>,
    /// NBD connections per volume; more are refused at NBD_OPT_GO [default: 128].
    #[arg(long)]
    max_connections_per_volume: Option<usize>,
    /// Seconds a client may take from connect to transmission [default: 10].
    #[arg(long)]
    handshake_timeout_secs: Option<u64>,
    /// Seconds a connection without a lease may send nothing, with nothing in flight, before
    /// it is closed [default: 300].
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Seconds a client may leave its replies unread before it is disconnected [default: 60].
    #[arg(long)]
    reply_timeout_secs: Option<u64>,
    /// Bytes of requests in flight per connection; at least 32 MiB + 256 KiB
    /// [default: 67108864].
    #[arg(long)]
    inflight_per_connection: Option<u32>,
    /// Bytes of requests in flight over all connections [default: 1073741824].
    #[arg(long)]
    inflight_total: Option<u64>,
    /// Seconds a standby lease lives after its host's last connection closed [default: 600].
    #[arg(long)]
    standby_expiry_secs: Option<u64>,
    /// Standby leases per volume; a new standby evicts the one disconnected longest
    /// [default: 64].
    #[arg(long)]
    max_standby: Option<usize>,
}

#[derive(Subcommand)]
enum LeaseCmd {
    /// List the leases of a volume.
    List {
        /// Volume name.
        volume: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Promote a standby to primary (deactivating the old primary); prints the step timings.
    Flip {
        /// Volume name.
        volume: String,
        /// Host to promote (default: the only standby).
        #[arg(long)]
        to: Option<String>,
        /// Arm the flip instead: it completes on the standby's first I/O or after the timeout.
        #[arg(long)]
        armed: bool,
        /// Deadline of an armed flip in ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// The migration an armed flip belongs to (only it may cancel the flip).
        #[arg(long)]
        migration: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel the flip armed on a volume (nothing armed is no error).
    Cancel {
        /// Volume name.
        volume: String,
        /// Only if this migration armed it.
        #[arg(long)]
        migration: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Flip a set of volumes (a guest's) as one decision: promote HOST on every one, only if
    /// FROM is primary on each at the epoch named; every volume flips or none does.
    GroupFlip {
        /// The volumes, each as VOLUME@EPOCH (the epoch at which FROM is primary).
        #[arg(required = true, value_parser = parse_volume_epoch)]
        volumes: Vec<VolumeEpoch>,
        /// The host that must be primary on every volume.
        #[arg(long)]
        from: String,
        /// The standby host to promote.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// End a host's standby leases on a set of volumes as one decision, only if it is primary on
    /// none of them; every volume's epoch moves, so no flip planned before can promote it.
    GroupRevoke {
        /// Volume names.
        #[arg(required = true)]
        volumes: Vec<String>,
        /// Host id.
        #[arg(long)]
        host: String,
        /// Only if this host is primary on every volume.
        #[arg(long)]
        primary: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Undo the flips of a set of volumes as one decision: on each, the flip that made PRIMARY
    /// the primary at the epoch named; refused on all if any volume moved on.
    GroupRollback {
        /// The volumes, each as VOLUME@EPOCH (the epoch its flip produced).
        #[arg(required = true, value_parser = parse_volume_epoch)]
        volumes: Vec<VolumeEpoch>,
        /// The host the flips made primary.
        #[arg(long)]
        primary: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Terminate a host's lease (primary, standby or deactivated) and close its connections.
    Revoke {
        /// Volume name.
        volume: String,
        /// Host id.
        #[arg(long)]
        host: String,
        /// Only if the host's lease is in this state; otherwise refused and nothing changes.
        #[arg(long, value_name = "STATE")]
        only_if: Option<LeaseState>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Undo the flip that made PRIMARY the primary at EPOCH (`lease list` shows both): the
    /// lease table from before it comes back. Refused if the volume moved on since.
    Rollback {
        /// Volume name.
        volume: String,
        /// The epoch the flip produced.
        #[arg(long)]
        epoch: u64,
        /// The host the flip made primary.
        #[arg(long)]
        primary: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `VOLUME@EPOCH`.
fn parse_volume_epoch(s: &str) -> Result<VolumeEpoch> {
    let (volume, epoch) = s
        .rsplit_once('@')
        .with_context(|| format!("{s:?}: expected VOLUME@EPOCH"))?;
    let epoch = epoch.parse().with_context(|| format!("epoch in {s:?}"))?;
    Ok(VolumeEpoch {
        volume: volume.to_string(),
        epoch,
    })
}

async fn lease_cmd(cmd: LeaseCmd, json: bool) -> Result<()> {
    match cmd {
        LeaseCmd::List { volume, api } => {
            let v = api.client()?.leases(&volume).await?;
            if json {
                return print_json(&v);
            }
            println!("volume {} epoch {}", v.volume, v.epoch);
            println!("{:<24} {:<24} {:<12} CONNS", "HOST", "INSTANCE", "STATE");
            for l in &v.leases {
                let state = serde_json::to_value(l.state)?;
                println!(
                    "{:<24} {:<24} {:<12} {}",
                    l.host,
                    l.instance,
                    state.as_str().unwrap_or("?"),
                    l.connections
                );
            }
            println!(
                "anonymous connections: {}; flip pending: {}; rollback possible: {}",
                v.anonymous_connections, v.flip_pending, v.can_roll_back
            );
            if let Some(a) = &v.armed {
                println!(
                    "armed flip: to {} at epoch {}, migration {}",
                    a.to.as_deref().unwrap_or("the only standby"),
                    a.epoch,
                    a.migration.as_deref().unwrap_or("none")
                );
            }
            Ok(())
        }
        LeaseCmd::Flip {
            volume,
            to,
            armed,
            timeout_ms,
            migration,
            api,
        } => {
            let req = FlipRequest {
                to,
                mode: if armed {
                    FlipMode::Armed
                } else {
                    FlipMode::Now
                },
                timeout_ms,
                migration,
            };
            let v = api.client()?.flip(&volume, &req).await?;
            print_json(&v)
        }
        LeaseCmd::Revoke {
            volume,
            host,
            only_if,
            api,
        } => {
            let v = api
                .client()?
                .revoke(&volume, &RevokeRequest { host, only_if })
                .await?;
            print_json(&v)
        }
        LeaseCmd::Rollback {
            volume,
            epoch,
            primary,
            api,
        } => {
            let req = RollbackRequest { epoch, primary };
            print_json(&api.client()?.rollback(&volume, &req).await?)
        }
        LeaseCmd::Cancel {
            volume,
            migration,
            api,
        } => print_json(
            &api.client()?
                .cancel_flip(&volume, migration.as_deref())
                .await?,
        ),
        LeaseCmd::GroupFlip {
            volumes,
            from,
            to,
            api,
        } => {
            let req = GroupFlipRequest {
                from,
                to,
                volumes,
                migration: None,
            };
            print_json(&api.client()?.flip_group(&req).await?)
        }
        LeaseCmd::GroupRevoke {
            volumes,
            host,
            primary,
            api,
        } => {
            let req = GroupRevokeRequest {
                host,
                volumes,
                primary,
                migration: None,
            };
            print_json(&api.client()?.revoke_group(&req).await?)
        }
        LeaseCmd::GroupRollback {
            volumes,
            primary,
            api,
        } => {
            let req = GroupRollbackRequest {
                primary,
                volumes,
                migration: None,
            };
            print_json(&api.client()?.rollback_group(&req).await?)
        }
    }
}

async fn serve(cfg: ServeConfig, lanes: storaged::server::LaneSpawner) -> Result<()> {
    // Before anyone can learn that we are ready: a SIGTERM right after READY=1 must find the
    // handler in place, not the default action.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut reg = Registry::open(&cfg.data_dir)
        .with_context(|| format!("opening data dir {}", cfg.data_dir.display()))?;
    reg.drain_limit = Duration::from_secs(cfg.drain_limit_secs);
    reg.standby = cfg.standby;
    let reg = Arc::new(reg);
    let host_tls = match &cfg.tls_dir {
        Some(dir) => Some(
            HostTls::load(dir)
                .with_context(|| format!("reading the TLS directory {}", dir.display()))?,
        ),
        None => None,
    };
    let nbd_tls = match (&cfg.tls_dir, &host_tls) {
        (Some(dir), Some(host)) => {
            tracing::info!(tls_dir = %dir.display(), host = %host.host_id(),
                plaintext_loopback = cfg.plaintext_loopback,
                "NBD clients prove their host with a certificate of the cluster's CA");
            if cfg.plaintext_loopback {
                tracing::warn!(
                    "loopback clients may use plaintext and name any host: \
                    for development on one machine (plaintext_loopback = false in production)"
                );
            }
            Some(NbdTls::new(host, cfg.plaintext_loopback)?)
        }
        _ => {
            if !cfg.nbd_listen.ip().is_loopback() {
                tracing::warn!(nbd = %cfg.nbd_listen, "no tls_dir: NBD clients are not \
                    authenticated and may claim any host's lease (set tls_dir)");
            }
            None
        }
    };
    let nbd = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .with_context(|| format!("binding NBD {}", cfg.nbd_listen))?;
    let api = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("binding API {}", cfg.api_listen))?;
    let (nbd_addr, api_addr) = (nbd.local_addr()?, api.local_addr()?);
    let mut ready = serde_json::json!({"nbd": nbd_addr.to_string(), "api": api_addr.to_string()});
    let cluster = match &cfg.cluster {
        None => None,
        Some(c) => {
            let mut c = c.clone();
            let repl_tls = match &host_tls {
                None => None,
                Some(host) => {
                    // The node id is the host id the certificate proves: peers check it.
                    let id = &mut c.cluster.node_id;
                    if id.is_empty() {
                        *id = host.host_id().to_string();
                    } else if id != host.host_id() {
                        anyhow::bail!(
                            "node id {id} is not the host id of the TLS certificate ({}): \
                            with tls_dir, leave node_id out or set it to the host id",
                            host.host_id()
                        );
                    }
                    Some(storaged::cluster::ReplTls::new(host)?)
                }
            };
            let repl = tokio::net::TcpListener::bind(c.repl_listen)
                .await
                .with_context(|| format!("binding replication {}", c.repl_listen))?;
            let record = storaged::cluster::NodeRecord {
                id: c.cluster.node_id.clone(),
                nbd: nbd_addr,
                api: api_addr,
                repl: repl.local_addr()?,
            };
            ready["repl"] = record.repl.to_string().into();
            tracing::info!(node = %record.id, etcd = ?c.cluster.endpoints, repl = %record.repl,
                repl_tls = repl_tls.is_some(), "cluster mode");
            let cl = storaged::cluster::start(c.cluster, reg.clone(), record, repl, repl_tls)
                .await
                .context("joining the cluster (etcd)")?;
            Some(cl)
        }
    };
    tracing::info!(nbd = %nbd_addr, api = %api_addr, data_dir = %cfg.data_dir.display(),
        volumes = reg.list().len(), nbd_threads = cfg.nbd_threads, "storaged listening");
    if let Some(path) = &cfg.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    // Harmless without systemd (no NOTIFY_SOCKET).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let (sd_tx, sd_rx) = tokio::sync::watch::channel(false);
    let grace = Duration::from_secs(cfg.shutdown_grace_secs);
    if let Some(name) = &cfg.default_export {
        if reg.get(name).is_err() {
            tracing::warn!(volume = %name, "the default export names no volume (yet)");
        }
    }
    let server = ServerConfig {
        tls: nbd_tls,
        grace,
        default_export: cfg.default_export.clone(),
        limits: cfg.limits.clone(),
        lanes,
    };
    let nbd_task = tokio::spawn(storaged::server::serve(
        nbd,
        reg.clone(),
        server,
        sd_rx.clone(),
    ));
    tokio::spawn(expire_standbys(reg.clone(), sd_rx.clone()));
    let mut api_sd = sd_rx.clone();
    let token = cfg.api_token_file.as_deref().map(Token::load).transpose()?;
    if token.is_none() && !api_addr.ip().is_loopback() {
        tracing::warn!(api = %api_addr,
            "no api_token_file: anyone who reaches the API may create volumes and flip leases");
    }
    let router = match cluster {
        Some(c) => storaged::api::router(reg.clone()).merge(storaged::cluster::api::router(c)),
        None => storaged::api::router(reg.clone()),
    };
    let router = match token {
        Some(t) => router.layer(axum::middleware::from_fn_with_state(
            t,
            vmhop_common::token::require,
        )),
        None => router,
    };
    let api_task = tokio::spawn(async move {
        axum::serve(api, router)
            .with_graceful_shutdown(async move {
                let _ = api_sd.wait_for(|s| *s).await;
            })
            .await
    });

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    sd_tx.send_replace(true);
    nbd_task.await?;
    api_task.await??;
    for v in reg.list() {
        let f = v.file.clone();
        tokio::task::spawn_blocking(move || f.flush())
            .await?
            .with_context(|| format!("fsync of volume {}", v.config.name))?;
    }
    tracing::info!("storaged stopped cleanly");
    Ok(())
}

/// Removes standby leases whose hosts went away, now and then, until shutdown.
async fn expire_standbys(reg: Arc<Registry>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let every = (reg.standby.expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = storaged::lease::expiry::expire(&reg).await {
            tracing::warn!(error = %e, "expiring standby leases failed");
        }
    }
}

/// With `--json`, a failed command prints its error as JSON on stdout (and still fails).
fn json_errors(json: bool, r: Result<()>) -> Result<()> {
    if let (true, Err(e)) = (json, &r) {
        let error = e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        println!("{}", serde_json::json!({ "error": error }));
    }
    r
}

fn main() -> Result<()> {
    vmhop_common::man::generate_if_asked(Cli::command);
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Serve(a) => {
            let a = *a;
            vmhop_common::logging::init(a.log_json);
            let file = match &a.config {
                Some(p) => ServeConfigFile::load(p)?,
                None => ServeConfigFile::default(),
            };
            let flags = ServeConfigFile {
                data_dir: a.data_dir,
                nbd_listen: a.nbd_listen,
                api_listen: a.api_listen,
                ready_file: a.ready_file,
                shutdown_grace_secs: a.shutdown_grace_secs,
                drain_limit_secs: a.drain_limit_secs,
                default_export: a.default_export,
                nbd_threads: a.nbd_threads,
                max_connections: a.limits.max_connections,
                max_connections_per_volume: a.limits.max_connections_per_volume,
                handshake_timeout_secs: a.limits.handshake_timeout_secs,
                idle_timeout_secs: a.limits.idle_timeout_secs,
                reply_timeout_secs: a.limits.reply_timeout_secs,
                inflight_per_connection: a.limits.inflight_per_connection,
                inflight_total: a.limits.inflight_total,
                standby_expiry_secs: a.limits.standby_expiry_secs,
                max_standby: a.limits.max_standby,
                api_token_file: a.api_token_file,
                tls_dir: a.tls_dir,
                plaintext_loopback: a.no_plaintext_loopback.then_some(false),
                etcd: a.etcd,
                node_id: a.node_id,
                repl_listen: a.repl_listen,
                etcd_lease_ttl_secs: a.etcd_lease_ttl_secs,
                replication_timeout_ms: a.replication_timeout_ms,
            };
            let cfg = file.merge(flags)?;
            let lanes = storaged::server::Lanes::start(cfg.nbd_threads)
                .context("starting the NBD threads")?;
            rt.block_on(serve(cfg, lanes.spawner()))
        }
        Cmd::Volume(c) => json_errors(cli.json, rt.block_on(volume_cmd(c, cli.json))),
        Cmd::Lease(c) => json_errors(cli.json, rt.block_on(lease_cmd(c, cli.json))),
        Cmd::Pki(c) => pki_cmd(c),
    }
}
