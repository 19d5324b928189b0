//! `migrated`: the per-host live migration agent.
//!
//! ```text
//! migrated --host-id host-a --state-dir /var/lib/migrated --listen 10.0.0.1:7070 \
//!          --socket /run/migrated/migrated.sock --storaged-api 10.0.0.9:10810 \
//!          --storaged-nbd 10.0.0.9:10809 --vmm-binary /usr/local/bin/vmm --peer host-b=10.0.0.2:7070 \
//!          --token-file /etc/migrated/token
//! migrated --config /etc/migrated/migrated.toml [flags override the file]
//! ```
//! SIGTERM or SIGINT stops the agent; the guests keep running and are re-adopted by the next
//! start.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use migrated::agent::Agent;
use migrated::config::{parse_peer, AgentConfig, AgentConfigFile};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use vmhop_common::tls_listener::{Peer, TlsListener};

#[derive(Parser)]
#[command(
    name = "migrated",
    version,
    about = "Per-host live migration agent: runs the host's VMMs and coordinates migrations"
)]
struct Cli {
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This host's id (its name at storaged and among peers).
    #[arg(long)]
    host_id: Option<String>,
    /// Durable state (state.redb) and instance work directories.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// REST listen address for peers [default: 127.0.0.1:7070]; port 0 picks one.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Unix socket for local tools [default: /run/migrated/migrated.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// storaged REST API address (cluster mode: the nodes' addresses, comma-separated; a call
    /// moves to the next node when one cannot be reached) [default: 127.0.0.1:10810].
    #[arg(long)]
    storaged_api: Option<String>,
    /// storaged's NBD address as this host reaches it, where the VMMs open the guests'
    /// volumes (cluster mode: the nodes' addresses, comma-separated) [default:
    /// 127.0.0.1:10809, only while --storaged-api is on this host too; with a remote
    /// --storaged-api it must be given].
    #[arg(long)]
    storaged_nbd: Option<String>,
    /// The VMM binary [default: /usr/local/bin/vmm].
    #[arg(long)]
    vmm_binary: Option<PathBuf>,
    /// The vhost-user disk backend binary, for disks with `backend = "vhost-user"`
    /// [default: vhost-user-blk beside the VMM binary].
    #[arg(long)]
    vhost_user_binary: Option<PathBuf>,
    /// IP the incoming VMMs listen on for migration streams [default: the listen IP].
    #[arg(long)]
    migration_ip: Option<std::net::IpAddr>,
    /// Milliseconds of silence after which a peer counts as lost during a migration [5000].
    #[arg(long)]
    peer_timeout_ms: Option<u64>,
    /// A peer: `ID=HOST:PORT` (repeat).
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(String, String)>,
    /// File with the cluster's shared secret: the REST API takes only requests carrying it,
    /// and requests to peers carry it. Without one the REST API is open to all who reach it.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// File with the token of storaged's REST API, when it has one.
    #[arg(long)]
    storaged_token_file: Option<PathBuf>,
    /// This host's TLS directory (`storaged pki host`; its certificate names --host-id): the
    /// VMMs use it for storaged's NBD and the migration streams, and the REST API on --listen
    /// and the calls to peers run in mutual TLS with it.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// The host id in storaged's certificate [default: the IP address of --storaged-nbd].
    #[arg(long)]
    storaged_name: Option<String>,
    /// Write `{"listen": ADDR, "socket": PATH, "pid": N}` here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Log as JSON lines instead of text; the VMMs and vhost-user disk backends this agent
    /// starts log as JSON lines too (in their logs in each instance's directory).
    #[arg(long)]
    log_json: bool,
}

fn main() -> Result<()> {
    vmhop_common::man::generate_if_asked(Cli::command);
    let cli = Cli::parse();
    vmhop_common::logging::init(cli.log_json);
    let file = match &cli.config {
        Some(p) => AgentConfigFile::load(p)?,
        None => AgentConfigFile::default(),
    };
    let flags = AgentConfigFile {
        host_id: cli.host_id,
        state_dir: cli.state_dir,
        listen: cli.listen,
        socket: cli.socket,
        storaged_api: cli.storaged_api,
        storaged_nbd: cli.storaged_nbd,
        vmm_binary: cli.vmm_binary,
        vhost_user_binary: cli.vhost_user_binary,
        migration_ip: cli.migration_ip,
        peer_timeout_ms: cli.peer_timeout_ms,
        peers: cli.peers.into_iter().collect::<BTreeMap<_, _>>(),
        ready_file: cli.ready_file,
        token_file: cli.token_file,
        storaged_token_file: cli.storaged_token_file,
        tls_dir: cli.tls_dir,
        storaged_name: cli.storaged_name,
    };
    let mut cfg = file.merge(flags)?;
    cfg.log_json = cli.log_json;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(serve(cfg))
}

async fn serve(mut cfg: AgentConfig) -> Result<()> {
    let tcp = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    cfg.listen = tcp.local_addr()?;
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&cfg.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", cfg.socket.display())),
    }
    let unix = tokio::net::UnixListener::bind(&cfg.socket)
        .with_context(|| format!("binding {}", cfg.socket.display()))?;
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o660))?;

    let agent = Agent::open(cfg.clone()).context("opening the state directory")?;
    migrated::recovery::recover(&agent)
        .await
        .context("recovering the recorded instances")?;
    tracing::info!(target: "migrated::state", event = "started", host = %cfg.host_id,
        listen = %cfg.listen, socket = %cfg.socket.display(),
        state_dir = %cfg.state_dir.display(), peers = ?cfg.peers, "migrated serving");

    let (sd_tx, sd_rx) = tokio::sync::watch::channel(false);
    if cfg.tls.is_none() && !cfg.listen.ip().is_loopback() {
        tracing::warn!(listen = %cfg.listen,
            "no tls_dir: the REST API and the calls to peers are plaintext, and peers are not \
             authenticated by certificate");
    }
    if cfg.token.is_none() && !cfg.listen.ip().is_loopback() {
        tracing::warn!(listen = %cfg.listen,
            "no token_file: the REST API takes requests from anyone who can reach this address");
    }
    let router = migrated::server::router(agent.clone());
    let mut rx1 = sd_rx.clone();
    let tcp_router = migrated::server::tcp_router(agent.clone());
    let stopped = async move {
        let _ = rx1.wait_for(|s| *s).await;
    };
    let tcp_task = match &cfg.tls {
        None => tokio::spawn(async move {
            axum::serve(tcp, tcp_router)
                .with_graceful_shutdown(stopped)
                .await
        }),
        Some(tls) => {
            // Mutual TLS: every caller proves its host id (the handlers see it).
            let tls = TlsListener::new(tcp, tls.server.clone())?;
            let service = tcp_router.into_make_service_with_connect_info::<Peer>();
            tokio::spawn(async move {
                axum::serve(tls, service)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
    };
    let mut rx2 = sd_rx.clone();
    let unix_task = tokio::spawn(async move {
        axum::serve(unix, router)
            .with_graceful_shutdown(async move {
                let _ = rx2.wait_for(|s| *s).await;
            })
            .await
    });
    if let Some(path) = &cfg.ready_file {
        let tmp = path.with_extension("tmp");
        let body = serde_json::json!({
            "listen": cfg.listen.to_string(),
            "socket": cfg.socket,
            "pid": std::process::id(),
        });
        std::fs::write(&tmp, body.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    // Harmless without systemd (no NOTIFY_SOCKET).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping (guests keep running)"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping (guests keep running)"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    sd_tx.send_replace(true);
    // In-flight requests get a bounded time; migrations in progress resume after the restart.
    let grace = std::time::Duration::from_secs(10);
    let _ = tokio::time::timeout(grace, async {
        let _ = tcp_task.await;
        let _ = unix_task.await;
    })
    .await;
    let _ = std::fs::remove_file(&cfg.socket);
    tracing::info!(target: "migrated::state", event = "stopped", host = %cfg.host_id,
        "migrated stopped");
    Ok(())
}
