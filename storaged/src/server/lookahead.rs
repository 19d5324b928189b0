//! The client's side of the socket as the request decoder reads it: how far one read may look
//! ahead.
//!
//! The decoder's buffer takes as much as the socket holds, up to its capacity (256 KiB), so
//! the read that brings a request's header also brings whatever follows it. For a long write
//! that is up to 256 KiB of its data, which then has to be copied into the write's own buffer
//! (`write_data` in `transmission.rs` receives the rest straight into it): perf put that copy
//! at ~5% of the server's time on 1 MiB writes. A client that sent one long write usually sends
//! another, so after one the next read looks ahead only [`AFTER_LONG_WRITE`] bytes: the next
//! header and a little data. Any later read takes what the buffer has room for again.
//!
//! While the rest of a long write's data is received ([`Lookahead::whole_reads`]), a read that
//! has to wait raises the socket's receive low-water mark (`SO_RCVLOWAT`) to the bytes it
//! still needs (at most [`LOW_WATER_MAX`]): the kernel wakes the reader once they are all
//! there, not for every segment the client's sends bring (a 1 MiB write's data came in ~4
//! reads and as many waits). The mark never exceeds what the client has yet to send of data
//! it announced, and goes back to 1 before the next header is read.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use storaged_client::protocol::REQUEST_LEN;
use storaged_client::stream::ReadHalf;
use tokio::io::{AsyncRead, ReadBuf};

/// How far the read after a long write looks ahead: a header and some data (when that is the
/// next write's, 8 KiB of it, so that the rest is received from a cache-line boundary on).
pub const AFTER_LONG_WRITE: usize = REQUEST_LEN + (8 << 10);

/// Highest receive low-water mark set (the kernel holds it to half the largest receive buffer).
pub const LOW_WATER_MAX: usize = 1 << 20;

/// A reader whose next read can be held to a few bytes.
pub struct Lookahead {
    inner: ReadHalf,
    /// Most bytes the next read that returns data may take.
    next: usize,
    /// The socket, for its receive low-water mark (plaintext TCP only).
    sock: Option<Arc<OwnedFd>>,
    /// The low-water mark set on it.
    low_water: usize,
    /// Reads wait for all the bytes they ask for (see [`Self::whole_reads`]).
    whole: bool,
}

impl Lookahead {
    /// Reads from `inner`, as far as the caller's buffer allows; `sock` is the same socket
    /// (a duplicate descriptor of a plaintext connection), whose low-water mark whole reads
    /// raise.
    pub fn new(inner: ReadHalf, sock: Option<Arc<OwnedFd>>) -> Lookahead {
        Lookahead {
            inner,
            next: usize::MAX,
            sock,
            low_water: 1,
            whole: false,
        }
    }

    /// Holds the next read that returns data to at most `max` bytes.
    pub fn limit_next(&mut self, max: usize) {
        self.next = max.max(1);
    }

    /// With `true`, a read that waits is woken only once all the bytes it asks for (at most
    /// [`LOW_WATER_MAX`]) have arrived: only for data the client must send (the rest of an
    /// announced write). `false` puts the low-water mark back to 1.
    pub fn whole_reads(&mut self, whole: bool) {
        self.whole = whole;
        if !whole {
            self.set_low_water(1);
        }
    }

    fn set_low_water(&mut self, bytes: usize) {
        let Some(sock) = &self.sock else { return };
        if bytes == self.low_water {
            return;
        }
        let value = bytes as libc::c_int;
        // SAFETY: `value` is a live `c_int`, the size given is its size, and the descriptor
        // is this connection's socket, open for the call.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            self.low_water = bytes;
        } else {
            // Not settable: reads wake as data comes, as without it.
            self.sock = None;
        }
    }
}

impl AsyncRead for Lookahead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() <= this.next {
            let wanted = buf.remaining();
            let read = Pin::new(&mut this.inner).poll_read(cx, buf);
            if read.is_pending() && this.whole {
                // Woken once all of it is there (the kernel signals at once if it already is).
                this.set_low_water(wanted.clamp(1, LOW_WATER_MAX));
            }
            ready!(read)?;
            this.next = usize::MAX;
            return Poll::Ready(Ok(()));
        }
        // A shorter window of the caller's buffer (zeroed first where it was not yet: a few
        // KiB, which costs far less than the copy it saves).
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(this.next));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        buf.advance(n);
        this.next = usize::MAX;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn only_the_next_read_is_held_short() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut r = Lookahead::new(Box::new(std::io::Cursor::new(data.clone())), None);
        let mut buf = vec![0u8; 65536];
        r.limit_next(100);
        assert_eq!(r.read(&mut buf).await.unwrap(), 100);
        assert_eq!(buf[..100], data[..100]);
        // The limit was for one read only.
        assert_eq!(r.read(&mut buf).await.unwrap(), 65536);
        assert_eq!(buf[..], data[100..65636]);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest[..], data[65636..]);
    }

    #[tokio::test]
    async fn a_held_read_into_uninitialised_memory_fills_only_what_it_read() {
        let mut r = Lookahead::new(Box::new(&b"abcdef"[..]), None);
        r.limit_next(4);
        let mut buf = bytes::BytesMut::with_capacity(1024);
        assert_eq!(r.read_buf(&mut buf).await.unwrap(), 4);
        assert_eq!(&buf[..], b"abcd");
        assert_eq!(r.read_buf(&mut buf).await.unwrap(), 2);
        assert_eq!(&buf[..], b"abcdef");
    }

    #[tokio::test]
    async fn a_whole_read_wakes_once_all_its_bytes_are_there() {
        use std::os::fd::AsFd;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut client, (server, _)) = (client.unwrap(), server.unwrap());
        let fd = server.as_fd().try_clone_to_owned().unwrap();
        let mut r = Lookahead::new(Box::new(server), Some(Arc::new(fd)));
        r.whole_reads(true);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 300_000];
            let mut reads = 0;
            let mut got = 0;
            while got < buf.len() {
                got += r.read(&mut buf[got..]).await.unwrap();
                reads += 1;
            }
            r.whole_reads(false);
            // Back to 1: a short read after it is not held up.
            let mut one = [0u8; 1];
            r.read_exact(&mut one).await.unwrap();
            (buf, reads, one[0])
        });
        // The data comes in small pieces, with pauses the reader would wake in.
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        for piece in data.chunks(10_000) {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        client.write_all(&[42]).await.unwrap();
        let (buf, reads, one) = reader.await.unwrap();
        assert_eq!(buf, data);
        assert!(reads <= 3, "{reads} reads");
        assert_eq!(one, 42);
    }
}
