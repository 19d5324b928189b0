//! The pre-copy throttle: a thread that holds every vCPU out of the guest for a share of each
//! [`THROTTLE_PERIOD`], so that a guest dirtying memory faster than the link carries it
//! slows down enough for pre-copy to converge. Pre-copy raises it a step per round
//! ([`super::precopy`] decides when).

use crate::vcpu::{VcpuCommand, VcpuKicker};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The throttle's period: each vCPU is held out of the guest for a share of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);
/// The first step, in percent of the period.
const FIRST_STEP: u64 = 30;
/// Each later step.
const STEP: u64 = 20;
/// The most the throttle takes.
const MAX_PERCENT: u64 = 90;

/// Holds every vCPU out of the guest for a share of each [`THROTTLE_PERIOD`].
pub(super) struct Throttle {
    percent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    /// Starts the thread at 0% (it only sleeps until [`Self::raise`]).
    pub(super) fn start(kickers: Vec<VcpuKicker>) -> Throttle {
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
    pub(super) fn raise(&self) -> u64 {
        let now = self.percent.load(Ordering::SeqCst);
        let next = if now == 0 {
            FIRST_STEP
        } else {
            (now + STEP).min(MAX_PERCENT)
        };
        self.percent.store(next, Ordering::SeqCst);
        next
    }

    /// Stops the thread: the vCPUs run at full speed again.
    pub(super) fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.end();
    }
}
