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

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use storaged_client::protocol::REQUEST_LEN;
use storaged_client::stream::ReadHalf;
use tokio::io::{AsyncRead, ReadBuf};

/// How far the read after a long write looks ahead: a header and some data (when that is the
/// next write's, 8 KiB of it, so that the rest is received from a cache-line boundary on).
pub const AFTER_LONG_WRITE: usize = REQUEST_LEN + (8 << 10);

/// A reader whose next read can be held to a few bytes.
pub struct Lookahead {
    inner: ReadHalf,
    /// Most bytes the next read that returns data may take.
    next: usize,
}

impl Lookahead {
    /// Reads from `inner`, as far as the caller's buffer allows.
    pub fn new(inner: ReadHalf) -> Lookahead {
        Lookahead {
            inner,
            next: usize::MAX,
        }
    }

    /// Holds the next read that returns data to at most `max` bytes.
    pub fn limit_next(&mut self, max: usize) {
        self.next = max.max(1);
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
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
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
        let mut r = Lookahead::new(Box::new(std::io::Cursor::new(data.clone())));
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
        let mut r = Lookahead::new(Box::new(&b"abcdef"[..]));
        r.limit_next(4);
        let mut buf = bytes::BytesMut::with_capacity(1024);
        assert_eq!(r.read_buf(&mut buf).await.unwrap(), 4);
        assert_eq!(&buf[..], b"abcd");
        assert_eq!(r.read_buf(&mut buf).await.unwrap(), 2);
        assert_eq!(&buf[..], b"abcdef");
    }
}
