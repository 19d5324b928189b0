//! The lease-aware async NBD client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), storaged_client::nbd::ClientError> {
//! use storaged_client::nbd::{Client, ClientConfig, LeaseSpec};
//! use storaged_client::protocol::RequestedState;
//! let cfg = ClientConfig::new(vec!["127.0.0.1:10809".into()], "vol1").with_lease(LeaseSpec {
//!     host: "host-b".into(),
//!     instance: "vm-1".into(),
//!     state: RequestedState::Standby,
//!     expected_epoch: 0,
//! });
//! let c = Client::connect(&cfg).await?;
//! let report = c.flip().await?; // standby -> primary
//! c.write(0, b"hello".to_vec(), true).await?;
//! let data = c.read(0, 5).await?;
//! # Ok(()) }
//! ```
//! Every method takes `&self`: calls from many tasks are pipelined on the one connection and
//! their replies may arrive in any order. The client does not negotiate structured replies.

mod connect;
mod failover;

pub use connect::DEFAULT_CONNECT_TIMEOUT;
pub use failover::FailoverClient;

use crate::codec::{
    send_frame, CodecError, OutgoingRequest, ReplyDecoder, ReplyFrame, RequestEncoder, READ_CHUNK,
};
use crate::protocol::*;
use crate::stream::{ReadHalf, WriteHalf};
use bytes::BytesMut;
use futures::StreamExt;
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

/// A client operation that failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket error.
    #[error("connection")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("protocol violation")]
    Protocol(#[from] ProtocolError),
    /// This host was deactivated on the volume: it must not use it again.
    #[error("deactivated: {message}")]
    Deactivated {
        /// The server's message.
        message: String,
    },
    /// Standby asked by the host that is primary (handled inside `connect`).
    #[error("already primary: {message}")]
    AlreadyPrimary {
        /// The server's message.
        message: String,
    },
    /// Another holder is primary.
    #[error("lease conflict: {message}")]
    Conflict {
        /// The server's message.
        message: String,
    },
    /// The expected epoch is stale.
    #[error("epoch mismatch: {message}")]
    EpochMismatch {
        /// The server's message.
        message: String,
    },
    /// Another option error (unknown export, policy...).
    #[error("refused ({code:#x}): {message}")]
    Refused {
        /// `NBD_REP_ERR_*`.
        code: u32,
        /// The server's message.
        message: String,
    },
    /// This host's TLS settings cannot be used.
    #[error("TLS settings")]
    Tls(#[source] vmhop_common::tls::TlsError),
    /// The TLS handshake with the server failed (its certificate is not the one expected, or
    /// it refused ours).
    #[error("TLS handshake with the storage server")]
    TlsHandshake(#[source] std::io::Error),
    /// No address answered.
    #[error("no storage address answered after {attempts} attempts (last: {last})")]
    Unreachable {
        /// Handshakes tried.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The request is not permitted by the lease (standby, or fenced after a flip).
    #[error("not permitted by the lease (EPERM)")]
    NotPermitted,
    /// The server answered an NBD error.
    #[error("server error {0}")]
    Server(u32),
    /// Request larger than the server's maximum.
    #[error("request of {len} bytes exceeds the maximum of {max}")]
    TooBig {
        /// Requested.
        len: usize,
        /// Allowed.
        max: u32,
    },
    /// The connection is gone.
    #[error("disconnected")]
    Disconnected,
}

impl From<CodecError> for ClientError {
    fn from(e: CodecError) -> ClientError {
        match e {
            CodecError::Io(e) => ClientError::Io(e),
            CodecError::Protocol(e) => ClientError::Protocol(e),
        }
    }
}

/// The lease a client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSpec {
    /// Host id.
    pub host: String,
    /// Instance id.
    pub instance: String,
    /// Requested state.
    pub state: RequestedState,
    /// Expected epoch, 0 for any.
    pub expected_epoch: u64,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Storage addresses (`host:port`) tried in order.
    pub addresses: Vec<String>,
    /// Export (volume) name.
    pub export: String,
    /// Lease; `None` connects anonymously.
    pub lease: Option<LeaseSpec>,
    /// Limit per handshake attempt.
    pub connect_timeout: Duration,
    /// First pause between rounds over all addresses.
    pub backoff_initial: Duration,
    /// Largest pause.
    pub backoff_max: Duration,
    /// Rounds over all addresses before giving up.
    pub rounds: u32,
    /// TLS: upgrade with `NBD_OPT_STARTTLS`, prove this host with its certificate and check
    /// the server's; `None` speaks plaintext.
    pub tls: Option<ClientTls>,
}

/// TLS settings of a client.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// TLS with this host's certificate (its TLS directory, see [`vmhop_common::tls`]). The
    /// server's certificate is checked against `server_name` (storaged's host id), or, when
    /// `None`, against the address connected to (its IP address must be in the certificate).
    pub fn new(
        host: &vmhop_common::tls::HostTls,
        server_name: Option<String>,
    ) -> Result<ClientTls, vmhop_common::tls::TlsError> {
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(host.client_config()?),
            server_name,
        })
    }

    /// The name to check the server at `addr` (`host:port`) against.
    fn server_name(&self, addr: &str) -> String {
        match &self.server_name {
            Some(n) => n.clone(),
            None => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            }
        }
    }
}

impl ClientConfig {
    /// Defaults: 5 s per attempt, 3 rounds, backoff 100 ms doubling up to 2 s.
    pub fn new(addresses: Vec<String>, export: impl Into<String>) -> ClientConfig {
        ClientConfig {
            addresses,
            export: export.into(),
            lease: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            rounds: 3,
            tls: None,
        }
    }

    /// With TLS.
    pub fn with_tls(mut self, tls: ClientTls) -> ClientConfig {
        self.tls = Some(tls);
        self
    }

    /// With a lease.
    pub fn with_lease(mut self, lease: LeaseSpec) -> ClientConfig {
        self.lease = Some(lease);
        self
    }
}

/// What the handshake established.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    size: u64,
    flags: u16,
    max_request: u32,
    lease: Option<(RequestedState, u64)>,
}

type Waiter = oneshot::Sender<Result<Vec<u8>, ClientError>>;

struct Pending {
    tx: Waiter,
    read_len: u32,
}

/// The requests in flight by handle, shared by the callers and the reply decoder.
type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// The sending half: each request is encoded into `buf` and written at once (a write's data
/// from the caller's memory when it is long, see [`send_frame`]), then flushed: over TLS a
/// write can return with the last records still held in the TLS layer (the socket was full),
/// and nothing else would push them out while the caller only waits for the reply.
struct Sender {
    io: WriteHalf,
    buf: BytesMut,
    /// The socket under the stream (TLS or not), for a hard shutdown.
    fd: RawFd,
}

impl Sender {
    async fn send(&mut self, out: OutgoingRequest<'_>) -> Result<(), CodecError> {
        let payload = RequestEncoder.encode_head(out, &mut self.buf)?;
        send_frame(&mut self.io, &mut self.buf, payload, 0).await?;
        Ok(self.io.flush().await?)
    }
}

struct Inner {
    writer: tokio::sync::Mutex<Sender>,
    pending: PendingMap,
    next: AtomicU64,
    dead: AtomicBool,
    neg: Negotiated,
    state: Mutex<Option<(RequestedState, u64)>>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A connected NBD client; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.inner.neg.size)
            .field("lease", &self.lease())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(r) = self.reader.lock().expect("reader lock").take() {
            r.abort();
        }
    }
}

impl Client {
    /// Connects following the connection logic (see `connect.rs`).
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
        let (stream, neg) = connect::connect_any(cfg).await?;
        let fd = stream
            .tcp()
            .map(|t| t.as_raw_fd())
            .ok_or(ClientError::Disconnected)?;
        let (rd, wr) = stream.into_halves();
        let writer = Sender {
            io: wr,
            buf: BytesMut::with_capacity(READ_CHUNK),
            fd,
        };
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            pending: PendingMap::default(),
            next: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            neg,
            state: Mutex::new(neg.lease),
            reader: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let pending = inner.pending.clone();
        let decoder = ReplyDecoder::new(false, move |handle| {
            let pending = pending.lock().expect("pending lock");
            pending.get(&handle).map(|p| p.read_len)
        });
        let replies = FramedRead::with_capacity(rd, decoder, READ_CHUNK);
        let task = tokio::spawn(async move {
            let err = reader(replies, &weak).await;
            if let Some(inner) = weak.upgrade() {
                inner.dead.store(true, Ordering::SeqCst);
                let waiters: Vec<_> = inner.pending.lock().expect("pending").drain().collect();
                for (_, p) in waiters {
                    let _ = p.tx.send(Err(ClientError::Disconnected));
                }
                tracing::debug!(error = ?err, "NBD client reader ended");
            }
        });
        *inner.reader.lock().expect("reader lock") = Some(task);
        Ok(Client { inner })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.neg.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.inner.neg.flags
    }

    /// Largest payload per request.
    pub fn max_request(&self) -> u32 {
        self.inner.neg.max_request
    }

    /// Granted lease state and epoch (None when anonymous).
    pub fn lease(&self) -> Option<(RequestedState, u64)> {
        *self.inner.state.lock().expect("state lock")
    }

    /// Whether the connection is still usable.
    pub fn is_connected(&self) -> bool {
        !self.inner.dead.load(Ordering::SeqCst)
    }

    async fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        read_len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        if self.inner.dead.load(Ordering::SeqCst) {
            return Err(ClientError::Disconnected);
        }
        let handle = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .expect("pending lock")
            .insert(handle, Pending { tx, read_len });
        let req = Request {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        let sent = async {
            let mut w = self.inner.writer.lock().await;
            if self.inner.dead.load(Ordering::SeqCst) {
                return Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into());
            }
            // Dropping this future half-way through a request would leave the stream out of
            // step with the server: the guard then takes the connection down instead.
            let mut guard = SendGuard {
                inner: &self.inner,
                writer: &mut w,
                done: false,
            };
            let out = OutgoingRequest {
                request: req,
                payload,
            };
            guard.writer.send(out).await?;
            guard.done = true;
            Ok::<(), CodecError>(())
        }
        .await;
        if let Err(e) = sent {
            self.inner
                .pending
                .lock()
                .expect("pending lock")
                .remove(&handle);
            return Err(if self.inner.dead.load(Ordering::SeqCst) {
                ClientError::Disconnected
            } else {
                e.into()
            });
        }
        rx.await.map_err(|_| ClientError::Disconnected)?
    }

    fn check_len(&self, len: usize) -> Result<u32, ClientError> {
        let max = self.inner.neg.max_request;
        if len > max as usize {
            return Err(ClientError::TooBig { len, max });
        }
        Ok(len as u32)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        let l = self.check_len(len)?;
        self.submit(NBD_CMD_READ, 0, offset, l, &[], l).await
    }

    /// Writes `data` at `offset`; `fua`: durable before the reply.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), ClientError> {
        self.write_slice(offset, &data, fua).await
    }

    /// Writes `data` at `offset` without taking it (a caller that may retry keeps it).
    pub async fn write_slice(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), ClientError> {
        let l = self.check_len(data.len())?;
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.submit(NBD_CMD_WRITE, flags, offset, l, data, 0)
            .await
            .map(|_| ())
    }

    /// Makes all completed writes durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.submit(NBD_CMD_FLUSH, 0, 0, 0, &[], 0)
            .await
            .map(|_| ())
    }

    /// Discards a range.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.submit(NBD_CMD_TRIM, 0, offset, len, &[], 0)
            .await
            .map(|_| ())
    }

    /// Zeroes a range (`no_hole`: keep it allocated).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), ClientError> {
        let mut flags = 0;
        if no_hole {
            flags |= NBD_CMD_FLAG_NO_HOLE;
        }
        if fua {
            flags |= NBD_CMD_FLAG_FUA;
        }
        self.submit(NBD_CMD_WRITE_ZEROES, flags, offset, len, &[], 0)
            .await
            .map(|_| ())
    }

    /// Asks the server to promote this standby connection to primary; returns the step timings.
    pub async fn flip(&self) -> Result<FlipReport, ClientError> {
        let data = self
            .submit(
                NBD_CMD_LEASE_FLIP,
                0,
                0,
                FLIP_REPORT_LEN,
                &[],
                FLIP_REPORT_LEN,
            )
            .await?;
        let rep = FlipReport::decode(&data)?;
        *self.inner.state.lock().expect("state lock") = Some((RequestedState::Primary, rep.epoch));
        Ok(rep)
    }

    /// Sends `NBD_CMD_DISC` after the requests in flight and closes the connection.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let req = Request {
            flags: 0,
            kind: NBD_CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        let mut w = self.inner.writer.lock().await;
        w.send(OutgoingRequest {
            request: req,
            payload: &[],
        })
        .await?;
        w.io.shutdown().await?;
        Ok(())
    }
}

/// Takes the connection down unless the request it guards was sent completely.
struct SendGuard<'a> {
    inner: &'a Inner,
    writer: &'a mut Sender,
    done: bool,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.inner.dead.store(true, Ordering::SeqCst);
        // Only further traffic stops (which also ends the reader); the descriptor stays open
        // and owned by the stream. An error means the socket is already down.
        let _ = nix::sys::socket::shutdown(self.writer.fd, nix::sys::socket::Shutdown::Both);
    }
}

/// Reads replies and completes their waiters.
async fn reader<F: FnMut(u64) -> Option<u32>>(
    mut replies: FramedRead<ReadHalf, ReplyDecoder<F>>,
    inner: &std::sync::Weak<Inner>,
) -> Result<(), ClientError> {
    while let Some(reply) = replies.next().await {
        let ReplyFrame::Simple {
            error,
            handle,
            data,
        } = reply?
        else {
            return Err(ProtocolError::Invalid("structured reply not negotiated").into());
        };
        let Some(inner) = inner.upgrade() else {
            return Ok(());
        };
        let p = inner
            .pending
            .lock()
            .expect("pending lock")
            .remove(&handle)
            .ok_or(ProtocolError::Invalid("reply for an unknown handle"))?;
        let result = match error {
            0 => Ok(Vec::from(data)),
            NBD_EPERM => Err(ClientError::NotPermitted),
            e => Err(ClientError::Server(e)),
        };
        let _ = p.tx.send(result);
    }
    Err(ClientError::Disconnected)
}
