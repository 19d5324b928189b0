//! The destination side: `vmm run --incoming ADDR:PORT` builds the VM without booting it,
//! listens, and this thread waits for the source at the [`transport`] gate (in TLS, only the
//! host of `--incoming-from`) and receives its stream into guest memory. The state and the
//! hand-over go through the VM loop ([`crate::vm::VmEvent::IncomingState`],
//! [`crate::vm::VmEvent::IncomingCommit`]); a stream that fails before COMMIT ends the process
//! ([`crate::vm::VmEvent::IncomingFailed`]): the source still has the guest.
//!
//! Everything in the stream is the source's: [`receive_stream`] reads it frame by frame into
//! an [`Incoming`] VM (the VM loop here, a plain decoder in the fuzz target) and refuses what
//! does not belong, without trusting any length or address in it.

use super::transport::{self, Accepted, Gate, TransportError};
use super::wire::{self, Commit, Hello, Kind, Progress, Reply, Resumed, WireError};
use super::{update, Phase, SharedStatus};
use crate::memory::{GuestMem, PAGE_SIZE};
use crate::persist::Shape;
use crate::vm::{VmError, VmEvent};
use std::io::{BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmhop_common::error::chain as error_chain;

/// How long the VM loop may take to load the state or resume.
const LOOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of each read once a source is connected.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Read buffer of the stream: small frames come in one read; the payload of a PAGES frame,
/// larger, is read past it straight into the frame's buffer (one copy less).
const READ_BUFFER: usize = 64 << 10;

/// Why an incoming migration failed before the hand-over.
#[derive(Debug, Error)]
pub enum ReceiveError {
    /// No source came through the gate.
    #[error("waiting for the source")]
    Gate(#[from] TransportError),
    /// The stream could not be set up.
    #[error("migration stream")]
    Stream(#[source] std::io::Error),
    /// A frame could not be read or written, or was not valid here.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The source's VM is not shaped like this one.
    #[error("the source VM {name:?} is {theirs:?}; this VM is {ours:?}")]
    Shape {
        /// The source VM's name.
        name: String,
        /// Its shape.
        theirs: Shape,
        /// This VM's.
        ours: Shape,
    },
    /// The stream ended before COMMIT.
    #[error("the source closed the stream before the hand-over")]
    ClosedEarly,
    /// A page does not lie in guest memory.
    #[error("page {0:#x} outside guest memory")]
    PageOutside(u64, #[source] vm_memory::GuestMemoryError),
    /// The VM loop is gone.
    #[error("the VM is shutting down")]
    VmGone,
    /// The VM loop did not answer in time.
    #[error("the VM did not load the state in time")]
    LoadTimeout,
    /// The VM loop could not load the state.
    #[error("load the VM state")]
    Load(#[source] VmError),
    /// COMMIT came first.
    #[error("migration stream: COMMIT before STATE")]
    CommitBeforeState,
    /// The source gave up, with this reason.
    #[error("the source aborted the migration: {0}")]
    SourceAborted(String),
}

/// What the destination thread needs.
pub struct DestCtx {
    /// Bound before the VMM reports ready.
    pub listener: TcpListener,
    /// Who may connect, and until when.
    pub gate: Gate,
    /// Where the stream goes.
    pub vm: DestVm,
}

/// The VM an incoming stream goes into (through the VM loop).
pub struct DestVm {
    /// This VM's shape.
    pub shape: Shape,
    /// Guest memory.
    pub mem: Arc<GuestMem>,
    /// Shared status.
    pub status: SharedStatus,
    /// To the VM loop.
    pub events: Sender<VmEvent>,
}

/// What the loop answers to a COMMIT.
pub struct CommitDone {
    /// Wall-clock microseconds when the first vCPU ran (`auto`), else 0.
    pub resumed_at_us: u64,
}

/// Waits for the source and receives one migration.
pub fn run(ctx: DestCtx) {
    let DestCtx { listener, gate, vm } = ctx;
    let mut ctx = vm;
    let received = transport::accept(listener, gate)
        .map_err(ReceiveError::from)
        .and_then(|source| receive(&mut ctx, source));
    if let Err(e) = received {
        update(&ctx.status, |s| {
            s.phase = Phase::Failed;
            s.error = Some(error_chain(&e));
        });
        let _ = ctx.events.send(VmEvent::IncomingFailed(e));
    }
}

/// Answers HELLO with a refusal and this reason.
fn refuse(w: &mut impl Write, why: &ReceiveError) {
    let _ = wire::write_json(
        w,
        Kind::Reply,
        &Reply {
            ok: false,
            error: Some(error_chain(why)),
        },
    );
    let _ = w.flush();
}

/// What a stream is received into.
pub trait Incoming {
    /// The VM's shape; the source's must be the same.
    fn shape(&self) -> &Shape;
    /// Guest memory, for the pages.
    fn mem(&self) -> &GuestMem;
    /// The migration status the API reports.
    fn status(&self) -> &SharedStatus;
    /// Loads the saved state (a [`crate::persist`] envelope) into the VM.
    fn load_state(&mut self, state: Vec<u8>) -> Result<(), ReceiveError>;
    /// The guest is this VM's: runs it (`auto`) or waits for the resume. `None` when that
    /// could not be confirmed (the guest is this VM's all the same).
    fn commit(&mut self, c: Commit, auto: bool) -> Option<CommitDone>;
}

impl Incoming for DestVm {
    fn shape(&self) -> &Shape {
        &self.shape
    }

    fn mem(&self) -> &GuestMem {
        &self.mem
    }

    fn status(&self) -> &SharedStatus {
        &self.status
    }

    fn load_state(&mut self, state: Vec<u8>) -> Result<(), ReceiveError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.events
            .send(VmEvent::IncomingState(state, tx))
            .map_err(|_| ReceiveError::VmGone)?;
        match rx.recv_timeout(LOOP_TIMEOUT) {
            Ok(r) => r.map_err(ReceiveError::Load),
            Err(_) => Err(ReceiveError::LoadTimeout),
        }
    }

    fn commit(&mut self, c: Commit, auto: bool) -> Option<CommitDone> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.events
            .send(VmEvent::IncomingCommit(c, auto, tx))
            .ok()?;
        rx.recv_timeout(LOOP_TIMEOUT).ok()?.ok()
    }
}

fn receive(ctx: &mut DestVm, source: Accepted) -> Result<(), ReceiveError> {
    tracing::info!(peer = %source.peer, host = %source.host.as_deref().unwrap_or("-"),
        tls = source.stream.is_tls(), refused_before = source.refused,
        "migration stream connected");
    let tcp = source.stream.tcp();
    tcp.set_nodelay(true).map_err(ReceiveError::Stream)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(ReceiveError::Stream)?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(ReceiveError::Stream)?;
    let (reader, mut w) = source.stream.split();
    // The gate read the stream's magic; the stream is read from its start again.
    let r = BufReader::with_capacity(READ_BUFFER, (&wire::MAGIC[..]).chain(reader));
    receive_stream(r, &mut w, ctx)
}

/// Receives one migration stream from `r` into `dest`, answering on `w`: the preamble and
/// HELLO, then pages, progress and syncs until STATE (loaded into `dest`) and COMMIT (the
/// guest is `dest`'s), or an ABORT. Returns once the guest is `dest`'s.
pub fn receive_stream<R: Read, W: Write>(
    r: R,
    w: &mut W,
    dest: &mut impl Incoming,
) -> Result<(), ReceiveError> {
    let started = Instant::now();
    let mut r = wire::FrameReader::new(r);
    update(dest.status(), |s| {
        s.role = super::MigrationRole::Destination;
        s.phase = Phase::Precopy;
    });

    if let Err(e) = wire::read_preamble(r.get_mut()) {
        let e = ReceiveError::from(e);
        refuse(w, &e);
        return Err(e);
    }
    let hello: Hello = r.read_json(Kind::Hello, "expected HELLO")?;
    if &hello.shape != dest.shape() {
        let e = ReceiveError::Shape {
            name: hello.name,
            theirs: hello.shape,
            ours: dest.shape().clone(),
        };
        refuse(w, &e);
        return Err(e);
    }
    let auto = hello.resume == super::ResumeMode::Auto;
    wire::write_json(
        w,
        Kind::Reply,
        &Reply {
            ok: true,
            error: None,
        },
    )?;
    w.flush().map_err(WireError::Io)?;
    tracing::info!(source = %hello.name, resume = %hello.resume, "migration accepted");

    let mut buf = Vec::new();
    let mut have_state = false;
    let mut pages = 0u64;
    let zero = [0u8; PAGE_SIZE];
    loop {
        let kind = match r.read(&mut buf) {
            Ok(k) => k,
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ReceiveError::ClosedEarly)
            }
            Err(e) => return Err(e.into()),
        };
        update(dest.status(), |s| {
            s.bytes_sent = r.bytes;
            s.total_ms = started.elapsed().as_millis() as u64;
        });
        match kind {
            Kind::Pages => {
                populate(dest.mem(), &buf);
                for page in wire::pages(&buf) {
                    let (addr, data) = page?;
                    pages += 1;
                    dest.mem()
                        .write_slice(data.unwrap_or(&zero), GuestAddress(addr))
                        .map_err(|e| ReceiveError::PageOutside(addr, e))?;
                }
                update(dest.status(), |s| s.pages_sent = pages);
            }
            Kind::Sync => {
                wire::write_frame(w, Kind::Synced, &[])?;
                w.flush().map_err(WireError::Io)?;
            }
            Kind::Progress => {
                let p: Progress = wire::json(kind, &buf)?;
                update(dest.status(), |s| {
                    s.iteration = p.iteration;
                    s.bytes_remaining = p.bytes_remaining;
                });
            }
            Kind::State => {
                update(dest.status(), |s| s.phase = Phase::Stopcopy);
                let loaded = dest.load_state(std::mem::take(&mut buf));
                let reply = Reply {
                    ok: loaded.is_ok(),
                    error: loaded.as_ref().err().map(|e| error_chain(e)),
                };
                wire::write_json(w, Kind::Ready, &reply)?;
                w.flush().map_err(WireError::Io)?;
                loaded?;
                have_state = true;
            }
            Kind::Commit => {
                if !have_state {
                    return Err(ReceiveError::CommitBeforeState);
                }
                vmhop_common::faults::point("incoming.commit");
                let c: Commit = wire::json(kind, &buf)?;
                // The guest is ours now (unless the loop could not take it); what follows is
                // only the answer: RESUMED once it runs (auto), COMMITTED once it waits for
                // its resume (wait), which the source needs before it tells its caller that the
                // guest was handed over.
                let answer = match (dest.commit(c, auto), auto) {
                    (Some(done), true) => wire::write_json(
                        w,
                        Kind::Resumed,
                        &Resumed {
                            resumed_at_us: done.resumed_at_us,
                        },
                    ),
                    (Some(_), false) => wire::write_json(
                        w,
                        Kind::Committed,
                        &Reply {
                            ok: true,
                            error: None,
                        },
                    ),
                    (None, _) => {
                        tracing::error!("the VM did not confirm that it took the guest");
                        wire::write_json(
                            w,
                            Kind::Committed,
                            &Reply {
                                ok: false,
                                error: Some("the destination VM did not take the guest".into()),
                            },
                        )
                    }
                };
                if let Err(e) = answer.and_then(|()| w.flush().map_err(WireError::Io)) {
                    tracing::warn!(error = %error_chain(&e),
                        "the answer to COMMIT did not reach the source");
                }
                return Ok(());
            }
            Kind::Abort => {
                let why: Reply = wire::json(kind, &buf)?;
                return Err(ReceiveError::SourceAborted(why.error.unwrap_or_default()));
            }
            other => return Err(WireError::Unexpected(other, "during the transfer").into()),
        }
    }
}

/// Has the kernel put in the guest pages a PAGES payload is about to write, one call per run
/// of consecutive pages with data, rather than a fault per page on its first write (a trap,
/// then the allocation and zeroing, which stay). Measured on the development hosts: faults
/// took about half of this thread's time in a full pass, and filling 1 GiB of a fresh memfd
/// took 1.0 s of CPU page by page, 0.8 s populated a MiB at a time. Only a hint: a page it
/// leaves out (an address outside guest memory, a kernel without it) is faulted in by the
/// write, or refused there.
fn populate(mem: &GuestMem, payload: &[u8]) {
    let mut run: Option<(u64, u64)> = None;
    let entries = wire::pages(payload).filter_map(|p| match p {
        Ok((addr, Some(_))) => Some(addr),
        _ => None,
    });
    for addr in entries.map(Some).chain([None]) {
        match (run, addr) {
            (Some((start, end)), Some(a)) if a == end => {
                run = Some((start, end + PAGE_SIZE as u64))
            }
            _ => {
                if let Some((start, end)) = run {
                    populate_range(mem, start, (end - start) as usize);
                }
                run = addr.map(|a| (a, a + PAGE_SIZE as u64));
            }
        }
    }
}

/// See [`populate`]: `len` bytes of guest memory from `addr`, if they lie in one region.
fn populate_range(mem: &GuestMem, addr: u64, len: usize) {
    let Ok(slice) = mem.get_slice(GuestAddress(addr), len) else {
        return;
    };
    let ptr = slice.ptr_guard_mut();
    // SAFETY: the range lies in one mapping of guest memory, which `mem` keeps mapped.
    // MADV_POPULATE_WRITE allocates and maps the pages that are not there yet and changes no
    // byte of them (a missing page of the memfd reads as zero before and after); it fails
    // harmlessly on a kernel without it.
    unsafe {
        libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use crate::migration::wire::PageBatch;

    struct Dest {
        shape: Shape,
        mem: Arc<GuestMem>,
        status: SharedStatus,
    }

    impl Incoming for Dest {
        fn shape(&self) -> &Shape {
            &self.shape
        }
        fn mem(&self) -> &GuestMem {
            &self.mem
        }
        fn status(&self) -> &SharedStatus {
            &self.status
        }
        fn load_state(&mut self, _state: Vec<u8>) -> Result<(), ReceiveError> {
            Ok(())
        }
        fn commit(&mut self, _c: Commit, _auto: bool) -> Option<CommitDone> {
            Some(CommitDone { resumed_at_us: 0 })
        }
    }

    fn dest() -> Dest {
        let (mem, _file) = create_guest_memory(2).unwrap();
        Dest {
            shape: Shape {
                memory_mib: 2,
                vcpus: 1,
                disks: 0,
            },
            mem,
            status: SharedStatus::default(),
        }
    }

    /// A stream's preamble and HELLO for `d`.
    fn start(d: &Dest) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_preamble(&mut out).unwrap();
        let hello = Hello {
            name: "test".into(),
            shape: d.shape.clone(),
            resume: super::super::ResumeMode::Auto,
        };
        wire::write_json(&mut out, Kind::Hello, &hello).unwrap();
        out
    }

    fn page_at(d: &Dest, addr: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        d.mem.read_slice(&mut p, GuestAddress(addr)).unwrap();
        p
    }

    #[test]
    fn pages_land_at_their_addresses_and_a_corrupt_frame_is_refused() {
        let mut d = dest();
        d.mem
            .write_slice(&[3u8; PAGE_SIZE], GuestAddress(0x3000))
            .unwrap();
        let mut out = start(&d);
        let mut b = PageBatch::new(1 << 20);
        b.push(0x2000, &[7u8; PAGE_SIZE]);
        b.push_zero(0x3000);
        b.push(0x1f_f000, &[9u8; PAGE_SIZE]);
        b.flush(&mut out).unwrap();
        let good = out.len();
        b.push(0x5000, &[1u8; PAGE_SIZE]);
        b.flush(&mut out).unwrap();
        out[good + 100] ^= 0x40;

        let mut answers = Vec::new();
        let e = receive_stream(&out[..], &mut answers, &mut d).unwrap_err();
        assert!(matches!(
            e,
            ReceiveError::Wire(WireError::Checksum(2, Kind::Pages, ..))
        ));
        assert!(error_chain(&e).contains("checksum"), "{}", error_chain(&e));
        assert_eq!(page_at(&d, 0x2000), vec![7u8; PAGE_SIZE]);
        assert_eq!(page_at(&d, 0x3000), vec![0u8; PAGE_SIZE]);
        assert_eq!(page_at(&d, 0x1f_f000), vec![9u8; PAGE_SIZE]);
        // Nothing of the corrupt frame reached guest memory.
        assert_eq!(page_at(&d, 0x5000), vec![0u8; PAGE_SIZE]);
    }

    /// Whether the page of guest memory at `addr` is in memory (in the memfd).
    fn resident(d: &Dest, addr: u64) -> bool {
        let slice = d.mem.get_slice(GuestAddress(addr), PAGE_SIZE).unwrap();
        let mut v = [0u8; 1];
        // SAFETY: a page-aligned page of a mapping `d.mem` holds; mincore writes one byte.
        let r = unsafe {
            libc::mincore(
                slice.ptr_guard().as_ptr() as *mut _,
                PAGE_SIZE,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        v[0] & 1 == 1
    }

    #[test]
    fn populating_a_frame_puts_its_pages_in_and_changes_no_byte() {
        let d = dest();
        d.mem
            .write_slice(&[0xaa; PAGE_SIZE], GuestAddress(0x2000))
            .unwrap();
        let mut out = Vec::new();
        let mut b = PageBatch::new(1 << 20);
        for addr in [0x1000, 0x2000, 0x3000, 0x8000, 2 << 20] {
            b.push(addr, &[1u8; PAGE_SIZE]);
        }
        b.push_zero(0x9000);
        b.flush(&mut out).unwrap();
        let payload = &out[wire::FRAME_HEADER..];
        assert!(!resident(&d, 0x8000));
        populate(&d.mem, payload);
        for addr in [0x1000, 0x2000, 0x3000, 0x8000] {
            assert!(resident(&d, addr), "{addr:#x}");
        }
        assert!(!resident(&d, 0x9000));
        assert_eq!(page_at(&d, 0x2000), vec![0xaa; PAGE_SIZE]);
        assert_eq!(page_at(&d, 0x3000), vec![0; PAGE_SIZE]);
    }

    #[test]
    fn a_page_outside_guest_memory_is_refused() {
        let mut d = dest();
        let mut out = start(&d);
        let mut b = PageBatch::new(1 << 20);
        b.push(2 << 20, &[7u8; PAGE_SIZE]);
        b.flush(&mut out).unwrap();
        let e = receive_stream(&out[..], &mut Vec::new(), &mut d).unwrap_err();
        assert!(
            matches!(e, ReceiveError::PageOutside(0x20_0000, _)),
            "{e:?}"
        );
    }
}
