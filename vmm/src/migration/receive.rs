//! The destination side: `vmm run --incoming ADDR:PORT` builds the VM without booting it,
//! listens, and this thread receives one stream into guest memory. The state and the
//! hand-over go through the VM loop ([`crate::vm::VmEvent::IncomingState`],
//! [`crate::vm::VmEvent::IncomingCommit`]); a stream that fails before COMMIT ends the process
//! ([`crate::vm::VmEvent::IncomingFailed`]): the source still has the guest.

use super::wire::{self, Commit, Hello, Kind, Progress, Reply, Resumed, WireError};
use super::{update, Phase, SharedStatus};
use crate::memory::{GuestMem, PAGE_SIZE};
use crate::persist::Shape;
use crate::vm::VmEvent;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// How long the VM loop may take to load the state or resume.
const LOOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of each read once a source is connected.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// What the destination thread needs.
pub struct DestCtx {
    /// Bound before the VMM reports ready.
    pub listener: TcpListener,
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

/// Receives one migration.
pub fn run(ctx: DestCtx) {
    if let Err(e) = receive(&ctx) {
        update(&ctx.status, |s| {
            s.phase = Phase::Failed;
            s.error = Some(e.clone());
        });
        let _ = ctx.events.send(VmEvent::IncomingFailed(e));
    }
}

fn refuse(w: &mut TcpStream, why: &str) {
    let _ = wire::write_json(
        w,
        Kind::Reply,
        &Reply {
            ok: false,
            error: Some(why.to_string()),
        },
    );
    let _ = w.flush();
}

fn receive(ctx: &DestCtx) -> Result<(), String> {
    let (mut w, peer) = ctx
        .listener
        .accept()
        .map_err(|e| format!("accept a migration stream: {e}"))?;
    let started = Instant::now();
    tracing::info!(%peer, "migration stream connected");
    let io = |e: std::io::Error| format!("migration stream: {e}");
    w.set_nodelay(true).map_err(io)?;
    w.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    w.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut r = wire::FrameReader::new(BufReader::with_capacity(
        2 << 20,
        w.try_clone().map_err(io)?,
    ));
    let we = |e: WireError| vmhop_common::error::chain(&e);
    update(&ctx.status, |s| {
        s.role = super::MigrationRole::Destination;
        s.phase = Phase::Precopy;
    });

    if let Err(e) = wire::read_preamble(r.get_mut()) {
        let msg = we(e);
        refuse(&mut w, &msg);
        return Err(msg);
    }
    let hello: Hello = r.read_json(Kind::Hello, "expected HELLO").map_err(we)?;
    if hello.shape != ctx.shape {
        let msg = format!(
            "the source VM {:?} is {:?}; this VM is {:?}",
            hello.name, hello.shape, ctx.shape
        );
        refuse(&mut w, &msg);
        return Err(msg);
    }
    let auto = hello.resume == super::ResumeMode::Auto;
    wire::write_json(
        &mut w,
        Kind::Reply,
        &Reply {
            ok: true,
            error: None,
        },
    )
    .map_err(we)?;
    tracing::info!(source = %hello.name, resume = %hello.resume, "migration accepted");

    let mut buf = Vec::new();
    let mut have_state = false;
    let mut pages = 0u64;
    let zero = [0u8; PAGE_SIZE];
    loop {
        let kind = match r.read(&mut buf) {
            Ok(k) => k,
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err("the source closed the stream before the hand-over".into())
            }
            Err(e) => return Err(we(e)),
        };
        update(&ctx.status, |s| {
            s.bytes_sent = r.bytes;
            s.total_ms = started.elapsed().as_millis() as u64;
        });
        match kind {
            Kind::Pages => {
                wire::parse_pages(&buf, |addr, data| {
                    pages += 1;
                    ctx.mem
                        .write_slice(data.unwrap_or(&zero), GuestAddress(addr))
                        .map_err(|e| format!("page {addr:#x} outside guest memory: {e}"))
                })
                .map_err(|e| format!("migration stream corrupt: PAGES frame: {e}"))?;
                update(&ctx.status, |s| s.pages_sent = pages);
            }
            Kind::Sync => {
                wire::write_frame(&mut w, Kind::Synced, &[]).map_err(we)?;
            }
            Kind::Progress => {
                let p: Progress = wire::json(kind, &buf).map_err(we)?;
                update(&ctx.status, |s| {
                    s.iteration = p.iteration;
                    s.bytes_remaining = p.bytes_remaining;
                });
            }
            Kind::State => {
                update(&ctx.status, |s| s.phase = Phase::Stopcopy);
                let (tx, rx) = std::sync::mpsc::channel();
                ctx.events
                    .send(VmEvent::IncomingState(std::mem::take(&mut buf), tx))
                    .map_err(|_| "the VM is shutting down".to_string())?;
                let loaded = rx
                    .recv_timeout(LOOP_TIMEOUT)
                    .unwrap_or_else(|_| Err("the VM did not load the state in time".into()));
                let reply = Reply {
                    ok: loaded.is_ok(),
                    error: loaded.clone().err(),
                };
                wire::write_json(&mut w, Kind::Ready, &reply).map_err(we)?;
                loaded.map_err(|e| format!("load the VM state: {e}"))?;
                have_state = true;
            }
            Kind::Commit => {
                if !have_state {
                    return Err("migration stream: COMMIT before STATE".into());
                }
                let c: Commit = wire::json(kind, &buf).map_err(we)?;
                let (tx, rx) = std::sync::mpsc::channel();
                ctx.events
                    .send(VmEvent::IncomingCommit(c, auto, tx))
                    .map_err(|_| "the VM is shutting down".to_string())?;
                // The guest is ours now; what follows is only reporting.
                if let Ok(Ok(done)) = rx.recv_timeout(LOOP_TIMEOUT) {
                    if auto {
                        let _ = wire::write_json(
                            &mut w,
                            Kind::Resumed,
                            &Resumed {
                                resumed_at_us: done.resumed_at_us,
                            },
                        );
                    }
                }
                return Ok(());
            }
            Kind::Abort => {
                let why: Reply = wire::json(kind, &buf).map_err(we)?;
                return Err(format!(
                    "the source aborted the migration: {}",
                    why.error.unwrap_or_default()
                ));
            }
            other => return Err(we(WireError::Unexpected(other, "during the transfer"))),
        }
    }
}
