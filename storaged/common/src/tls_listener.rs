//! A TCP listener for an axum server in mutual TLS with the host's certificate: every client
//! proves its host id with a certificate of the cluster's CA (see [`crate::tls`]), and the
//! handlers find it as [`Peer`] in the request's `ConnectInfo` (serve the router with
//! `into_make_service_with_connect_info::<Peer>()`).
//!
//! Each connection's handshake runs in a task of its own with a deadline
//! ([`HANDSHAKE_TIMEOUT`]), so that a client that never completes one holds up nobody; one that
//! fails (no certificate, another CA, not TLS) is logged and closed.

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that completed their handshake and wait for the server to take them.
const QUEUE: usize = 64;

/// Who is at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    /// The host id its certificate proves.
    pub host: String,
}

/// Accepts TCP connections and hands over those whose client proved a host id.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves `tcp` in TLS with `config`, which must require client certificates
    /// ([`crate::tls::ClientCert::Required`]).
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(QUEUE);
        let acceptor = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            local,
            ready,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, Peer)>,
) {
    loop {
        let (s, addr) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: pass, as axum's own TCP listener does.
                tracing::warn!(error = %e, "accepting a TLS connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(s)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %addr, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %addr, "TLS handshake did not complete in time");
                    return;
                }
            };
            let host = match crate::tls::peer_host_id(tls.get_ref().1) {
                Ok(Some(host)) => host,
                Ok(None) => {
                    tracing::warn!(peer = %addr, "TLS client without a certificate refused");
                    return;
                }
                Err(e) => {
                    tracing::warn!(peer = %addr, error = %crate::error::chain(&e),
                        "TLS client certificate refused");
                    return;
                }
            };
            let _ = ready.send((tls, Peer { addr, host })).await;
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task never ends by itself: only once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            host: String::new(),
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
