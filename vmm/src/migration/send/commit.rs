//! The hand-over: COMMIT gives the guest to the destination. With `wait` the destination
//! answers COMMITTED once its VM holds the guest and waits for its resume; with `auto` its
//! RESUMED says when the guest ran there (the end of the downtime).
//!
//! COMMIT goes right behind STATE, without waiting for READY, which saves the pause a round
//! trip: the destination reads its frames in order and reads COMMIT only after it loaded the
//! state and said so; one whose load failed answers READY with the reason and exits without
//! reading further. So a READY that says "not loaded" still leaves the guest here
//! ([`SendError::NotLoaded`]).
//!
//! From the first byte of COMMIT on, the source cannot know by itself where the guest is: a
//! COMMIT that reached the destination may have been acted on there even if the source saw the
//! stream fail. So a failure from here on never resumes the guest here
//! ([`SendError::Unconfirmed`] makes the outcome [`Outcome::Undecided`](super::Outcome)): it
//! stays paused until the caller, having made sure that the destination cannot run it (with
//! storaged, for migrated), takes it back with `POST /v1/migration/abort`. With `wait` the guest
//! counts as handed over only once COMMITTED confirmed it.

use super::handshake::Link;
use super::stopcopy::Stopped;
use super::{check_abort, SendError, SourceCtx};
use crate::migration::wire::{self, Commit, Kind, Reply, Resumed};
use crate::migration::{update, Phase, ResumeMode};
use std::time::{Duration, Instant};

/// How long the destination may take to confirm COMMIT (its VM loop only takes the guest: the
/// state is loaded already). The guest is paused meanwhile.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends COMMIT, waits for the destination's answer and reports the final figures. `started`
/// and `started_at_us` are when the migration began (monotonic, and wall-clock for the
/// destination).
pub(super) fn run(
    ctx: &SourceCtx,
    link: &mut Link,
    stopped: Stopped,
    started: Instant,
    started_at_us: u64,
) -> Result<(), SendError> {
    check_abort(ctx)?;
    let Stopped {
        paused_at_us,
        paused,
        sent,
    } = stopped;
    let commit = Commit {
        paused_at_us,
        started_at_us,
    };
    let unconfirmed = |e: SendError| SendError::Unconfirmed(Box::new(e));
    wire::write_json(&mut link.w, Kind::Commit, &commit).map_err(|e| unconfirmed(e.into()))?;
    link.flush().map_err(unconfirmed)?;
    let ready: Reply = link
        .reader
        .read_json(Kind::Ready, "answer to STATE")
        .map_err(|e| unconfirmed(e.into()))?;
    tracing::info!(
        loaded_us = paused.elapsed().as_micros() as u64,
        ok = ready.ok,
        "migration: the destination loaded the state"
    );
    if !ready.ok {
        return Err(SendError::NotLoaded(ready.error.unwrap_or_default()));
    }
    let auto = ctx.params.resume == ResumeMode::Auto;
    if !auto {
        // The destination's VM loop answers at once; a destination that does not may be gone
        // or may hold the guest: undecided either way.
        if let Ok(slot) = ctx.stream.lock() {
            if let Some(tcp) = slot.as_ref() {
                tcp.set_read_timeout(Some(COMMIT_TIMEOUT))
                    .map_err(|e| unconfirmed(SendError::Stream(e)))?;
            }
        }
        let reply: Reply = link
            .reader
            .read_json(Kind::Committed, "answer to COMMIT")
            .map_err(|e| unconfirmed(e.into()))?;
        if !reply.ok {
            return Err(unconfirmed(SendError::NotCommitted(
                reply.error.unwrap_or_default(),
            )));
        }
    }
    // From here on the guest is the destination's: nothing below may resume it here. With
    // `resume: auto` the phase becomes `completed` only with the destination's answer, so that
    // whoever sees `completed` sees the downtime too.
    update(&ctx.status, |s| {
        s.phase = Phase::HandedOver;
        s.bytes_sent = sent;
        s.bytes_remaining = 0;
        s.total_ms = started.elapsed().as_millis() as u64;
    });
    if !auto {
        tracing::info!(
            bytes = sent,
            total_ms = started.elapsed().as_millis() as u64,
            "migration handed over; the destination waits for its resume"
        );
        return Ok(());
    }
    match link
        .reader
        .read_json::<Resumed>(Kind::Resumed, "answer to COMMIT")
    {
        Ok(r) => {
            let us = r.resumed_at_us.saturating_sub(paused_at_us);
            update(&ctx.status, |s| {
                s.phase = Phase::Completed;
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
        Err(e) => {
            update(&ctx.status, |s| {
                s.phase = Phase::Completed;
                s.total_ms = started.elapsed().as_millis() as u64;
            });
            tracing::warn!(
                error = %vmhop_common::error::chain(&e),
                "migration handed over, but the destination did not report its resume"
            )
        }
    }
    Ok(())
}
