//! The NBD server: accepts connections, runs the handshake, then serves transmission, within
//! the [`Limits`] of its [`ServerConfig`].

mod buffers;
mod direct;
mod handshake;
mod lanes;
mod limits;
mod lookahead;
mod tls;
mod transmission;

pub use handshake::HandshakeError;
pub use lanes::{LaneSpawner, Lanes};
pub use limits::{Budget, Limits, Permit, REQUEST_OVERHEAD};
use storaged_client::stream::NbdStream;
pub use tls::NbdTls;

use crate::metrics::ConnRefusal;
use crate::registry::Registry;
use buffers::Buffers;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How the NBD server runs.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// With TLS, clients upgrade with `NBD_OPT_STARTTLS` and prove their host with a
    /// certificate (see [`NbdTls`]).
    pub tls: Option<NbdTls>,
    /// How long open connections get to finish their admitted requests after a shutdown.
    pub grace: Duration,
    /// The volume a client gets when it names no export (the empty name).
    pub default_export: Option<String>,
    /// What clients may hold.
    pub limits: Limits,
    /// Where connections run (see [`Lanes`]); by default on the caller's runtime.
    pub lanes: LaneSpawner,
}

/// Accepts NBD connections until `shutdown` turns true, then waits for the open connections to
/// finish their admitted requests (at most `grace`), with the default limits.
pub async fn run(
    listener: TcpListener,
    reg: Arc<Registry>,
    tls: Option<NbdTls>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let cfg = ServerConfig {
        tls,
        grace,
        ..ServerConfig::default()
    };
    serve(listener, reg, cfg, shutdown).await
}

/// Accepts NBD connections until `shutdown` turns true, then waits for the open connections to
/// finish their admitted requests (at most `cfg.grace`). A connection beyond
/// [`Limits::max_connections`] is closed at once.
pub async fn serve(
    listener: TcpListener,
    reg: Arc<Registry>,
    cfg: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = Arc::new(cfg);
    let budget = Budget::new(&cfg.limits);
    let buffers = Buffers::default();
    let mut conns = JoinSet::new();
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Finished tasks are reaped here too, so that the count is current.
        while conns.try_join_next().is_some() {}
        if conns.len() >= cfg.limits.max_connections {
            reg.metrics
                .refused_connection(crate::metrics::ConnRefusal::ConnectionLimit);
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, open = conns.len(), refused,
                    "connection limit reached: closing new connections");
            }
            continue;
        }
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(%peer, error = %e, "TCP_NODELAY");
        }
        let conn = Connection {
            reg: reg.clone(),
            cfg: cfg.clone(),
            budget: budget.clone(),
            buffers: buffers.clone(),
            peer,
        };
        // The socket is registered again on the runtime the connection runs on, so that
        // its events wake it there.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "accepted connection lost");
                continue;
            }
        };
        let sd = shutdown.clone();
        cfg.lanes.spawn(&mut conns, async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(s) => conn.run(NbdStream::Plain(s), sd).await,
                Err(e) => tracing::warn!(%peer, error = %e, "accepted connection lost"),
            }
        });
    }
    drop(listener);
    tracing::info!(
        open = conns.len(),
        "NBD listener closed; finishing admitted requests"
    );
    if tokio::time::timeout(cfg.grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "connections still open after the grace period"
        );
        conns.abort_all();
    }
}

/// One accepted connection and what it shares with the others.
struct Connection {
    reg: Arc<Registry>,
    cfg: Arc<ServerConfig>,
    budget: Budget,
    buffers: Buffers,
    peer: std::net::SocketAddr,
}

impl Connection {
    async fn run(self, stream: NbdStream, sd: watch::Receiver<bool>) {
        let _open = self.reg.metrics.open_connection();
        let peer = self.peer;
        let down = sd.clone();
        let mut stop = sd.clone();
        let hs = tokio::select! {
            r = tokio::time::timeout(
                self.cfg.limits.handshake_timeout,
                handshake::handshake(stream, &self.reg, peer, &self.cfg, move || *down.borrow()),
            ) => r,
            // A client idling in the handshake must not hold up a shutdown.
            _ = stop.wait_for(|s| *s) => {
                tracing::info!(%peer, "shutdown during the handshake");
                return;
            }
        };
        match hs {
            Err(_) => {
                self.reg.metrics.refused_connection(ConnRefusal::Handshake);
                tracing::warn!(%peer, "handshake timed out")
            }
            Ok(Err(e)) => {
                self.reg.metrics.refused_connection(match &e {
                    HandshakeError::ExportRefused(_, r) => handshake::refusal_reason(r),
                    _ => ConnRefusal::Handshake,
                });
                tracing::warn!(%peer, error = %e,
                    cause = ?std::error::Error::source(&e).map(|c| c.to_string()),
                    "handshake failed")
            }
            Ok(Ok(None)) => tracing::debug!(%peer, "client aborted the handshake"),
            Ok(Ok(Some((stream, neg)))) => {
                tracing::info!(%peer, volume = %neg.vol.config.name,
                    holder = ?neg.att.entry.holder, structured = neg.structured,
                    block_status = neg.block_status, tls = stream.is_tls(),
                    "connection in transmission");
                let t = transmission::Transmission {
                    reg: self.reg,
                    limits: &self.cfg.limits,
                    budget: self.budget,
                    buffers: self.buffers,
                };
                t.serve(stream, neg, sd).await;
            }
        }
    }
}
