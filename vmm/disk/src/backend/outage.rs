//! Holding guest I/O while storaged cannot be reached.
//!
//! A storaged that restarts (an upgrade, a crash under systemd) or a network that drops for a
//! moment must not turn into I/O errors in the guest, whose file systems take those badly
//! (ext4 remounts read-only). So when a reconnect finds no storaged, the requests that need
//! it wait and the reconnect is retried, with backoff, for the disk's hold window
//! (`io_hold_secs`); only then do they fail. An outage starts at the first failed reconnect
//! and ends at the next successful one; the log says when guest I/O starts being held, how
//! long it was held, and when the window ran out.
//!
//! Once the window has run out, requests fail after one attempt each (a request that waited
//! while another one's attempt failed fails at once), until a reconnect succeeds again.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use storaged_client::nbd::ClientError;
use tokio::sync::watch;

/// First pause between reconnects while holding; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between reconnects while holding.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The current outage.
#[derive(Debug, Default)]
struct State {
    /// When the first reconnect of the outage failed.
    since: Option<Instant>,
    /// The window ran out (said once per outage).
    gave_up: bool,
    /// The last failure, for requests that fail without an attempt of their own.
    last: String,
}

/// A disk's outages.
#[derive(Debug)]
pub(super) struct Outage {
    window: Duration,
    state: Mutex<State>,
    /// Failed reconnects so far.
    attempts: watch::Sender<u64>,
}

/// What to do after a failed reconnect.
pub(super) enum Next {
    /// Hold on: try again after this pause.
    Retry(Duration),
    /// Fail the request.
    GiveUp,
}

impl Outage {
    /// No outage yet; requests are held for `window` once one starts.
    pub(super) fn new(window: Duration) -> Outage {
        Outage {
            window,
            state: Mutex::new(State::default()),
            attempts: watch::Sender::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain data, replaced field by field; a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Failed reconnects so far (a request notes it before it waits for the reconnect lock).
    pub(super) fn attempts(&self) -> u64 {
        *self.attempts.borrow()
    }

    /// Follows the failed reconnects (for tests that act once the disk holds I/O).
    #[cfg(test)]
    pub(super) fn watch(&self) -> watch::Receiver<u64> {
        self.attempts.subscribe()
    }

    /// For a request that waited for the reconnect lock since `seen` attempts: the error to
    /// fail it with, without an attempt of its own, when the window has run out and another
    /// request's attempt failed meanwhile.
    pub(super) fn failed_meanwhile(&self, seen: u64) -> Option<ClientError> {
        let st = self.state();
        (st.gave_up && self.attempts() != seen).then(|| ClientError::Unreachable {
            attempts: 0,
            last: st.last.clone(),
        })
    }

    /// A reconnect failed with `e`, which means storaged did not answer: whether to hold on.
    /// `backoff` is the pause before this attempt (zero for the first).
    pub(super) fn failed(&self, volume: &str, e: &ClientError, backoff: Duration) -> Next {
        self.attempts.send_modify(|n| *n += 1);
        let mut st = self.state();
        st.last = e.to_string();
        let since = *st.since.get_or_insert_with(|| {
            tracing::warn!(volume, error = %e, hold_s = self.window.as_secs(),
                "storaged cannot be reached; holding guest I/O until it is back");
            Instant::now()
        });
        let left = self.window.saturating_sub(since.elapsed());
        if left.is_zero() || st.gave_up {
            if !st.gave_up {
                tracing::error!(volume, error = %e, held_s = self.window.as_secs(),
                    "storaged still cannot be reached; guest I/O fails until it is back");
                st.gave_up = true;
            }
            return Next::GiveUp;
        }
        let next = if backoff.is_zero() {
            FIRST_BACKOFF
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        Next::Retry(next.min(left))
    }

    /// A reconnect succeeded: the outage, if there was one, is over. Returns how long guest
    /// I/O was held.
    pub(super) fn end(&self) -> Option<Duration> {
        let mut st = self.state();
        st.gave_up = false;
        st.since.take().map(|s| s.elapsed())
    }

    /// How long one request may keep being retried on new connections.
    pub(super) fn window(&self) -> Duration {
        self.window
    }
}

/// Whether a failed connect means storaged did not answer (hold on) rather than an answer
/// (a refusal, final).
pub(super) fn is_unreachable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Unreachable { .. } | ClientError::Io(_) | ClientError::Disconnected
    )
}
