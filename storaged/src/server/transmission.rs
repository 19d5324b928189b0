//! The transmission phase of one connection.
//!
//! A reader task takes frames from [`RequestDecoder`] and, for each request, reserves its share
//! of the connection's and the server's memory budgets (see [`super::limits`]), receives a
//! write's data (the decoder yields it as the next frame, so it is buffered only once the budget
//! allows), passes the admission gate and hands the I/O to a blocking thread. Completed requests
//! go over a channel to the writer task, which encodes their replies with [`ReplyEncoder`] in
//! completion order (so they may overtake each other) and writes them out whenever no more are
//! ready; on a plaintext connection a blocking thread writes replies without data itself when
//! the socket is free (see [`super::direct`]). Every reply, errors included, holds its
//! request's share until it has been encoded, so a client that does not read its replies
//! stops being read.
//!
//! No file I/O that can block runs on the runtime's threads: reads try the page cache without
//! blocking first (`RWF_NOWAIT`); small buffered writes are gathered while more requests are
//! ready on the socket and go to one blocking thread together, just before the reader would
//! wait (which keeps the cost of the hop off each 4 KiB write).
//!
//! Long reads on a plaintext connection are made by the writer, from the page cache, just
//! before their reply goes out, and sent from the same thread, which waits for the socket
//! (see [`LongRead`]).

use crate::cluster::replica::{Op, ReplicaError, Replicas};
use crate::lease::flip;
use crate::lease::gate::{Access, Admitted, Gate, Need, Refusal};
use crate::metrics::{ConnMetrics, Op as MetricOp};
use crate::registry::{Attachment, Registry};
use crate::server::buffers::{Buffers, PooledBuf, ALIGN, POOLED_MIN};
use crate::server::direct::{stalled, Direct, DirectReplies};
use crate::server::handshake::Negotiated;
use crate::server::limits::{Budget, Limits, Permit};
use crate::server::lookahead::{Lookahead, AFTER_LONG_WRITE};
use crate::volume::{Span, Volume, VolumeFile};
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storaged_client::codec::{
    send_frame, CodecError, Reply, ReplyBody, ReplyData, ReplyEncoder, RequestDecoder,
    RequestFrame, READ_CHUNK,
};
use storaged_client::meta::{BlockStatus, Extent, BASE_ALLOCATION_ID, MAX_EXTENTS};
use storaged_client::meta::{NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE};
use storaged_client::meta::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use storaged_client::protocol::*;
use storaged_client::stream::{NbdStream, WriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::codec::FramedRead;

/// Replies are gathered up to this many bytes per socket write while more are ready.
const WRITE_BATCH: usize = 256 << 10;
/// Buffered writes up to this size are gathered into batches for one blocking thread.
const BATCHED_WRITE_MAX: u32 = 64 << 10;
/// Most writes in one batch.
const BATCH_MAX: usize = 64;

type Requests = FramedRead<Lookahead, RequestDecoder>;

/// A request's share of the memory budgets, with what its reply is counted as in the
/// metrics when the writer sends it.
struct Held {
    _permit: Permit,
    op: MetricOp,
    len: u32,
    started: Instant,
}

/// One reply for the writer task, holding its request's share of the memory budgets until it
/// is encoded.
struct Outgoing {
    reply: Reply<PooledBuf>,
    held: Held,
}

/// What the writer task is sent.
enum ToWriter {
    /// A reply to send.
    Reply(Outgoing),
    /// A long read to make and send (plaintext connections).
    LongRead(LongRead),
    /// A direct write left bytes pending (see [`DirectReplies`]).
    Pending,
}

impl Outgoing {
    /// A reply without data.
    fn status(handle: u64, error: u32, permit: Held) -> Outgoing {
        Outgoing {
            reply: Reply::status(handle, error),
            held: permit,
        }
    }

    /// The reply to a command without data, from its outcome.
    fn done(handle: u64, res: std::io::Result<()>, permit: Held) -> Outgoing {
        let error = res.as_ref().map_or_else(io_errno, |_| 0);
        Outgoing::status(handle, error, permit)
    }

    /// The reply to a read of `data` at the request's offset with `error` (with structured
    /// replies an error is an error chunk: a reply to a read must never be a simple one there).
    fn read(req: &Request, error: u32, data: PooledBuf, permit: Held) -> Outgoing {
        let offset = req.offset;
        Outgoing {
            reply: Reply {
                handle: req.handle,
                error,
                body: ReplyBody::Data(ReplyData { offset, data }),
            },
            held: permit,
        }
    }
}

/// Why the reader stopped.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Disc,
    Eof,
    Fenced,
    Shutdown,
    /// Nothing sent and nothing in flight for the idle timeout (connections without a lease).
    Idle,
    /// The writer stopped: the socket failed, or the client read no reply for too long.
    Writer,
}

/// Sends replies as they come, as many as are ready in one socket write, flushed once none is
/// left; the data of long reads goes out from its own buffer (see [`send_frame`]). A write that makes no progress
/// for `stall` ends the connection.
async fn writer(
    mut wr: WriteHalf,
    encoder: ReplyEncoder,
    mut rx: mpsc::UnboundedReceiver<ToWriter>,
    stall: Duration,
    metrics: ConnMetrics,
    direct: Option<Arc<DirectReplies>>,
) -> std::io::Result<()> {
    let stalled = || stalled(stall);
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        if let Some(direct) = &direct {
            direct.writer_begins(&mut buf);
        }
        let mut next = Some(first);
        while let Some(msg) = next {
            next = rx.try_recv().ok();
            let Outgoing { reply, held } = match msg {
                ToWriter::Reply(r) => r,
                ToWriter::Pending => continue,
                ToWriter::LongRead(long) => {
                    // What came before goes first.
                    tokio::time::timeout(stall, wr.write_all_buf(&mut buf))
                        .await
                        .map_err(|_| stalled())??;
                    // This thread waits for the socket: the runtime's other tasks move on.
                    // The long reads queued behind this one are served in the same blocking
                    // section; what ends it is handled next.
                    let (reply, after) = tokio::task::block_in_place(|| {
                        serve_long_reads(long, next.take(), &mut rx, &encoder, stall, &metrics)
                    })?;
                    next = after.or_else(|| rx.try_recv().ok());
                    match reply {
                        Some(r) => r,
                        None => continue,
                    }
                }
            };
            let data = encoder.encode_head(&reply, &mut buf);
            metrics.answered(held.op, held.len, reply.error, held.started);
            let send = send_frame(&mut wr, &mut buf, data, WRITE_BATCH);
            tokio::time::timeout(stall, send)
                .await
                .map_err(|_| stalled())??;
        }
        // Flushed: over TLS a write can return with the last records still held in the TLS
        // layer (the socket was full), and no later write may come to push them out.
        let send = async {
            wr.write_all_buf(&mut buf).await?;
            wr.flush().await
        };
        tokio::time::timeout(stall, send)
            .await
            .map_err(|_| stalled())??;
        if let Some(direct) = &direct {
            direct.writer_ends();
        }
    }
    Ok(())
}

/// Serves `long`, then every long read that follows it in the queue (`next` first, then
/// `rx`), in one blocking section. Returns the reply a long read left for the writer to
/// send, if any, and the message that ended the section, for the writer to handle next.
fn serve_long_reads(
    mut long: LongRead,
    mut next: Option<ToWriter>,
    rx: &mut mpsc::UnboundedReceiver<ToWriter>,
    encoder: &ReplyEncoder,
    stall: Duration,
    metrics: &ConnMetrics,
) -> std::io::Result<(Option<Outgoing>, Option<ToWriter>)> {
    loop {
        match long.serve(encoder, stall)? {
            Served::Sent(held) => metrics.answered(held.op, held.len, 0, held.started),
            Served::Reply(r) => return Ok((Some(r), next)),
            Served::Elsewhere => {}
        }
        match next.take().or_else(|| rx.try_recv().ok()) {
            Some(ToWriter::LongRead(l)) => long = l,
            other => return Ok((None, other)),
        }
    }
}

fn io_errno(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => NBD_ENOSPC,
        Some(libc::ENOMEM) => NBD_ENOMEM,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::ENOTSUP) => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// Where replies go: the writer task, or from a blocking thread on a plaintext connection
/// the socket itself (see [`DirectReplies`]). The writer only goes away when the socket
/// failed, which the reader learns from the writer's end, so a failed send is ignored.
#[derive(Clone)]
struct ReplyTx {
    tx: mpsc::UnboundedSender<ToWriter>,
    direct: Option<Arc<DirectReplies>>,
    structured: bool,
    metrics: ConnMetrics,
}

impl ReplyTx {
    /// Sends a reply through the writer task.
    fn send(&self, r: Outgoing) {
        let _ = self.tx.send(ToWriter::Reply(r));
    }

    /// Runs `f` on a blocking thread with `file`; its reply goes out as
    /// [`ReplyTx::send_done`] sends it.
    fn blocking(
        &self,
        file: Arc<VolumeFile>,
        f: impl FnOnce(&VolumeFile) -> Outgoing + Send + 'static,
    ) {
        let tx = self.clone();
        tokio::task::spawn_blocking(move || tx.send_done([f(&file)]));
    }

    /// Sends the replies of requests done on a blocking thread: those without data straight
    /// to the socket when it is free (in one write), the others through the writer task.
    fn send_done(&self, replies: impl IntoIterator<Item = Outgoing>) {
        let Some(direct) = &self.direct else {
            return replies.into_iter().for_each(|r| self.send(r));
        };
        let encoder = ReplyEncoder::new(self.structured);
        let mut frames = BytesMut::new();
        let mut encoded = Vec::new();
        for r in replies {
            let start = frames.len();
            if encoder.encode_head(&r.reply, &mut frames).is_empty() {
                encoded.push(r);
            } else {
                frames.truncate(start);
                self.send(r);
            }
        }
        if encoded.is_empty() {
            return;
        }
        match direct.try_send(&frames) {
            Direct::Busy => encoded.into_iter().for_each(|r| self.send(r)),
            outcome => {
                for Outgoing { reply, held } in encoded {
                    self.metrics
                        .answered(held.op, held.len, reply.error, held.started);
                }
                if outcome == Direct::Pending {
                    let _ = self.tx.send(ToWriter::Pending);
                }
            }
        }
    }
}

/// A small buffered write waiting for its batch to go to a blocking thread.
struct QueuedWrite {
    req: Request,
    data: Bytes,
    permit: Held,
    adm: Admitted,
}

/// What the request handlers share.
struct Ctx {
    reg: Arc<Registry>,
    vol: Arc<Volume>,
    gate: Arc<Gate>,
    holder: Option<storaged_client::api::Holder>,
    tx: ReplyTx,
    budget: Budget,
    conn_budget: Arc<Semaphore>,
    /// Where read buffers and long write data's buffers come from.
    buffers: Buffers,
    peer: std::net::SocketAddr,
    structured: bool,
    block_status: bool,
    /// A refusal was already logged (a fenced client may retry thousands of times).
    refusal_logged: std::sync::atomic::AtomicBool,
    /// Small writes gathered for one blocking thread (see [`Ctx::flush_writes`]).
    batch: Mutex<Vec<QueuedWrite>>,
    /// Long reads go to the writer (see [`LongRead`]).
    long_reads: bool,
    /// This connection's metrics.
    metrics: ConnMetrics,
}

impl Ctx {
    fn send(&self, r: Outgoing) {
        self.tx.send(r);
    }

    /// Waits for the budget of a request of `op` with `len` bytes of data, received now.
    async fn permit(&self, op: MetricOp, len: u32) -> Held {
        let started = Instant::now();
        Held {
            _permit: self.budget.acquire(&self.conn_budget, len).await,
            op,
            len,
            started,
        }
    }

    /// Passes the gate; a standby may flip here on first access.
    async fn admit(&self, need: Need, kind: u16) -> Result<Admitted, u32> {
        let refusal = match self.gate.admit(need) {
            Ok(a) => return Ok(a),
            Err(r) => r,
        };
        if refusal == Refusal::Standby {
            if let Some(h) = &self.holder {
                match flip::on_first_access(&self.reg, &self.vol, h).await {
                    Ok(true) => return self.gate.admit(need).map_err(|_| NBD_EPERM),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(peer = %self.peer, volume = %self.vol.config.name,
                        error = %e, "flip on first access failed"),
                }
            }
        }
        self.metrics.refused(refusal);
        if !self
            .refusal_logged
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(peer = %self.peer, volume = %self.vol.config.name, command = kind,
                refusal = ?refusal, "request refused with EPERM (logged once per connection)");
        }
        Err(NBD_EPERM)
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.vol.config.size)
    }

    /// Runs `f` on a blocking thread with the volume's file; its reply goes to the writer.
    fn blocking(&self, f: impl FnOnce(&VolumeFile) -> Outgoing + Send + 'static) {
        self.tx.blocking(self.vol.file.clone(), f);
    }

    /// Queues a small write for the next batch.
    fn queue_write(&self, w: QueuedWrite) {
        let full = {
            let mut batch = self.batch.lock().expect("batch lock");
            batch.push(w);
            batch.len() >= BATCH_MAX
        };
        if full {
            self.flush_writes();
        }
    }

    /// Hands the gathered writes to one blocking thread. Called whenever the reader is about
    /// to wait, so that no admitted write waits for the reader.
    fn flush_writes(&self) {
        let batch = std::mem::take(&mut *self.batch.lock().expect("batch lock"));
        if batch.is_empty() {
            return;
        }
        let (file, tx) = (self.vol.file.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let mut done = Vec::with_capacity(batch.len());
            for QueuedWrite {
                req,
                data,
                permit,
                adm,
            } in batch
            {
                let res = file.write_at(&data, req.offset, false);
                drop(adm);
                done.push(Outgoing::done(req.handle, res, permit));
            }
            tx.send_done(done);
        });
    }
}

/// Command flags the server knows; any other is refused with `EINVAL`.
const KNOWN_FLAGS: u16 = NBD_CMD_FLAG_FUA
    | NBD_CMD_FLAG_NO_HOLE
    | NBD_CMD_FLAG_DF
    | NBD_CMD_FLAG_REQ_ONE
    | NBD_CMD_FLAG_FAST_ZERO;

/// The client's next frame, or why there is none. With an `idle` limit, a client that sends
/// nothing for that long while none of its requests is in flight is let go. Only the wait for
/// a frame is raced against that clock (reading a frame is cancel-safe): a frame once read is
/// always handled to its reply.
async fn next_frame(
    rd: &mut Requests,
    ctx: &Ctx,
    idle: Option<Duration>,
) -> Result<Result<RequestFrame, CodecError>, End> {
    let Some(limit) = idle else {
        return rd.next().await.ok_or(End::Eof);
    };
    loop {
        match tokio::time::timeout(limit, rd.next()).await {
            Ok(frame) => return frame.ok_or(End::Eof),
            Err(_) if ctx.budget.idle(&ctx.conn_budget) => return Err(End::Idle),
            // Requests in flight: the client is waiting for their replies, not idling.
            Err(_) => {}
        }
    }
}

/// Handles one frame; `Some(end)` stops the reader.
async fn handle(
    ctx: &Ctx,
    rd: &mut Requests,
    frame: RequestFrame,
) -> Result<Option<End>, CodecError> {
    let req = match frame {
        RequestFrame::Request(req) => req,
        RequestFrame::Oversize(req) => {
            tracing::warn!(peer = %ctx.peer, length = req.length, "oversize write");
            let permit = ctx.permit(MetricOp::Write, 0).await;
            ctx.send(Outgoing::status(req.handle, NBD_EOVERFLOW, permit));
            return Ok(None);
        }
        RequestFrame::WriteData(_) => {
            return Err(ProtocolError::Invalid("write data without a write request").into())
        }
    };
    if req.kind == NBD_CMD_DISC {
        return Ok(Some(End::Disc));
    }
    let data_len = match req.kind {
        NBD_CMD_WRITE | NBD_CMD_READ => req.length,
        _ => 0,
    };
    let permit = ctx.permit(MetricOp::of(req.kind), data_len).await;
    if req.flags & !KNOWN_FLAGS != 0 && req.kind != NBD_CMD_WRITE {
        ctx.send(refused(ctx, &req, NBD_EINVAL, permit));
        return Ok(None);
    }
    match req.kind {
        NBD_CMD_WRITE => {
            let data = write_data(rd, &ctx.buffers).await?;
            write(ctx, req, data, permit).await;
        }
        NBD_CMD_READ => read(ctx, req, permit).await,
        NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES | NBD_CMD_CACHE => {
            without_data(ctx, req, permit).await
        }
        NBD_CMD_BLOCK_STATUS => block_status(ctx, req, permit).await,
        NBD_CMD_LEASE_FLIP => flip_request(ctx, req, permit).await,
        other => {
            tracing::warn!(peer = %ctx.peer, command = other, "unknown command");
            ctx.send(Outgoing::status(req.handle, NBD_EINVAL, permit));
        }
    }
    Ok(None)
}

/// The reply refusing `req` with `error` before any I/O, in the form its command needs.
fn refused(ctx: &Ctx, req: &Request, error: u32, permit: Held) -> Outgoing {
    match req.kind {
        NBD_CMD_READ => Outgoing::read(req, error, PooledBuf::default(), permit),
        NBD_CMD_BLOCK_STATUS if ctx.structured => Outgoing {
            reply: Reply {
                handle: req.handle,
                error,
                body: ReplyBody::BlockStatus(BlockStatus {
                    context: BASE_ALLOCATION_ID,
                    extents: Vec::new(),
                }),
            },
            held: permit,
        },
        _ => Outgoing::status(req.handle, error, permit),
    }
}

/// The data after a write's header. Long data is received straight into a pooled buffer (the
/// part the read buffer already holds is copied there first): a fresh buffer per write cost a
/// page fault per 4 KiB on receipt. The read after it looks ahead only a little, so that
/// little of the next long write lands in the read buffer (see [`super::lookahead`]).
/// Shorter data comes as a frame.
async fn write_data(rd: &mut Requests, buffers: &Buffers) -> Result<Bytes, CodecError> {
    if let Some(len) = rd.decoder().pending_data().filter(|&n| n >= POOLED_MIN) {
        let mut buf = buffers.take(len);
        let data = buf.as_mut();
        let held = rd.read_buffer().len().min(len);
        data[..held].copy_from_slice(&rd.read_buffer()[..held]);
        rd.read_buffer_mut().advance(held);
        // The rest is received from a cache-line boundary on (see [`ALIGN`]): the few bytes
        // before the next one first.
        let edge = held.next_multiple_of(ALIGN).min(len);
        rd.get_mut().read_exact(&mut data[held..edge]).await?;
        // Woken once all of it is there, not for each segment (see [`super::lookahead`]).
        rd.get_mut().whole_reads(true);
        let rest = rd.get_mut().read_exact(&mut data[edge..]).await;
        rd.get_mut().whole_reads(false);
        rest?;
        rd.decoder_mut().data_received();
        rd.get_mut().limit_next(AFTER_LONG_WRITE);
        return Ok(Bytes::from_owner(buf));
    }
    match rd.next().await {
        Some(Ok(RequestFrame::WriteData(data))) => Ok(data),
        Some(Err(e)) => Err(e),
        Some(Ok(_)) => Err(ProtocolError::Invalid("write request without its data").into()),
        None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
    }
}

/// `NBD_CMD_WRITE`, its data received.
async fn write(ctx: &Ctx, req: Request, data: Bytes, permit: Held) {
    let h = req.handle;
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    if req.flags & !KNOWN_FLAGS != 0 {
        return ctx.send(Outgoing::status(h, NBD_EINVAL, permit));
    }
    if !ctx.in_range(req.offset, req.length as u64) {
        return ctx.send(Outgoing::status(h, NBD_ENOSPC, permit));
    }
    let adm = match ctx.admit(Need::Write, req.kind).await {
        Ok(adm) => adm,
        Err(e) => return ctx.send(Outgoing::status(h, e, permit)),
    };
    if let Some(rep) = ctx.vol.role.master() {
        let op = Op::Write {
            offset: req.offset,
            data,
            fua,
        };
        return replicated(ctx, h, rep, op, adm, permit);
    }
    if !fua && req.length <= BATCHED_WRITE_MAX {
        return ctx.queue_write(QueuedWrite {
            req,
            data,
            permit,
            adm,
        });
    }
    // Larger buffered writes are tried with RWF_NOWAIT where the file system supports it.
    if !fua {
        match ctx.vol.file.write_cached(&data, req.offset) {
            Ok(false) => {}
            done => {
                drop(adm);
                return ctx.send(Outgoing::done(h, done.map(drop), permit));
            }
        }
    }
    ctx.blocking(move |file| {
        let res = file.write_at(&data, req.offset, fua);
        drop(adm);
        Outgoing::done(h, res, permit)
    });
}

/// `NBD_CMD_READ`.
async fn read(ctx: &Ctx, req: Request, permit: Held) {
    if req.length > MAX_REQUEST_LEN {
        tracing::warn!(peer = %ctx.peer, length = req.length, "oversize read");
        return ctx.send(refused(ctx, &req, NBD_EOVERFLOW, permit));
    }
    if !ctx.in_range(req.offset, req.length as u64) {
        return ctx.send(refused(ctx, &req, NBD_EINVAL, permit));
    }
    let adm = match ctx.admit(Need::Read, req.kind).await {
        Ok(adm) => adm,
        Err(e) => return ctx.send(refused(ctx, &req, e, permit)),
    };
    if ctx.vol.role.master().is_some_and(|rep| !rep.usable()) {
        // A master whose etcd session may have ended answers no read (a successor may be
        // serving newer data): the client goes to the new master.
        ctx.gate.set_access(Access::Closed);
        return;
    }
    if let (true, Some(direct)) = (ctx.long_reads, &ctx.tx.direct) {
        if req.length as usize >= LONG_READ_MIN {
            // Admitted again when it is made.
            drop(adm);
            let _ = ctx.tx.tx.send(ToWriter::LongRead(LongRead {
                req,
                held: permit,
                file: ctx.vol.file.clone(),
                gate: ctx.gate.clone(),
                buffers: ctx.buffers.clone(),
                direct: direct.clone(),
                tx: ctx.tx.clone(),
            }));
            return;
        }
    }
    let mut buf = ctx.buffers.take(req.length as usize);
    // Fast path: data in the page cache is copied here, without the hop to a blocking thread.
    match ctx.vol.file.read_cached(buf.as_mut(), req.offset) {
        Ok(false) => {}
        done => {
            drop(adm);
            let error = done.as_ref().map_or_else(io_errno, |_| 0);
            return ctx.send(Outgoing::read(&req, error, buf, permit));
        }
    }
    ctx.blocking(move |file| read_waiting(file, &req, buf, adm, permit));
}

/// A read that may wait for the disk (on a blocking thread), and its reply.
fn read_waiting(
    file: &VolumeFile,
    req: &Request,
    mut buf: PooledBuf,
    adm: Admitted,
    permit: Held,
) -> Outgoing {
    let res = file.read_at(buf.as_mut(), req.offset);
    drop(adm);
    let error = res.as_ref().map_or_else(io_errno, |_| 0);
    Outgoing::read(req, error, buf, permit)
}

/// Reads of this many bytes or more are [`LongRead`]s on plaintext connections.
const LONG_READ_MIN: usize = POOLED_MIN;

/// A long read the writer makes itself, as nbdkit's threads do: admitted at the gate again,
/// read from the page cache into a buffer just before its reply goes out, and sent from the
/// same thread, which waits for the socket in a blocking section (one buffer serves one read
/// after another, its data still in the CPU's caches when the socket copies it). Data not in
/// the page cache is read on a blocking thread, as the reader would have, and its reply comes
/// back through the writer. Read by the reader ahead of the writer (up to 32 MiB ahead with
/// 32 reads of 1 MiB in flight) and sent with `writev`, 1 MiB reads at iodepth 32 over one
/// connection ran at 0.78-0.90x nbdkit's rate; made here, at 0.92-0.99x (both builds and
/// nbdkit serving one file, taking turns, 5 rounds). The long reads queued one behind another
/// are served in one blocking section ([`serve_long_reads`]): entering one hands the
/// runtime's worker to another thread, a context switch that per read cost 4-8% more
/// (0.90-0.97x against 0.97-1.04x, the same way).
struct LongRead {
    req: Request,
    held: Held,
    file: Arc<VolumeFile>,
    gate: Arc<Gate>,
    buffers: Buffers,
    /// The connection's socket.
    direct: Arc<DirectReplies>,
    /// Where a read that must wait for the disk sends its reply.
    tx: ReplyTx,
}

/// What became of a [`LongRead`].
enum Served {
    /// Its reply went out.
    Sent(Held),
    /// Its reply is this one (an error), for the writer to send.
    Reply(Outgoing),
    /// It went to a blocking thread.
    Elsewhere,
}

impl LongRead {
    /// Makes the read and sends its reply (blocking this thread while the socket is full).
    fn serve(self, encoder: &ReplyEncoder, stall: Duration) -> std::io::Result<Served> {
        let Ok(adm) = self.gate.admit(Need::Read) else {
            let (req, held) = (&self.req, self.held);
            let refused = Outgoing::read(req, NBD_EPERM, PooledBuf::default(), held);
            return Ok(Served::Reply(refused));
        };
        let mut buf = self.buffers.take(self.req.length as usize);
        match self.file.read_cached(buf.as_mut(), self.req.offset) {
            Ok(true) => drop(adm),
            Ok(false) => {
                let (req, held) = (self.req, self.held);
                let read = move |file: &VolumeFile| read_waiting(file, &req, buf, adm, held);
                self.tx.blocking(self.file, read);
                return Ok(Served::Elsewhere);
            }
            Err(e) => {
                let (req, held) = (&self.req, self.held);
                return Ok(Served::Reply(Outgoing::read(req, io_errno(&e), buf, held)));
            }
        }
        let reply = Reply {
            handle: self.req.handle,
            error: 0,
            body: ReplyBody::Data(ReplyData {
                offset: self.req.offset,
                data: buf,
            }),
        };
        let mut head = BytesMut::new();
        let data = encoder.encode_head(&reply, &mut head);
        self.direct.send_waiting(&head, data, stall)?;
        Ok(Served::Sent(self.held))
    }
}

/// `NBD_CMD_FLUSH`, `NBD_CMD_TRIM`, `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_CACHE`: commands
/// without data.
async fn without_data(ctx: &Ctx, req: Request, permit: Held) {
    let h = req.handle;
    let need = match req.kind {
        NBD_CMD_FLUSH | NBD_CMD_CACHE => Need::Read,
        _ => Need::Write,
    };
    if !ctx.in_range(req.offset, req.length as u64) {
        return ctx.send(Outgoing::status(h, NBD_EINVAL, permit));
    }
    let flag = |f| req.flags & f != 0;
    let (fua, no_hole, fast) = (
        flag(NBD_CMD_FLAG_FUA),
        flag(NBD_CMD_FLAG_NO_HOLE),
        flag(NBD_CMD_FLAG_FAST_ZERO),
    );
    let (off, len) = (req.offset, req.length as u64);
    let adm = match ctx.admit(need, req.kind).await {
        Ok(adm) => adm,
        Err(e) => return ctx.send(Outgoing::status(h, e, permit)),
    };
    if let (Some(rep), true) = (ctx.vol.role.master(), req.kind != NBD_CMD_CACHE) {
        let len = req.length;
        let op = match req.kind {
            NBD_CMD_FLUSH => Op::Flush,
            NBD_CMD_TRIM => Op::Trim {
                offset: off,
                len,
                fua,
            },
            _ => Op::Zeroes {
                offset: off,
                len,
                no_hole,
                fua,
                fast,
            },
        };
        return replicated(ctx, h, rep, op, adm, permit);
    }
    ctx.blocking(move |file| {
        let res = match req.kind {
            NBD_CMD_FLUSH => file.flush(),
            NBD_CMD_CACHE => file.cache(off, len),
            NBD_CMD_TRIM => file
                .trim(off, len)
                .and_then(|()| if fua { file.flush() } else { Ok(()) }),
            _ => file.write_zeroes(off, len, no_hole, fua, fast),
        };
        drop(adm);
        Outgoing::done(h, res, permit)
    });
}

/// `NBD_CMD_BLOCK_STATUS` in `base:allocation`, from the file's data and holes.
async fn block_status(ctx: &Ctx, req: Request, permit: Held) {
    let valid = ctx.block_status && req.length > 0 && ctx.in_range(req.offset, req.length.into());
    if !valid {
        return ctx.send(refused(ctx, &req, NBD_EINVAL, permit));
    }
    let adm = match ctx.admit(Need::Read, req.kind).await {
        Ok(adm) => adm,
        Err(e) => return ctx.send(refused(ctx, &req, e, permit)),
    };
    let max = match req.flags & NBD_CMD_FLAG_REQ_ONE {
        0 => MAX_EXTENTS,
        _ => 1,
    };
    ctx.blocking(move |file| {
        let spans = file.spans(req.offset, req.length, max);
        drop(adm);
        let (error, extents) = match spans {
            Ok(spans) if !spans.is_empty() => (0, spans.into_iter().map(extent).collect()),
            Ok(_) => (NBD_EIO, Vec::new()),
            Err(e) => (io_errno(&e), Vec::new()),
        };
        let status = BlockStatus {
            context: BASE_ALLOCATION_ID,
            extents,
        };
        Outgoing {
            reply: Reply {
                handle: req.handle,
                error,
                body: ReplyBody::BlockStatus(status),
            },
            held: permit,
        }
    });
}

/// A span of the file as a `base:allocation` extent.
fn extent(s: Span) -> Extent {
    let flags = match s.allocated {
        true => 0,
        false => NBD_STATE_HOLE | NBD_STATE_ZERO,
    };
    Extent {
        length: s.length,
        flags,
    }
}

/// Cluster mode: the command runs on every copy of the volume ([`Replicas::apply`]) and is
/// answered when all have it. A master that finds itself deposed answers nothing and closes
/// the connection: the client retries on the new master.
fn replicated(ctx: &Ctx, h: u64, rep: Arc<Replicas>, op: Op, adm: Admitted, permit: Held) {
    let (file, tx, gate) = (ctx.vol.file.clone(), ctx.tx.clone(), ctx.gate.clone());
    tokio::spawn(async move {
        let res = rep.apply(file, op).await;
        drop(adm);
        let error = match res {
            Ok(()) => 0,
            Err(ReplicaError::Io(e)) => io_errno(&e),
            Err(ReplicaError::Fenced) => {
                gate.set_access(Access::Closed);
                return;
            }
        };
        tx.send(Outgoing::status(h, error, permit));
    });
}

/// `NBD_CMD_LEASE_FLIP`: promote this standby connection's holder.
async fn flip_request(ctx: &Ctx, req: Request, permit: Held) {
    let h = req.handle;
    let Some(holder) = ctx.holder.as_ref() else {
        return ctx.send(Outgoing::status(h, NBD_EINVAL, permit));
    };
    if req.length != FLIP_REPORT_LEN || req.offset != 0 || req.flags != 0 {
        return ctx.send(Outgoing::status(h, NBD_EINVAL, permit));
    }
    let result = match ctx.gate.access() {
        Access::ReadWrite => Ok(FlipReport {
            epoch: ctx.vol.table().epoch,
            ..FlipReport::default()
        }),
        Access::Standby => flip::flip_self(&ctx.reg, &ctx.vol, holder).await,
        _ => return ctx.send(Outgoing::status(h, NBD_EPERM, permit)),
    };
    match result {
        Ok(rep) => ctx.send(Outgoing {
            reply: Reply {
                handle: h,
                error: 0,
                body: ReplyBody::Data(ReplyData {
                    offset: 0,
                    data: PooledBuf::from(rep.encode().to_vec()),
                }),
            },
            held: permit,
        }),
        Err(e) => {
            tracing::warn!(peer = %ctx.peer, volume = %ctx.vol.config.name, error = %e,
                "flip requested over NBD failed");
            ctx.send(Outgoing::status(h, NBD_EPERM, permit));
        }
    }
}

/// The parts of the server one connection in transmission uses.
pub(super) struct Transmission<'a> {
    pub(super) reg: Arc<Registry>,
    pub(super) limits: &'a Limits,
    pub(super) budget: Budget,
    pub(super) buffers: Buffers,
}

impl Transmission<'_> {
    /// Serves one negotiated connection until the client disconnects, a barrier closes it,
    /// the server shuts down (then the admitted requests finish and are answered first), the
    /// client leaves its replies unread too long, or a connection without a lease idles.
    pub(super) async fn serve(
        self,
        stream: NbdStream,
        neg: Negotiated,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Negotiated {
            vol,
            att,
            structured,
            block_status,
        } = neg;
        let Attachment {
            entry, attached, ..
        } = att;
        // A plaintext socket takes replies from blocking threads too, and its receive
        // low-water mark is raised for long writes (through a duplicate of its descriptor;
        // without one, every reply goes through the writer task and reads wake as data comes).
        let plain = match (&stream, stream.tcp()) {
            (NbdStream::Plain(_), Some(tcp)) => {
                use std::os::fd::AsFd;
                tcp.as_fd().try_clone_to_owned().ok().map(Arc::new)
            }
            _ => None,
        };
        let direct = plain.clone().map(|fd| Arc::new(DirectReplies::new(fd)));
        // Long reads go to the writer where it may block its thread (see [`LongRead`]).
        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        let long_reads = direct.is_some() && multi_thread;
        let (rd, wr) = stream.into_halves();
        let rd = Lookahead::new(rd, plain.clone());
        let mut rd = FramedRead::with_capacity(rd, RequestDecoder::new(), READ_CHUNK);
        let (tx, rx) = mpsc::unbounded_channel();
        let encoder = ReplyEncoder::new(structured);
        let metrics = self.reg.metrics.connection(&vol.config.name);
        let mut wtask = tokio::spawn(writer(
            wr,
            encoder,
            rx,
            self.limits.reply_timeout,
            metrics.clone(),
            direct.clone(),
        ));
        let ctx = Ctx {
            reg: self.reg,
            vol: vol.clone(),
            gate: entry.gate.clone(),
            holder: entry.holder.clone(),
            tx: ReplyTx {
                tx,
                direct,
                structured,
                metrics: metrics.clone(),
            },
            conn_budget: self.budget.connection(),
            budget: self.budget,
            buffers: self.buffers,
            peer: entry.peer,
            structured,
            block_status,
            refusal_logged: Default::default(),
            batch: Mutex::new(Vec::new()),
            long_reads,
            metrics,
        };
        let closed = entry.gate.closed();
        tokio::pin!(closed);
        let stop = shutdown.wait_for(|s| *s);
        tokio::pin!(stop);
        // Only connections without a lease idle out: lease holders are known hosts.
        let idle = entry.holder.is_none().then_some(self.limits.idle_timeout);
        let mut writer_end = None;
        let end: Result<End, CodecError> = loop {
            let step = async {
                match next_frame(&mut rd, &ctx, idle).await {
                    Ok(frame) => handle(&ctx, &mut rd, frame?).await,
                    Err(end) => Ok(Some(end)),
                }
            };
            tokio::pin!(step);
            // Whenever the reader is about to wait, the gathered writes go to a thread.
            let step = std::future::poll_fn(|cx| {
                let r = step.as_mut().poll(cx);
                if r.is_pending() {
                    ctx.flush_writes();
                }
                r
            });
            tokio::select! {
                biased;
                _ = &mut closed => break Ok(End::Fenced),
                _ = &mut stop => break Ok(End::Shutdown),
                r = &mut wtask => {
                    writer_end = Some(r);
                    break Ok(End::Writer);
                }
                r = step => match r {
                    Ok(None) => {}
                    Ok(Some(end)) => break Ok(end),
                    Err(e) => break Err(e),
                }
            }
        };
        ctx.flush_writes();
        drop(ctx);
        if matches!(end, Ok(End::Fenced)) {
            // Fenced: drained already; replies still queued would only reach a deposed primary.
            wtask.abort();
        } else if writer_end.is_none()
            && tokio::time::timeout(Duration::from_secs(30), &mut wtask)
                .await
                .is_err()
        {
            wtask.abort();
        }
        // The duplicate descriptor lives on in blocking tasks still running; the client learns
        // now that the connection is over.
        if let Some(fd) = &plain {
            use std::os::fd::AsRawFd;
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        drop(attached);
        match end {
            Ok(End::Writer) => {
                let error = match writer_end {
                    Some(Ok(Err(e))) => e.to_string(),
                    _ => "writer ended".into(),
                };
                tracing::warn!(peer = %entry.peer, volume = %vol.config.name, %error,
                    "connection dropped: replies could not be sent")
            }
            Ok(reason) => tracing::info!(peer = %entry.peer, volume = %vol.config.name,
                reason = ?reason, "connection closed"),
            Err(e) => tracing::warn!(peer = %entry.peer, volume = %vol.config.name,
                error = %e, cause = ?std::error::Error::source(&e).map(|c| c.to_string()),
                "connection dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use storaged_client::codec::{ReplyDecoder, ReplyFrame};
    use tokio_util::codec::Decoder;

    const LEN: usize = LONG_READ_MIN;

    /// A volume file of 4 long reads' worth of data (byte `i` is `i % 251`), a socket
    /// whose far end the test reads, and what long reads on it need.
    struct Conn {
        _dir: tempfile::TempDir,
        file: Arc<VolumeFile>,
        gate: Arc<Gate>,
        buffers: Buffers,
        direct: Arc<DirectReplies>,
        tx: ReplyTx,
        rx: mpsc::UnboundedReceiver<ToWriter>,
        budget: Budget,
        conn_budget: Arc<Semaphore>,
        client: UnixStream,
        metrics: ConnMetrics,
    }

    fn conn(access: Access) -> Conn {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let data: Vec<u8> = (0..4 * LEN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(VolumeFile::open(&path, data.len() as u64).unwrap());
        let (server, client) = UnixStream::pair().unwrap();
        let direct = Arc::new(DirectReplies::new(Arc::new(server.into())));
        let metrics = Metrics::new().connection("v");
        let (tx, rx) = mpsc::unbounded_channel();
        let limits = Limits::default();
        Conn {
            _dir: dir,
            file,
            gate: Arc::new(Gate::new(access)),
            buffers: Buffers::default(),
            direct: direct.clone(),
            tx: ReplyTx {
                tx,
                direct: Some(direct),
                structured: false,
                metrics: metrics.clone(),
            },
            rx,
            budget: Budget::new(&limits),
            conn_budget: Arc::new(Semaphore::new(limits.inflight_per_connection as usize)),
            client,
            metrics,
        }
    }

    impl Conn {
        /// A long read of the `i`th `LEN` bytes, with handle `i`.
        async fn long_read(&self, i: u64) -> LongRead {
            LongRead {
                req: Request {
                    flags: 0,
                    kind: NBD_CMD_READ,
                    handle: i,
                    offset: i * LEN as u64,
                    length: LEN as u32,
                },
                held: Held {
                    _permit: self.budget.acquire(&self.conn_budget, LEN as u32).await,
                    op: MetricOp::Read,
                    len: LEN as u32,
                    started: Instant::now(),
                },
                file: self.file.clone(),
                gate: self.gate.clone(),
                buffers: self.buffers.clone(),
                direct: self.direct.clone(),
                tx: self.tx.clone(),
            }
        }
    }

    /// The long reads queued behind the first are served in the same blocking section, in
    /// order, each with its own data; the first other message ends the section and is handed
    /// back to the writer.
    #[tokio::test]
    async fn queued_long_reads_are_served_together_until_another_message() {
        let mut c = conn(Access::ReadWrite);
        let first = c.long_read(0).await;
        let next = Some(ToWriter::LongRead(c.long_read(1).await));
        c.tx.tx
            .send(ToWriter::LongRead(c.long_read(2).await))
            .unwrap();
        c.tx.tx.send(ToWriter::Pending).unwrap();
        c.tx.tx
            .send(ToWriter::LongRead(c.long_read(3).await))
            .unwrap();
        let encoder = ReplyEncoder::new(false);
        let stall = Duration::from_secs(60);
        let mut client = c.client.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = vec![0u8; 3 * (16 + LEN)];
            client.read_exact(&mut all).unwrap();
            all
        });
        let (reply, after) =
            serve_long_reads(first, next, &mut c.rx, &encoder, stall, &c.metrics).unwrap();
        assert!(reply.is_none());
        assert!(
            matches!(after, Some(ToWriter::Pending)),
            "the section ends at Pending"
        );
        let mut all = BytesMut::from(&reader.join().unwrap()[..]);
        let mut decoder = ReplyDecoder::new(false, |_| Some(LEN as u32));
        for i in 0..3u64 {
            let Some(ReplyFrame::Simple {
                error,
                handle,
                data,
            }) = decoder.decode(&mut all).unwrap()
            else {
                panic!("reply {i} missing");
            };
            assert_eq!((handle, error), (i, 0));
            let at = i as usize * LEN;
            assert!(data
                .iter()
                .enumerate()
                .all(|(j, &b)| b == ((at + j) % 251) as u8));
        }
        assert!(all.is_empty());
        assert!(matches!(c.rx.try_recv(), Ok(ToWriter::LongRead(l)) if l.req.handle == 3));
    }

    /// A long read whose connection was fenced after the reader admitted it is answered
    /// `EPERM` (by the writer: its reply is handed back), and the message queued behind it is
    /// handed back unserved.
    #[tokio::test]
    async fn a_long_read_fenced_before_it_is_made_is_refused() {
        let mut c = conn(Access::ReadWrite);
        let first = c.long_read(0).await;
        let next = Some(ToWriter::LongRead(c.long_read(1).await));
        c.gate.set_access(Access::Fenced);
        let encoder = ReplyEncoder::new(false);
        let (reply, after) = serve_long_reads(
            first,
            next,
            &mut c.rx,
            &encoder,
            Duration::from_secs(60),
            &c.metrics,
        )
        .unwrap();
        let reply = reply.expect("the refusal, for the writer");
        assert_eq!((reply.reply.handle, reply.reply.error), (0, NBD_EPERM));
        assert!(matches!(after, Some(ToWriter::LongRead(l)) if l.req.handle == 1));
        // Nothing went to the socket.
        c.client.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            c.client.read(&mut byte).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
    }
}
