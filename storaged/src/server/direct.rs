//! Replies a blocking thread writes to a plaintext socket itself.
//!
//! A request done on a blocking thread (a long write, a batch of small ones, a flush) used to
//! send its reply to the writer task, which woke a runtime thread only to write a 16-byte
//! status: perf counted ~9 context switches and ~17 system calls per 1 MiB write against
//! nbdkit's 3-6 and 6-10. When no one else is writing to the socket and nothing is left over, the
//! blocking thread writes its replies itself, without waiting ([`DirectReplies::try_send`]).
//!
//! The writer task writes the replies of long reads itself this way too, waiting for the
//! socket in `poll` ([`DirectReplies::send_waiting`], in a blocking section; see
//! `transmission`'s `LongRead`).
//!
//! Frames never interleave: the socket has one writer at a time, the writer task from
//! [`DirectReplies::writer_begins`] to [`DirectReplies::writer_ends`], or a blocking thread
//! for one non-blocking `send` under the lock. What a full socket leaves of a direct write is
//! pending: the writer task sends it before anything else, and no direct write is made until
//! it has. Replies may overtake each other on the wire (NBD allows it); a frame is always
//! whole and in order.

use bytes::BytesMut;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The error of a connection whose client took none of its replies for `stall`.
pub fn stalled(stall: Duration) -> std::io::Error {
    let why = format!("the client read no reply for {stall:?}");
    std::io::Error::new(std::io::ErrorKind::TimedOut, why)
}

/// What [`DirectReplies::try_send`] did with the frames.
#[derive(Debug, PartialEq, Eq)]
pub enum Direct {
    /// Written (or dropped: the socket failed, which the connection learns elsewhere).
    Written,
    /// Partly written; the writer task must be woken to send the rest.
    Pending,
    /// Not taken: someone else is writing; the caller sends them through the writer task.
    Busy,
}

#[derive(Default)]
struct State {
    /// The writer task is writing.
    writer: bool,
    /// Bytes of direct writes the socket did not take.
    pending: BytesMut,
}

/// A connection's socket as blocking threads write to it.
pub struct DirectReplies {
    /// The socket (a duplicate of the connection's descriptor: it stays valid for as long as a
    /// blocking thread may use it).
    sock: Arc<OwnedFd>,
    state: Mutex<State>,
}

impl DirectReplies {
    /// Writes to `sock`.
    pub fn new(sock: Arc<OwnedFd>) -> DirectReplies {
        DirectReplies {
            sock,
            state: Mutex::new(State::default()),
        }
    }

    /// Writes `frames` (whole encoded replies) without waiting, if the socket is free.
    pub fn try_send(&self, frames: &[u8]) -> Direct {
        let Ok(mut state) = self.state.lock() else {
            return Direct::Busy;
        };
        if state.writer || !state.pending.is_empty() {
            return Direct::Busy;
        }
        let mut rest = frames;
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        while !rest.is_empty() {
            match send(self.sock.as_raw_fd(), rest, flags) {
                Ok(n) => rest = &rest[n..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    state.pending.extend_from_slice(rest);
                    return Direct::Pending;
                }
                Err(_) => return Direct::Written,
            }
        }
        Direct::Written
    }

    /// The writer task starts writing: what direct writes left pending goes to the front of
    /// `buf` (which holds nothing yet), to be written first.
    pub fn writer_begins(&self, buf: &mut BytesMut) {
        if let Ok(mut state) = self.state.lock() {
            state.writer = true;
            let pending = state.pending.split();
            buf.extend_from_slice(&pending);
        }
    }

    /// The writer task has written everything it had.
    pub fn writer_ends(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.writer = false;
        }
    }

    /// Writes all of `head`, then all of `data`, as the writer task (between
    /// [`DirectReplies::writer_begins`] and [`DirectReplies::writer_ends`], in a blocking
    /// section: this blocks the thread), waiting in `poll` while the socket is full. The head
    /// goes in its own `send` with `MSG_MORE` (the socket holds it for the data), as nbdkit
    /// sends: with head and data in one `sendmsg`, the same long reads ran at 0.77-0.82x
    /// nbdkit's rate, below the writer task's `writev` (0.85-0.93x in that run); so, at
    /// 0.92-0.99x. A socket that takes nothing for `stall` is an error, as is one that failed.
    pub fn send_waiting(&self, head: &[u8], data: &[u8], stall: Duration) -> std::io::Result<()> {
        let last = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        // nix names no MSG_MORE.
        let more = last | MsgFlags::from_bits_retain(libc::MSG_MORE);
        let wait = PollTimeout::try_from(stall).unwrap_or(PollTimeout::MAX);
        for (mut rest, flags) in [(head, more), (data, last)] {
            while !rest.is_empty() {
                match send(self.sock.as_raw_fd(), rest, flags) {
                    Ok(n) => rest = &rest[n..],
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => {
                        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLOUT)];
                        match poll(&mut fds, wait) {
                            Ok(0) => return Err(stalled(stall)),
                            Ok(_) | Err(Errno::EINTR) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Bytes left pending (for tests).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.state.lock().map(|s| s.pending.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_free_socket_takes_replies_directly() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = DirectReplies::new(Arc::new(a.into()));
        assert_eq!(d.try_send(b"reply one"), Direct::Written);
        let mut got = [0u8; 9];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"reply one");
    }

    #[test]
    fn no_direct_write_while_the_writer_writes() {
        let (a, _b) = UnixStream::pair().unwrap();
        let d = DirectReplies::new(Arc::new(a.into()));
        let mut buf = BytesMut::new();
        d.writer_begins(&mut buf);
        assert_eq!(d.try_send(b"x"), Direct::Busy);
        d.writer_ends();
        assert_eq!(d.try_send(b"x"), Direct::Written);
    }

    #[test]
    fn a_waiting_send_writes_head_and_data_whole_through_a_full_socket() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = DirectReplies::new(Arc::new(a.into()));
        let head = b"head:".to_vec();
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
        let expected = [head.clone(), data.clone()].concat();
        // Far more than the socket holds: the sender waits for the reader.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; expected.len()];
            b.read_exact(&mut got).unwrap();
            got == expected
        });
        d.send_waiting(&head, &data, Duration::from_secs(60))
            .unwrap();
        assert!(reader.join().unwrap());
    }

    #[test]
    fn a_waiting_send_gives_up_on_a_client_that_reads_nothing() {
        let (a, _b) = UnixStream::pair().unwrap();
        let d = DirectReplies::new(Arc::new(a.into()));
        let data = vec![0u8; 8 << 20];
        let err = d
            .send_waiting(b"", &data, Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[test]
    fn what_a_full_socket_leaves_goes_first_through_the_writer() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let d = DirectReplies::new(Arc::new(a.into()));
        // Fill the socket until a direct write is cut short.
        let frame = vec![7u8; 4096];
        let mut sent = 0usize;
        let outcome = loop {
            match d.try_send(&frame) {
                Direct::Written => sent += frame.len(),
                other => break other,
            }
        };
        assert_eq!(outcome, Direct::Pending);
        let pending = d.pending();
        assert!(pending > 0 && pending <= frame.len());
        // Nothing more goes directly until the writer has sent the rest.
        assert_eq!(d.try_send(b"later"), Direct::Busy);
        let mut buf = BytesMut::new();
        d.writer_begins(&mut buf);
        assert_eq!(buf.len(), pending);
        assert_eq!(d.pending(), 0);
        // The reader sees whole frames: every byte sent directly, then the rest.
        let mut got = vec![0u8; sent + frame.len() - pending];
        b.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 7));
        d.writer_ends();
    }
}
