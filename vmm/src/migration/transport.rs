//! The migration stream's transport: TCP, in plaintext or in TLS with the hosts' certificates
//! (see [`vmhop_common::tls`]), and the destination's gate that waits for the one source it was
//! told to expect.
//!
//! With a TLS directory (`tls_dir` in the VM's configuration) both ends present their host
//! certificate: the source checks that the destination proves the host id it was given
//! ([`SendParams::destination_host`](vmm_api::migration::SendParams), else the destination's IP
//! address), the destination that the source proves the host id of `vmm run --incoming-from`.
//! Without one the stream is plaintext and nobody is checked (development on one machine).
//!
//! The destination's gate ([`accept`]): every connection gets a thread of its own that runs
//! the TLS handshake, checks the peer's identity and reads the stream's magic, within
//! [`HANDSHAKE_TIMEOUT`]. A connection that fails any of this (a port scanner, a peer that sends
//! nothing, a host other than the expected one, a client without a certificate of the cluster)
//! is closed and logged, and the gate keeps listening; the first that passes is the source, and
//! the listener closes. Nobody passing before the deadline fails the migration. At most
//! [`MAX_HANDSHAKES`] handshakes run at once; connections beyond are closed at once.

use super::wire::{self, WireError};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmhop_common::tls::{ClientCert, HostTls, TlsError};

/// How long one connection may take to prove who it is and send the stream's magic.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes the gate runs at once.
pub const MAX_HANDSHAKES: usize = 16;

/// Why a transport could not be set up.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The TLS directory cannot be used for migration streams.
    #[error("TLS directory {0} for the migration stream")]
    Tls(std::path::PathBuf, #[source] TlsError),
    /// The listener failed.
    #[error("accept a migration stream")]
    Accept(#[source] io::Error),
    /// No connection proved to be the expected source before the deadline.
    #[error("no source{} connected within {waited:?} (connections refused: {refused}{})",
        .expect.as_ref().map(|e| format!(" proving host {e:?}")).unwrap_or_default(),
        .last.as_ref().map(|l| format!("; the last: {l}")).unwrap_or_default())]
    NoSource {
        /// The host id expected.
        expect: Option<String>,
        /// How long the gate listened.
        waited: Duration,
        /// Connections refused meanwhile.
        refused: u32,
        /// Why the last one was refused.
        last: Option<String>,
    },
    /// The TLS handshake with the destination failed (its certificate included).
    #[error("TLS handshake with the destination, checking that it is {0:?}")]
    Handshake(String, #[source] io::Error),
    /// A name to check the destination against is neither a host id nor an IP address.
    #[error(transparent)]
    ServerName(TlsError),
}

/// Why the gate refused one connection (logged; the gate keeps listening).
#[derive(Debug, Error)]
enum Refusal {
    /// The TLS handshake failed: no certificate of the cluster, a timeout, not TLS at all.
    #[error("TLS handshake")]
    Handshake(#[source] io::Error),
    /// The peer's certificate names no host.
    #[error("peer certificate")]
    Certificate(#[source] TlsError),
    /// The peer is another host than the one expected.
    #[error("the peer is host {}, not the expected source {expected:?}",
        .presented.as_ref().map_or("(none)".to_string(), |p| format!("{p:?}")))]
    NotExpected {
        /// Who was expected.
        expected: String,
        /// Who came.
        presented: Option<String>,
    },
    /// The peer did not send the stream's magic in time.
    #[error("no migration stream")]
    Magic(#[source] WireError),
}

/// This host's TLS settings for migration streams, read from its TLS directory.
#[derive(Clone)]
pub struct StreamTls {
    host_id: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for StreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTls")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

impl StreamTls {
    /// Reads the TLS directory `dir`; it needs the server and the client certificate.
    pub fn load(dir: &std::path::Path) -> Result<StreamTls, TransportError> {
        let err = |e| TransportError::Tls(dir.to_path_buf(), e);
        let host = HostTls::load(dir).map_err(err)?;
        Ok(StreamTls {
            host_id: host.host_id().to_string(),
            server: host.server_config(ClientCert::Required).map_err(err)?,
            client: host.client_config().map_err(err)?,
        })
    }

    /// The host id this host's certificate proves.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }
}

/// A connected migration stream.
pub enum Stream {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS, the destination's end.
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    /// TLS, the source's end.
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath (for its deadlines, and a shutdown from another thread).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Server(s) => &s.sock,
            Stream::Client(s) => &s.sock,
        }
    }

    /// Whether the stream runs in TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Splits the stream into a reading and a writing end for one thread (a TLS session is one
    /// object: both ends share it).
    pub fn split(self) -> (StreamHalf, StreamHalf) {
        let shared = Rc::new(RefCell::new(self));
        (StreamHalf(shared.clone()), StreamHalf(shared))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Server(s) => s.flush(),
            Stream::Client(s) => s.flush(),
        }
    }
}

/// One end of a [`Stream::split`]: reads or writes the shared stream (never both at once: one
/// thread uses both ends in turn).
pub struct StreamHalf(Rc<RefCell<Stream>>);

impl Read for StreamHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl Write for StreamHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// Runs a TLS handshake on `tcp` to its end, or fails at `deadline`.
fn handshake<S: rustls::SideData>(
    conn: &mut rustls::ConnectionCommon<S>,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> io::Result<()> {
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the TLS handshake did not complete in time",
            ));
        }
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))?;
        conn.complete_io(tcp)?;
    }
    Ok(())
}

/// The source's end: connects `tcp` in TLS when `tls` is set, checking that the destination
/// proves `name` (a host id, or an IP address in its certificate).
pub fn connect(
    tcp: TcpStream,
    tls: Option<&StreamTls>,
    name: &str,
    deadline: Instant,
) -> Result<Stream, TransportError> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let server = vmhop_common::tls::server_name(name).map_err(TransportError::ServerName)?;
    let failed = |e| TransportError::Handshake(name.to_string(), e);
    let mut conn = ClientConnection::new(tls.client.clone(), server)
        .map_err(|e| failed(io::Error::other(e)))?;
    let mut tcp = tcp;
    handshake(&mut conn, &mut tcp, deadline).map_err(failed)?;
    Ok(Stream::Client(Box::new(StreamOwned::new(conn, tcp))))
}

/// What the destination's gate lets through.
pub struct Gate {
    /// TLS settings; `None` for plaintext.
    pub tls: Option<StreamTls>,
    /// The source's host id (required with TLS: the only certificate accepted).
    pub expect: Option<String>,
    /// When to give up waiting.
    pub deadline: Instant,
}

/// The source, through the gate.
pub struct Accepted {
    /// The stream, after the magic.
    pub stream: Stream,
    /// The source's address.
    pub peer: SocketAddr,
    /// The host id its certificate proves (TLS only).
    pub host: Option<String>,
    /// Connections refused before it.
    pub refused: u32,
}

/// One connection through the handshake: in TLS, the certificate of the expected host; then
/// the stream's magic.
fn admit(tcp: TcpStream, gate: &GateRules) -> Result<(Stream, Option<String>), Refusal> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (mut stream, host) = match &gate.tls {
        None => (Stream::Plain(tcp), None),
        Some(cfg) => {
            let mut conn = ServerConnection::new(cfg.clone())
                .map_err(|e| Refusal::Handshake(io::Error::other(e)))?;
            let mut tcp = tcp;
            handshake(&mut conn, &mut tcp, deadline).map_err(Refusal::Handshake)?;
            let presented = vmhop_common::tls::peer_host_id(&conn).map_err(Refusal::Certificate)?;
            if let Some(expected) = &gate.expect {
                if presented.as_deref() != Some(expected.as_str()) {
                    return Err(Refusal::NotExpected {
                        expected: expected.clone(),
                        presented,
                    });
                }
            }
            (
                Stream::Server(Box::new(StreamOwned::new(conn, tcp))),
                presented,
            )
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let timeouts = stream
        .tcp()
        .set_read_timeout(Some(left.max(Duration::from_millis(1))));
    timeouts.map_err(|e| Refusal::Magic(e.into()))?;
    wire::read_magic(&mut stream).map_err(Refusal::Magic)?;
    Ok((stream, host))
}

/// What the handshake threads need.
struct GateRules {
    tls: Option<Arc<ServerConfig>>,
    expect: Option<String>,
}

/// What the accept thread reports: a connection through its handshake, or the listener's
/// failure.
enum Event {
    Handshake(SocketAddr, Result<(Stream, Option<String>), Refusal>),
    Failed(io::Error),
}

/// Waits for the source at `listener` (see the module's description); the listener is closed
/// on return.
pub fn accept(listener: TcpListener, gate: Gate) -> Result<Accepted, TransportError> {
    let started = Instant::now();
    let rules = Arc::new(GateRules {
        tls: gate.tls.as_ref().map(|t| t.server.clone()),
        expect: gate.expect.clone(),
    });
    let (tx, rx) = mpsc::channel::<Event>();
    // The accept thread works on its own descriptor of the socket; this one stays open until
    // the thread is gone, so that the shutdown below cannot reach a reused descriptor.
    let theirs = listener.try_clone().map_err(TransportError::Accept)?;
    let acceptor = std::thread::Builder::new()
        .name("mig-accept".into())
        .spawn(move || accept_loop(theirs, rules, tx))
        .map_err(TransportError::Accept)?;
    let mut refused = 0u32;
    let mut last = None;
    let outcome = loop {
        let left = gate.deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Handshake(peer, Ok((stream, host)))) => {
                break Ok(Accepted {
                    stream,
                    peer,
                    host,
                    refused,
                })
            }
            Ok(Event::Handshake(peer, Err(why))) => {
                refused += 1;
                let reason = vmhop_common::error::chain(&why);
                tracing::warn!(%peer, reason = %reason,
                    "migration stream refused; still waiting for the source");
                last = Some(format!("{peer}: {reason}"));
            }
            Ok(Event::Failed(e)) => break Err(TransportError::Accept(e)),
            Err(_) => {
                break Err(TransportError::NoSource {
                    expect: gate.expect.clone(),
                    waited: started.elapsed(),
                    refused,
                    last,
                })
            }
        }
    };
    // Wakes the accept thread: accept fails on a listener that was shut down.
    let _ = nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    let _ = acceptor.join();
    outcome
}

/// Accepts connections and hands each to a handshake thread until the listener fails or is
/// shut down.
fn accept_loop(listener: TcpListener, rules: Arc<GateRules>, tx: mpsc::Sender<Event>) {
    let running = Arc::new(AtomicUsize::new(0));
    loop {
        let (tcp, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                let _ = tx.send(Event::Failed(e));
                return;
            }
        };
        if running.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            tracing::warn!(%peer, "migration stream refused: too many handshakes at once");
            continue;
        }
        running.fetch_add(1, Ordering::SeqCst);
        let (thread_rules, thread_tx, thread_running) =
            (rules.clone(), tx.clone(), running.clone());
        let spawned = std::thread::Builder::new()
            .name("mig-handshake".into())
            .spawn(move || {
                // A refused connection closes only once its refusal is reported: a peer that
                // sees it close and connects again is counted after it, not before.
                let open = tcp.try_clone();
                let r = admit(tcp, &thread_rules);
                thread_running.fetch_sub(1, Ordering::SeqCst);
                let _ = thread_tx.send(Event::Handshake(peer, r));
                drop(open);
            });
        if let Err(e) = spawned {
            running.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, error = %e, "migration stream refused: no handshake thread");
        }
    }
}
