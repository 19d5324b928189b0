//! An NBD connection's socket, plaintext or TLS (after `NBD_OPT_STARTTLS`, on either side),
//! and the host id the peer's certificate proves.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

/// An NBD connection.
pub enum NbdStream {
    /// Plaintext TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
    /// Nothing: the socket went into a TLS handshake that failed.
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
}

/// The reading half of a connection in transmission.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl NbdStream {
    /// Runs the server side of a TLS handshake on a plaintext connection (a connection in
    /// TLS already stays as it is; one whose handshake fails is closed).
    pub async fn accept_tls(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        match std::mem::replace(self, NbdStream::Closed) {
            NbdStream::Plain(tcp) => {
                let tls = acceptor.accept(tcp).await?;
                *self = NbdStream::Tls(Box::new(TlsStream::Server(tls)));
            }
            other => *self = other,
        }
        Ok(())
    }

    /// Runs the client side of a TLS handshake, checking the server's certificate against
    /// `server`.
    pub async fn connect_tls(
        &mut self,
        connector: &TlsConnector,
        server: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        match std::mem::replace(self, NbdStream::Closed) {
            NbdStream::Plain(tcp) => {
                let tls = connector.connect(server, tcp).await?;
                *self = NbdStream::Tls(Box::new(TlsStream::Client(tls)));
            }
            other => *self = other,
        }
        Ok(())
    }

    /// The underlying socket, for a hard shutdown (`None` once closed).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            NbdStream::Plain(s) => Some(s),
            NbdStream::Tls(t) => Some(t.get_ref().0),
            NbdStream::Closed => None,
        }
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, NbdStream::Tls(_))
    }

    /// The host id the client's certificate proves (`None` in plaintext).
    pub fn peer_host_id(&self) -> Result<Option<String>, vmhop_common::tls::TlsError> {
        match self {
            NbdStream::Plain(_) | NbdStream::Closed => Ok(None),
            NbdStream::Tls(t) => vmhop_common::tls::peer_host_id(t.get_ref().1),
        }
    }

    /// The two halves for the transmission phase (plaintext halves need no lock).
    pub fn into_halves(self) -> (ReadHalf, WriteHalf) {
        match self {
            NbdStream::Plain(tcp) => {
                let (r, w) = tcp.into_split();
                (Box::new(r), Box::new(w))
            }
            NbdStream::Tls(tls) => {
                let (r, w) = tokio::io::split(*tls);
                (Box::new(r), Box::new(w))
            }
            NbdStream::Closed => (Box::new(tokio::io::empty()), Box::new(tokio::io::sink())),
        }
    }
}

impl AsyncRead for NbdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            NbdStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            NbdStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for NbdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NbdStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            NbdStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            NbdStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Plain(s) => Pin::new(s).poll_flush(cx),
            NbdStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            NbdStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            NbdStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            NbdStream::Closed => Poll::Ready(Ok(())),
        }
    }
}
