//! Connecting to the destination: the TCP connection with its deadlines, the TLS session when
//! the VM has certificates (the destination must prove the host it was named as, see
//! [`crate::migration::transport`]), the preamble, HELLO with the VM's shape and resume mode,
//! and the destination's REPLY.

use super::{SendError, SourceCtx};
use crate::migration::transport::{self, StreamHalf};
use crate::migration::wire::{self, FrameReader, Hello, Kind, Reply};
use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Connect deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each read or write on the stream (a stuck destination fails the migration).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Write buffer of the stream: small frames go out together; a PAGES frame, larger, is
/// written past it in one write (one copy less).
const WRITE_BUFFER: usize = 64 << 10;

/// The connected stream: frames from the destination, buffered frames to it.
pub(super) struct Link {
    /// The destination's answers.
    pub reader: FrameReader<StreamHalf>,
    /// Frames to the destination.
    pub w: BufWriter<StreamHalf>,
}

impl Link {
    /// Sends what is buffered.
    pub(super) fn flush(&mut self) -> Result<(), SendError> {
        self.w.flush().map_err(SendError::Stream)
    }
}

fn connect_any(addr: &str) -> Result<TcpStream, SendError> {
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| SendError::Resolve(addr.to_string(), e))?;
    let mut last = SendError::NoAddress(addr.to_string());
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = SendError::Connect(a, e),
        }
    }
    Err(last)
}

/// Connects, publishes the stream for an abort to shut down, and has the destination accept
/// the VM.
pub(super) fn connect(ctx: &SourceCtx) -> Result<Link, SendError> {
    let p = &ctx.params;
    let tcp = connect_any(&p.destination)?;
    tcp.set_nodelay(true).map_err(SendError::Stream)?;
    if let Ok(mut slot) = ctx.stream.lock() {
        *slot = Some(tcp.try_clone().map_err(SendError::Stream)?);
    }
    let name = p
        .destination_host
        .clone()
        .unwrap_or_else(|| host_part(&p.destination));
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let stream = transport::connect(tcp, ctx.tls.as_ref(), &name, deadline)?;
    stream
        .tcp()
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(SendError::Stream)?;
    stream
        .tcp()
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(SendError::Stream)?;
    let tls = stream.is_tls();
    let (r, w) = stream.split();
    let mut link = Link {
        reader: FrameReader::new(r),
        w: BufWriter::with_capacity(WRITE_BUFFER, w),
    };

    wire::write_preamble(&mut link.w)?;
    let hello = Hello {
        name: ctx.name.clone(),
        shape: ctx.shape.clone(),
        resume: p.resume,
    };
    wire::write_json(&mut link.w, Kind::Hello, &hello)?;
    link.flush()?;
    let reply: Reply = link.reader.read_json(Kind::Reply, "answer to HELLO")?;
    if !reply.ok {
        return Err(SendError::Refused(reply.error.unwrap_or_default()));
    }
    tracing::info!(destination = %p.destination, tls, host = %name,
        "migration: destination accepted");
    Ok(link)
}

/// The host of `HOST:PORT` (brackets of an IPv6 address removed).
fn host_part(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}
