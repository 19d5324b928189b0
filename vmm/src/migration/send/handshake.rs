//! Connecting to the destination: the TCP connection with its deadlines, the preamble, HELLO
//! with the VM's shape and resume mode, and the destination's REPLY.

use super::pages::BATCH_BYTES;
use super::{SendError, SourceCtx};
use crate::migration::wire::{self, FrameReader, Hello, Kind, Reply};
use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connect deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each read or write on the stream (a stuck destination fails the migration).
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The connected stream: frames from the destination, buffered frames to it.
pub(super) struct Link {
    /// The destination's answers.
    pub reader: FrameReader<TcpStream>,
    /// Frames to the destination.
    pub w: BufWriter<TcpStream>,
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
    let stream = connect_any(&p.destination)?;
    stream.set_nodelay(true).map_err(SendError::Stream)?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(SendError::Stream)?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(SendError::Stream)?;
    if let Ok(mut slot) = ctx.stream.lock() {
        *slot = Some(stream.try_clone().map_err(SendError::Stream)?);
    }
    let reader = FrameReader::new(stream.try_clone().map_err(SendError::Stream)?);
    let mut link = Link {
        reader,
        w: BufWriter::with_capacity(BATCH_BYTES * 2, stream),
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
    tracing::info!(destination = %p.destination, "migration: destination accepted");
    Ok(link)
}
