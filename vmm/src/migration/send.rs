//! The source side: one thread per migration, started by `PUT /v1/migration/send`.
//!
//! Pre-copy runs beside the guest; the thread asks the VM loop to pause the guest and save
//! its state ([`crate::vm::VmEvent::MigrationStop`]) and tells it how it ended
//! ([`crate::vm::VmEvent::MigrationEnded`]), so that every vCPU and device change stays in
//! the loop.

use super::dirty::{DirtyLog, DirtyPages};
use super::wire::{self, Commit, Hello, Kind, PageBatch, Progress, Reply, Resumed};
use super::{update, Phase, SendParams, SharedStatus};
use crate::memory::{GuestMem, PAGE_SIZE};
use crate::state::Shape;
use crate::vcpu::{wall_us, VcpuCommand, VcpuKicker};
use crate::vm::VmEvent;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Connect deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each read or write on the stream (a stuck destination fails the migration).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the VM loop may take to pause, drain and save.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// A rest this small goes in the stop-and-copy without another round.
const SMALL_REST: u64 = 256 << 10;
/// Size of a PAGES frame.
const BATCH_BYTES: usize = 1 << 20;
/// Read granularity of the full pass.
const CHUNK: usize = 64 * PAGE_SIZE;
/// The throttle's period: each vCPU is held out of the guest for a share of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What the VM loop hands over when the guest is paused for the stop-and-copy.
pub struct StopCopy {
    /// The state envelope.
    pub state: Vec<u8>,
    /// Wall-clock microseconds when the last vCPU paused.
    pub paused_at_us: u64,
}

/// How a migration ended, for the VM loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination runs the guest (`auto`), or has it and waits (`wait`): the source
    /// stays paused.
    HandedOver,
    /// Failed or aborted before the hand-over: the source runs the guest again.
    NotHandedOver,
}

/// Everything the thread needs.
pub struct SourceCtx {
    /// The request.
    pub params: SendParams,
    /// VM name.
    pub name: String,
    /// VM shape.
    pub shape: Shape,
    /// Guest memory.
    pub mem: Arc<GuestMem>,
    /// The memory is a private (copy-on-write) mapping of a snapshot file rather than a
    /// shared memfd: pages the guest wrote since the restore are not in the file.
    pub private_memory: bool,
    /// Dirty tracking.
    pub dirty: DirtyLog,
    /// Shared progress.
    pub status: SharedStatus,
    /// Set by `PUT /v1/migration/abort`.
    pub abort: Arc<AtomicBool>,
    /// The stream, for the loop to shut down on abort.
    pub stream: Arc<Mutex<Option<TcpStream>>>,
    /// To the VM loop.
    pub events: Sender<VmEvent>,
    /// The vCPUs, for the throttle.
    pub kickers: Vec<VcpuKicker>,
}

/// Runs a migration to its end and reports the outcome to the VM loop.
pub fn run(ctx: SourceCtx) {
    let started = Instant::now();
    let result = send(&ctx, started);
    if let Err(e) = ctx.dirty.stop() {
        tracing::warn!(error = %e, "turning the dirty log off");
    }
    let outcome = match result {
        Ok(()) => Outcome::HandedOver,
        Err(e) => {
            let aborted = ctx.abort.load(Ordering::SeqCst);
            update(&ctx.status, |s| {
                s.phase = if aborted {
                    Phase::Aborted
                } else {
                    Phase::Failed
                };
                s.error = Some(e.clone());
                s.total_ms = started.elapsed().as_millis() as u64;
            });
            if aborted {
                tracing::warn!(reason = %e, "migration aborted; the guest stays here");
            } else {
                tracing::error!(error = %e, "migration failed; the guest stays here");
            }
            Outcome::NotHandedOver
        }
    };
    let _ = ctx.events.send(VmEvent::MigrationEnded(outcome));
}

type Wr = BufWriter<TcpStream>;

fn check_abort(ctx: &SourceCtx) -> Result<(), String> {
    if ctx.abort.load(Ordering::SeqCst) {
        return Err("aborted on request".into());
    }
    Ok(())
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("destination {addr}: {e}"))?;
    let mut last = format!("destination {addr}: no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("connect to {a}: {e}"),
        }
    }
    Err(last)
}

fn send(ctx: &SourceCtx, started: Instant) -> Result<(), String> {
    let started_at_us = wall_us();
    let p = &ctx.params;
    let stream = connect(&p.destination)?;
    let io = |e: std::io::Error| format!("migration stream: {e}");
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    if let Ok(mut slot) = ctx.stream.lock() {
        *slot = Some(stream.try_clone().map_err(io)?);
    }
    let mut reader = wire::FrameReader::new(stream.try_clone().map_err(io)?);
    let mut w = BufWriter::with_capacity(BATCH_BYTES * 2, stream);
    let we = |e: wire::WireError| vmhop_common::error::chain(&e);

    wire::write_preamble(&mut w).map_err(we)?;
    let hello = Hello {
        name: ctx.name.clone(),
        shape: ctx.shape.clone(),
        resume: p.resume,
    };
    wire::write_json(&mut w, Kind::Hello, &hello).map_err(we)?;
    w.flush().map_err(io)?;
    let reply: Reply = reader
        .read_json(Kind::Reply, "answer to HELLO")
        .map_err(we)?;
    if !reply.ok {
        return Err(format!(
            "the destination refused the migration: {}",
            reply.error.unwrap_or_default()
        ));
    }
    tracing::info!(destination = %p.destination, "migration: destination accepted");

    ctx.dirty
        .start()
        .map_err(|e| format!("turn on KVM's dirty log: {e}"))?;
    let mut sent = 0u64;
    // The dirty log runs from here: the first fetch holds what the guest wrote during the pass.
    let t = Instant::now();
    sent += full_pass(ctx, &mut w)?;
    w.flush().map_err(io)?;
    let mut send_rate = rate(sent, t.elapsed());
    tracing::info!(
        bytes = sent,
        ms = t.elapsed().as_millis() as u64,
        "migration: full pass sent"
    );

    let throttle = Throttle::start(ctx.kickers.clone());
    let mut pending;
    let mut iteration = 0u64;
    let mut last_fetch = t;
    let mut prev_bytes: Option<u64> = None;
    loop {
        check_abort(ctx)?;
        let dirty = ctx
            .dirty
            .fetch_and_clear()
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
        let since = last_fetch.elapsed();
        last_fetch = Instant::now();
        let bytes = dirty.count() * PAGE_SIZE as u64;
        let dirty_rate = rate(bytes, since);
        let expected_ms = bytes * 1000 / send_rate.max(1);
        update(&ctx.status, |s| {
            s.iteration = iteration;
            s.bytes_remaining = bytes;
            s.dirty_rate_bytes_per_sec = dirty_rate;
            s.expected_downtime_ms = expected_ms;
            s.total_ms = started.elapsed().as_millis() as u64;
        });
        wire::write_json(
            &mut w,
            Kind::Progress,
            &Progress {
                iteration,
                bytes_remaining: bytes,
            },
        )
        .map_err(we)?;
        iteration += 1;
        let round = Round {
            iteration,
            bytes,
            prev_bytes,
            expected_ms,
            dirty_rate,
            send_rate,
        };
        match decide(p, &round) {
            Next::StopAndCopy => {
                pending = dirty;
                break;
            }
            Next::Round { raise_throttle } => {
                if raise_throttle {
                    let pct = throttle.raise();
                    update(&ctx.status, |s| s.throttle_percent = pct);
                    tracing::info!(
                        percent = pct,
                        dirty_rate,
                        send_rate,
                        "migration: throttling the vCPUs"
                    );
                }
            }
        }
        prev_bytes = Some(bytes);
        let t = Instant::now();
        let n = send_pages(ctx, &mut w, &dirty)?;
        w.flush().map_err(io)?;
        sent += n;
        send_rate = send_rate.max(1) / 2 + rate(n, t.elapsed()) / 2;
        update(&ctx.status, |s| s.bytes_sent = sent);
    }
    throttle.stop();
    // Let the destination work off what is still in flight before the guest stops, so that
    // the pause holds only the last dirty pages and the state.
    wire::write_frame(&mut w, Kind::Sync, &[]).map_err(we)?;
    w.flush().map_err(io)?;
    let mut buf = Vec::new();
    match reader.read(&mut buf).map_err(we)? {
        Kind::Synced => {}
        other => return Err(we(wire::WireError::Unexpected(other, "answer to SYNC"))),
    }
    tracing::info!(
        iterations = iteration,
        remaining = pending.count() * PAGE_SIZE as u64,
        "migration: stop and copy"
    );

    let (tx, rx) = std::sync::mpsc::channel();
    ctx.events
        .send(VmEvent::MigrationStop(tx))
        .map_err(|_| "the VM is shutting down".to_string())?;
    let asked = Instant::now();
    let stop = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => break r?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if asked.elapsed() < STOP_TIMEOUT => {
                check_abort(ctx)?
            }
            Err(_) => return Err("the VM did not pause for the stop-and-copy".into()),
        }
    };
    let paused = Instant::now();
    update(&ctx.status, |s| {
        s.phase = Phase::Stopcopy;
        s.iteration = iteration;
    });
    let last = ctx
        .dirty
        .fetch_and_clear()
        .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
    pending.merge(&last);
    let final_bytes = send_pages(ctx, &mut w, &pending)?;
    sent += final_bytes;
    wire::write_frame(&mut w, Kind::State, &stop.state).map_err(we)?;
    sent += 12 + stop.state.len() as u64;
    w.flush().map_err(io)?;
    let sent_us = paused.elapsed().as_micros() as u64;
    let ready: Reply = reader
        .read_json(Kind::Ready, "answer to STATE")
        .map_err(we)?;
    tracing::info!(
        pages_bytes = final_bytes,
        state_bytes = stop.state.len(),
        sent_us,
        loaded_us = paused.elapsed().as_micros() as u64,
        "migration: stop-and-copy sent and loaded"
    );
    if !ready.ok {
        return Err(format!(
            "the destination could not load the state: {}",
            ready.error.unwrap_or_default()
        ));
    }
    check_abort(ctx)?;
    let commit = Commit {
        paused_at_us: stop.paused_at_us,
        started_at_us,
    };
    wire::write_json(&mut w, Kind::Commit, &commit).map_err(we)?;
    w.flush().map_err(io)?;
    // From here on the guest is the destination's: nothing below may resume it here.
    let auto = p.resume == super::ResumeMode::Auto;
    update(&ctx.status, |s| {
        s.phase = if auto {
            Phase::Completed
        } else {
            Phase::HandedOver
        };
        s.bytes_sent = sent;
        s.bytes_remaining = 0;
        s.total_ms = started.elapsed().as_millis() as u64;
    });
    if auto {
        match reader.read_json::<Resumed>(Kind::Resumed, "answer to COMMIT") {
            Ok(r) => {
                let us = r.resumed_at_us.saturating_sub(stop.paused_at_us);
                update(&ctx.status, |s| {
                    s.downtime_us = us;
                    s.downtime_ms = us.div_ceil(1000);
                    s.total_ms = started.elapsed().as_millis() as u64;
                });
                tracing::info!(
                    downtime_us = us,
                    total_ms = started.elapsed().as_millis() as u64,
                    bytes = sent,
                    "migration completed"
                );
            }
            Err(e) => tracing::warn!(
                error = %vmhop_common::error::chain(&e),
                "migration handed over, but the destination did not report its resume"
            ),
        }
    } else {
        tracing::info!(
            bytes = sent,
            total_ms = started.elapsed().as_millis() as u64,
            "migration handed over; the destination waits for its resume"
        );
    }
    Ok(())
}

/// What pre-copy knows after fetching a round's dirty pages.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// Rounds fetched so far, this one included.
    iteration: u64,
    /// Dirty bytes fetched.
    bytes: u64,
    /// The round before's.
    prev_bytes: Option<u64>,
    /// Time to send them at the measured rate.
    expected_ms: u64,
    /// Bytes per second the guest dirtied.
    dirty_rate: u64,
    /// Bytes per second the stream carried.
    send_rate: u64,
}

/// What pre-copy does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Pause the guest and send the rest.
    StopAndCopy,
    /// Send this round's pages, first raising the throttle if asked.
    Round {
        /// The guest dirties faster than half the link carries (with the throttle enabled).
        raise_throttle: bool,
    },
}

/// Stop once the rest fits the budget, unless another round still pays off: while each round
/// at least halves what is left, one more shortens the pause (the guest dirties less during a
/// short round than during the long one before). The iteration cap ends pre-copy regardless.
/// From the second round on, a guest dirtying faster than half the link's rate is throttled
/// (when enabled), a step more each round.
fn decide(p: &SendParams, r: &Round) -> Next {
    let fits = r.expected_ms <= p.downtime_limit_ms;
    let small = r.bytes <= SMALL_REST;
    let shrinking = r.prev_bytes.is_none_or(|prev| r.bytes * 2 <= prev);
    if r.iteration > u64::from(p.max_iterations) || (fits && (small || !shrinking)) {
        return Next::StopAndCopy;
    }
    Next::Round {
        raise_throttle: p.throttle && r.iteration >= 2 && r.dirty_rate > r.send_rate / 2,
    }
}

fn rate(bytes: u64, d: Duration) -> u64 {
    (bytes as u128 * 1_000_000 / d.as_micros().max(1)) as u64
}

/// Data extents `(offset, length)` of `len` bytes of `file` from `start` (SEEK_DATA/SEEK_HOLE),
/// relative to `start`; the whole range when the file cannot say.
fn data_extents(file: &File, start: u64, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let end = start + len;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on a descriptor this process owns; only the offset changes.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return vec![(0, len)];
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data - start, hole - data));
        at = hole;
    }
    out
}

/// Pagemap bits (Documentation/admin-guide/mm/pagemap.rst): present, swapped, file-backed.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Extents of a privately mapped snapshot region that may hold data: the file's data extents,
/// and every page the guest wrote since the restore (an anonymous copy, present or swapped,
/// as /proc/self/pagemap tells). Everything else reads as the file's holes: zero.
fn private_extents(file: &File, start: u64, host_addr: u64, len: u64) -> Vec<(u64, u64)> {
    let pages = (len / PAGE_SIZE as u64) as usize;
    let mut maybe = vec![false; pages];
    for (off, n) in data_extents(file, start, len) {
        let first = (off / PAGE_SIZE as u64) as usize;
        let last = (off + n).div_ceil(PAGE_SIZE as u64) as usize;
        maybe[first..last.min(pages)].fill(true);
    }
    let mut entries = vec![0u8; pages * 8];
    let read = File::open("/proc/self/pagemap").and_then(|pm| {
        use std::os::unix::fs::FileExt;
        pm.read_exact_at(&mut entries, host_addr / PAGE_SIZE as u64 * 8)
    });
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read /proc/self/pagemap; scanning all guest memory");
        return vec![(0, len)];
    }
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        if e & PM_SWAPPED != 0 || (e & PM_PRESENT != 0 && e & PM_FILE == 0) {
            maybe[i] = true;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, _) in maybe.iter().enumerate().filter(|(_, m)| **m) {
        let at = (i * PAGE_SIZE) as u64;
        match out.last_mut() {
            Some((o, n)) if *o + *n == at => *n += PAGE_SIZE as u64,
            _ => out.push((at, PAGE_SIZE as u64)),
        }
    }
    out
}

/// Sends every non-zero page (the destination's memory starts zeroed).
fn full_pass(ctx: &SourceCtx, w: &mut Wr) -> Result<u64, String> {
    let mut batch = PageBatch::new(BATCH_BYTES);
    let mut chunk = vec![0u8; CHUNK];
    let mut sent = 0u64;
    let mut pages = 0u64;
    for region in ctx.mem.iter() {
        let base = region.start_addr().0;
        let extents = match region.file_offset() {
            Some(fo) if ctx.private_memory => {
                private_extents(fo.file(), fo.start(), region.as_ptr() as u64, region.len())
            }
            Some(fo) => data_extents(fo.file(), fo.start(), region.len()),
            None => vec![(0, region.len())],
        };
        for (off, len) in extents {
            let mut at = off & !(PAGE_SIZE as u64 - 1);
            let end = off + len;
            while at < end {
                check_abort(ctx)?;
                let n = ((end - at) as usize).min(CHUNK).next_multiple_of(PAGE_SIZE);
                let n = n.min((region.len() - at) as usize);
                let buf = &mut chunk[..n];
                ctx.mem
                    .read_slice(buf, GuestAddress(base + at))
                    .map_err(|e| format!("read guest memory at {:#x}: {e}", base + at))?;
                for (i, page) in buf.chunks(PAGE_SIZE).enumerate() {
                    if page != ZERO_PAGE.as_slice() {
                        batch.push(base + at + (i * PAGE_SIZE) as u64, page);
                        pages += 1;
                    }
                    if batch.full() {
                        sent += batch.flush(w).map_err(|e| vmhop_common::error::chain(&e))?;
                        update(&ctx.status, |s| {
                            s.bytes_sent += BATCH_BYTES as u64;
                            s.pages_sent = pages;
                        });
                    }
                }
                at += n as u64;
            }
        }
    }
    sent += batch.flush(w).map_err(|e| vmhop_common::error::chain(&e))?;
    update(&ctx.status, |s| {
        s.bytes_sent = sent;
        s.pages_sent = pages;
    });
    Ok(sent)
}

/// Sends the pages in `dirty`, zero pages as markers.
fn send_pages(ctx: &SourceCtx, w: &mut Wr, dirty: &DirtyPages) -> Result<u64, String> {
    let mut batch = PageBatch::new(BATCH_BYTES);
    let mut page = [0u8; PAGE_SIZE];
    let mut sent = 0u64;
    let (mut pages, mut zeroes) = (0u64, 0u64);
    for addr in dirty.addresses() {
        ctx.mem
            .read_slice(&mut page, GuestAddress(addr))
            .map_err(|e| format!("read guest memory at {addr:#x}: {e}"))?;
        if page == ZERO_PAGE {
            batch.push_zero(addr);
            zeroes += 1;
        } else {
            batch.push(addr, &page);
            pages += 1;
        }
        if batch.full() {
            check_abort(ctx)?;
            sent += batch.flush(w).map_err(|e| vmhop_common::error::chain(&e))?;
        }
    }
    sent += batch.flush(w).map_err(|e| vmhop_common::error::chain(&e))?;
    update(&ctx.status, |s| {
        s.pages_sent += pages;
        s.zero_pages_sent += zeroes;
    });
    Ok(sent)
}

/// Holds every vCPU out of the guest for a share of each [`THROTTLE_PERIOD`].
struct Throttle {
    percent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(kickers: Vec<VcpuKicker>) -> Throttle {
        let percent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let pct = p.load(Ordering::SeqCst);
                    if pct > 0 {
                        let hold = THROTTLE_PERIOD * pct as u32 / 100;
                        for k in &kickers {
                            k.send(VcpuCommand::Throttle(hold));
                        }
                    }
                    std::thread::sleep(THROTTLE_PERIOD);
                }
            })
            .ok();
        Throttle {
            percent,
            stop,
            thread,
        }
    }

    /// Raises the throttle one step (30%, then +20% up to 90%) and returns it.
    fn raise(&self) -> u64 {
        let now = self.percent.load(Ordering::SeqCst);
        let next = if now == 0 { 30 } else { (now + 20).min(90) };
        self.percent.store(next, Ordering::SeqCst);
        next
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(throttle: bool) -> SendParams {
        SendParams {
            destination: "x:1".into(),
            downtime_limit_ms: 10,
            max_iterations: 5,
            throttle,
            resume: super::super::ResumeMode::Auto,
        }
    }

    fn round(iteration: u64, bytes: u64, prev: Option<u64>, dirty_rate: u64) -> Round {
        let send_rate = 1 << 30;
        Round {
            iteration,
            bytes,
            prev_bytes: prev,
            expected_ms: bytes * 1000 / send_rate,
            dirty_rate,
            send_rate,
        }
    }

    #[test]
    fn pre_copy_stops_when_the_rest_fits_and_stops_shrinking() {
        let p = params(false);
        // A small rest goes at once.
        assert_eq!(decide(&p, &round(1, 64 << 10, None, 0)), Next::StopAndCopy);
        // Fits the budget but is large: one more round while it halves.
        let big = 8 << 20;
        assert!(matches!(
            decide(&p, &round(1, big, None, 0)),
            Next::Round { .. }
        ));
        assert!(matches!(
            decide(&p, &round(2, big / 4, Some(big), 0)),
            Next::Round { .. }
        ));
        assert_eq!(
            decide(&p, &round(3, big / 5, Some(big / 4), 0)),
            Next::StopAndCopy
        );
        // Does not fit: go on until the cap.
        let huge = 1 << 30;
        assert!(matches!(
            decide(&p, &round(5, huge, Some(huge), 0)),
            Next::Round { .. }
        ));
        assert_eq!(
            decide(&p, &round(6, huge, Some(huge), 0)),
            Next::StopAndCopy
        );
    }

    #[test]
    fn the_throttle_rises_only_when_enabled_and_the_guest_outruns_the_link() {
        let huge = 1 << 30;
        let fast = 1 << 30;
        assert_eq!(
            decide(&params(true), &round(2, huge, Some(huge), fast)),
            Next::Round {
                raise_throttle: true
            }
        );
        assert_eq!(
            decide(&params(true), &round(1, huge, None, fast)),
            Next::Round {
                raise_throttle: false
            }
        );
        assert_eq!(
            decide(&params(false), &round(2, huge, Some(huge), fast)),
            Next::Round {
                raise_throttle: false
            }
        );
        assert_eq!(
            decide(&params(true), &round(2, huge, Some(huge), 1 << 20)),
            Next::Round {
                raise_throttle: false
            }
        );
    }
}
