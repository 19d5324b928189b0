//! The NBD server: accepts connections, runs the handshake, then serves transmission.

mod handshake;
mod tls;
mod transmission;

pub use handshake::HandshakeError;
use storaged_client::stream::NbdStream;
pub use tls::NbdTls;
pub use transmission::{INFLIGHT_BUDGET, REQUEST_OVERHEAD};

use crate::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Longest a client may take to finish the handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

/// Accepts NBD connections until `shutdown` turns true, then waits for the open connections to
/// finish their admitted requests (at most `grace`). With `tls`, clients upgrade with
/// `NBD_OPT_STARTTLS` and prove their host with a certificate (see [`NbdTls`]).
pub async fn run(
    listener: TcpListener,
    reg: Arc<Registry>,
    tls: Option<NbdTls>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut conns = JoinSet::new();
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
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(%peer, error = %e, "TCP_NODELAY");
        }
        let reg = reg.clone();
        let sd = shutdown.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let down = sd.clone();
            let mut stop = sd.clone();
            let hs = tokio::select! {
                r = tokio::time::timeout(
                    HANDSHAKE_LIMIT,
                    handshake::handshake(
                        NbdStream::Plain(stream),
                        &reg,
                        peer,
                        tls.as_ref(),
                        move || *down.borrow(),
                    ),
                ) => r,
                // A client idling in the handshake must not hold up a shutdown.
                _ = stop.wait_for(|s| *s) => {
                    tracing::info!(%peer, "shutdown during the handshake");
                    return;
                }
            };
            match hs {
                Err(_) => tracing::warn!(%peer, "handshake timed out"),
                Ok(Err(e)) => tracing::warn!(%peer, error = %e,
                    cause = ?std::error::Error::source(&e).map(|c| c.to_string()),
                    "handshake failed"),
                Ok(Ok(None)) => tracing::debug!(%peer, "client aborted the handshake"),
                Ok(Ok(Some((stream, neg)))) => {
                    tracing::info!(%peer, volume = %neg.vol.config.name,
                        holder = ?neg.att.entry.holder, structured = neg.structured,
                        tls = stream.is_tls(), "connection in transmission");
                    transmission::serve(stream, reg, neg, sd).await;
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        open = conns.len(),
        "NBD listener closed; finishing admitted requests"
    );
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
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
