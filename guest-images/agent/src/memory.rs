//! The memory workload: threads that rewrite a buffer with a sequence-numbered pattern,
//! checking every word before they overwrite it, and timing each page step with the TSC.

use crate::rt::{self, SpinLock, Thread};
use crate::sys;
use agent_proto::{pattern, thread_range, WORDS_PER_MIB};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const WORDS_PER_PAGE: usize = 512;

/// What one thread has done so far.
#[derive(Default, Clone, Copy)]
struct Progress {
    seq: u64,
    checksum: u64,
}

struct Shared {
    stop: AtomicBool,
    errors: AtomicU64,
    max_gap_tsc: AtomicU64,
    progress: Vec<SpinLock<Progress>>,
    cpus: Vec<AtomicU64>,
}

/// A running memory workload.
pub struct Memory {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    calib_tsc: u64,
    calib_ns: u64,
}

impl Memory {
    /// Maps and touches `mib` MiB, then starts `threads` writer threads pinned one per CPU.
    pub fn start(mib: usize, threads: usize) -> sys::Result<Memory> {
        let buffer = sys::populated_words(mib * WORDS_PER_MIB)?;
        let words = buffer.len();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            max_gap_tsc: AtomicU64::new(0),
            progress: (0..threads)
                .map(|_| SpinLock::new(Progress::default()))
                .collect(),
            cpus: (0..threads).map(|_| AtomicU64::new(u64::MAX)).collect(),
        });
        let cpus = sys::cpus();
        let mut rest = buffer;
        let mut handles = Vec::new();
        for t in 0..threads {
            let range = thread_range(words, threads, t);
            let (mine, tail) = core::mem::take(&mut rest).split_at_mut(range.len());
            rest = tail;
            let shared = shared.clone();
            let cpu = cpus[t % cpus.len()];
            handles.push(rt::spawn(move || {
                if threads > 1 {
                    // Best effort: one thread per CPU is what "every CPU runs it" means.
                    let _ = sys::pin_to_cpu(cpu);
                }
                shared.cpus[t].store(sys::current_cpu() as u64, Ordering::Relaxed);
                run(&shared, t, mine, range.start as u64);
            }));
        }
        Ok(Memory {
            shared,
            threads: handles,
            calib_tsc: sys::rdtsc(),
            calib_ns: sys::clock_ns(libc::CLOCK_MONOTONIC),
        })
    }

    /// The status reply body; resets the maximum gap.
    pub fn status(&self) -> String {
        let progress: Vec<Progress> = self
            .shared
            .progress
            .iter()
            .map(|p| p.with(|p| *p))
            .collect();
        let list = |v: &mut dyn Iterator<Item = u64>| {
            v.map(|x| x.to_string()).collect::<Vec<_>>().join(",")
        };
        let checksum = progress
            .iter()
            .fold(0u64, |a, p| a.wrapping_add(p.checksum));
        let gap = self.shared.max_gap_tsc.swap(0, Ordering::Relaxed);
        format!(
            "mem seq={} seqs={} cpus={} errors={} checksum=0x{:x} maxgap_us={}",
            progress.iter().map(|p| p.seq).min().unwrap_or(0),
            list(&mut progress.iter().map(|p| p.seq)),
            list(&mut self.shared.cpus.iter().map(|c| c.load(Ordering::Relaxed))),
            self.shared.errors.load(Ordering::Relaxed),
            checksum,
            self.tsc_to_us(gap),
        )
    }

    /// Converts TSC ticks to microseconds using the rate seen since the workload started.
    fn tsc_to_us(&self, ticks: u64) -> u64 {
        let dt = sys::rdtsc().wrapping_sub(self.calib_tsc);
        let dns = sys::clock_ns(libc::CLOCK_MONOTONIC).saturating_sub(self.calib_ns);
        if dt == 0 || dns == 0 || dt > u64::MAX / 2 {
            return 0;
        }
        ((ticks as u128 * dns as u128) / (dt as u128 * 1000)) as u64
    }

    /// Stops the threads and returns the final status. The buffer stays mapped (see
    /// `sys::populated_words`).
    pub fn stop(self) -> String {
        self.shared.stop.store(true, Ordering::Relaxed);
        for h in self.threads {
            h.join();
        }
        let seq = self
            .shared
            .progress
            .iter()
            .map(|p| p.with(|p| p.seq))
            .min()
            .unwrap_or(0);
        format!(
            "mem stopped seq={seq} errors={}",
            self.shared.errors.load(Ordering::Relaxed)
        )
    }
}

/// One thread's loop: pass `seq` checks that each word holds `pattern(seq - 1)` and writes
/// `pattern(seq)`, page by page.
fn run(shared: &Shared, t: usize, words: &mut [u64], base: u64) {
    let mut seq = 1u64;
    let mut last = sys::rdtsc();
    while !shared.stop.load(Ordering::Relaxed) {
        let mut errors = 0u64;
        let mut sum = 0u64;
        for (p, page) in words.chunks_mut(WORDS_PER_PAGE).enumerate() {
            let first = base + (p * WORDS_PER_PAGE) as u64;
            for (i, w) in page.iter_mut().enumerate() {
                let index = first + i as u64;
                let old = *w;
                sum = sum.wrapping_add(old);
                if old != pattern(seq - 1, index) {
                    errors += 1;
                }
                *w = pattern(seq, index);
            }
            let now = sys::rdtsc();
            let gap = now.wrapping_sub(last);
            // A TSC that went backwards (a guest restored on another host) is not a gap.
            if gap < u64::MAX / 2 {
                shared.max_gap_tsc.fetch_max(gap, Ordering::Relaxed);
            }
            last = now;
        }
        if errors > 0 {
            shared.errors.fetch_add(errors, Ordering::Relaxed);
        }
        shared.progress[t].with(|p| *p = Progress { seq, checksum: sum });
        seq += 1;
    }
}
