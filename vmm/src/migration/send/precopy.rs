//! Pre-copy, beside the running guest: KVM's dirty log on, the full pass, then rounds of the
//! pages dirtied meanwhile until [`decide`] says the rest goes in the stop-and-copy.

use super::handshake::Link;
use super::pages::{full_pass, send_pages};
use super::throttle::Throttle;
use super::{check_abort, SendError, SourceCtx};
use crate::memory::PAGE_SIZE;
use crate::migration::dirty::DirtyPages;
use crate::migration::wire::{self, Kind, Progress};
use crate::migration::{update, SendParams};
use std::time::{Duration, Instant};

/// A rest this small goes in the stop-and-copy without another round.
const SMALL_REST: u64 = 256 << 10;

/// Where pre-copy left off.
pub(super) struct Precopy {
    /// Pages dirtied in the last round fetched, not sent yet.
    pub pending: DirtyPages,
    /// Bytes sent so far.
    pub sent: u64,
    /// Rounds fetched.
    pub iterations: u64,
}

/// Turns the dirty log on and runs the full pass and the rounds.
pub(super) fn run(
    ctx: &SourceCtx,
    link: &mut Link,
    started: Instant,
) -> Result<Precopy, SendError> {
    let p = &ctx.params;
    ctx.dirty.start().map_err(SendError::DirtyLogStart)?;
    let mut sent = 0u64;
    // The dirty log runs from here: the first fetch holds what the guest wrote during the pass.
    let t = Instant::now();
    sent += full_pass(ctx, &mut link.w)?;
    link.flush()?;
    let mut send_rate = rate(sent, t.elapsed());
    tracing::info!(
        bytes = sent,
        ms = t.elapsed().as_millis() as u64,
        "migration: full pass sent"
    );

    let throttle = Throttle::start(ctx.kickers.clone());
    let mut iteration = 0u64;
    let mut last_fetch = t;
    let mut prev_bytes: Option<u64> = None;
    let pending = loop {
        check_abort(ctx)?;
        let dirty = ctx.dirty.fetch_and_clear().map_err(SendError::DirtyLog)?;
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
            &mut link.w,
            Kind::Progress,
            &Progress {
                iteration,
                bytes_remaining: bytes,
            },
        )?;
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
            Next::StopAndCopy => break dirty,
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
        let n = send_pages(ctx, &mut link.w, &dirty)?;
        link.flush()?;
        sent += n;
        send_rate = send_rate.max(1) / 2 + rate(n, t.elapsed()) / 2;
        update(&ctx.status, |s| s.bytes_sent = sent);
    };
    throttle.stop();
    Ok(Precopy {
        pending,
        sent,
        iterations: iteration,
    })
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

/// Bytes per second.
fn rate(bytes: u64, d: Duration) -> u64 {
    (bytes as u128 * 1_000_000 / d.as_micros().max(1)) as u64
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
            resume: crate::migration::ResumeMode::Auto,
            destination_host: None,
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
