//! The hand-over: COMMIT gives the guest to the destination; with `auto` its RESUMED says
//! when the guest ran there (the end of the downtime).

use super::handshake::Link;
use super::stopcopy::Stopped;
use super::{check_abort, SendError, SourceCtx};
use crate::migration::wire::{self, Commit, Kind, Resumed};
use crate::migration::{update, Phase, ResumeMode};
use std::time::Instant;

/// Sends COMMIT and reports the final figures. `started` and `started_at_us` are when the
/// migration began (monotonic, and wall-clock for the destination).
pub(super) fn run(
    ctx: &SourceCtx,
    link: &mut Link,
    stopped: Stopped,
    started: Instant,
    started_at_us: u64,
) -> Result<(), SendError> {
    check_abort(ctx)?;
    let Stopped { paused_at_us, sent } = stopped;
    let commit = Commit {
        paused_at_us,
        started_at_us,
    };
    wire::write_json(&mut link.w, Kind::Commit, &commit)?;
    link.flush()?;
    // From here on the guest is the destination's: nothing below may resume it here.
    let auto = ctx.params.resume == ResumeMode::Auto;
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
    Ok(())
}
