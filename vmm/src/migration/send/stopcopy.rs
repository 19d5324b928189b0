//! The stop-and-copy: the destination catches up (SYNC), the VM loop pauses the guest and saves
//! its state, and the last dirty pages and the STATE go out; COMMIT follows at once and the
//! destination's READY is read with it (see [`super::commit`]).

use super::handshake::Link;
use super::pages::send_pages;
use super::precopy::Precopy;
use super::{check_abort, SendError, SourceCtx};
use crate::memory::PAGE_SIZE;
use crate::migration::wire::{self, Kind, WireError, FRAME_HEADER};
use crate::migration::{update, Phase};
use crate::vm::VmEvent;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// How long the VM loop may take to pause, drain and save.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How often an abort is looked for while the VM loop works.
const ABORT_POLL: Duration = Duration::from_millis(100);

/// The guest is paused here and its last pages and state are on their way.
pub(super) struct Stopped {
    /// Wall-clock microseconds when the last vCPU paused.
    pub paused_at_us: u64,
    /// When this thread had the VM loop's answer that the guest is paused.
    pub paused: Instant,
    /// Bytes sent in all.
    pub sent: u64,
}

/// Runs the stop-and-copy after pre-copy.
pub(super) fn run(ctx: &SourceCtx, link: &mut Link, pre: Precopy) -> Result<Stopped, SendError> {
    let Precopy {
        mut pending,
        mut sent,
        iterations,
    } = pre;
    // Let the destination work off what is still in flight before the guest stops, so that
    // the pause holds only the last dirty pages and the state.
    wire::write_frame(&mut link.w, Kind::Sync, &[])?;
    link.flush()?;
    let mut buf = Vec::new();
    match link.reader.read(&mut buf)? {
        Kind::Synced => {}
        other => return Err(WireError::Unexpected(other, "answer to SYNC").into()),
    }
    tracing::info!(
        iterations,
        remaining = pending.count() * PAGE_SIZE as u64,
        "migration: stop and copy"
    );

    let (tx, rx) = std::sync::mpsc::channel();
    ctx.events
        .send(VmEvent::MigrationStop(tx))
        .map_err(|_| SendError::VmGone)?;
    let asked = Instant::now();
    let stop = loop {
        match rx.recv_timeout(ABORT_POLL) {
            Ok(r) => break r.map_err(SendError::Stop)?,
            Err(RecvTimeoutError::Timeout) if asked.elapsed() < STOP_TIMEOUT => check_abort(ctx)?,
            Err(_) => return Err(SendError::StopTimeout),
        }
    };
    let paused = Instant::now();
    update(&ctx.status, |s| {
        s.phase = Phase::Stopcopy;
        s.iteration = iterations;
    });
    let last = ctx.dirty.fetch_and_clear().map_err(SendError::DirtyLog)?;
    pending.merge(&last);
    let final_bytes = send_pages(ctx, &mut link.w, &pending)?;
    sent += final_bytes;
    wire::write_frame(&mut link.w, Kind::State, &stop.state)?;
    sent += (FRAME_HEADER + stop.state.len()) as u64;
    link.flush()?;
    tracing::info!(
        pages_bytes = final_bytes,
        state_bytes = stop.state.len(),
        sent_us = paused.elapsed().as_micros() as u64,
        "migration: stop-and-copy sent"
    );
    Ok(Stopped {
        paused_at_us: stop.paused_at_us,
        paused,
        sent,
    })
}
