//! The memory workload: threads that rewrite a buffer with a sequence-numbered pattern,
//! checking every word before they overwrite it, and timing each page step with the TSC.

use crate::sys::{self, Region};
use guest_agent::{pattern, thread_range, WORDS_PER_MIB};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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
    progress: Vec<Mutex<Progress>>,
    cpus: Vec<AtomicU64>,
}

/// A running memory workload.
pub struct Memory {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    _region: Arc<Region>,
    calib_tsc: u64,
    calib_ns: u64,
}

impl Memory {
    /// Maps and touches `mib` MiB, then starts `threads` writer threads pinned one per CPU.
    pub fn start(mib: usize, threads: usize) -> std::io::Result<Memory> {
        let region = Arc::new(Region::populated(mib * WORDS_PER_MIB * 8)?);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            max_gap_tsc: AtomicU64::new(0),
            progress: (0..threads)
                .map(|_| Mutex::new(Progress::default()))
                .collect(),
            cpus: (0..threads).map(|_| AtomicU64::new(u64::MAX)).collect(),
        });
        let cpus = sys::cpu_count();
        let mut handles = Vec::new();
        for t in 0..threads {
            let range = thread_range(region.words(), threads, t);
            let (shared, region) = (shared.clone(), region.clone());
            handles.push(std::thread::spawn(move || {
                if threads > 1 {
                    // Best effort: one thread per CPU is what "both CPUs run it" means.
                    let _ = sys::pin_to_cpu(t % cpus);
                }
                shared.cpus[t].store(sys::current_cpu() as u64, Ordering::Relaxed);
                // SAFETY: thread_range gives each thread a disjoint range.
                let words = unsafe { region.slice(range.clone()) };
                run(&shared, t, words, range.start as u64);
            }));
        }
        Ok(Memory {
            shared,
            threads: handles,
            _region: region,
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
            .map(|p| *p.lock().unwrap())
            .collect();
        let seqs: Vec<String> = progress.iter().map(|p| p.seq.to_string()).collect();
        let cpus: Vec<String> = self
            .shared
            .cpus
            .iter()
            .map(|c| c.load(Ordering::Relaxed).to_string())
            .collect();
        let checksum = progress
            .iter()
            .fold(0u64, |a, p| a.wrapping_add(p.checksum));
        let gap = self.shared.max_gap_tsc.swap(0, Ordering::Relaxed);
        format!(
            "mem seq={} seqs={} cpus={} errors={} checksum=0x{:x} maxgap_us={}",
            progress.iter().map(|p| p.seq).min().unwrap_or(0),
            seqs.join(","),
            cpus.join(","),
            self.shared.errors.load(Ordering::Relaxed),
            checksum,
            self.tsc_to_us(gap),
        )
    }

    /// Converts TSC ticks to microseconds using the rate seen since the workload started.
    fn tsc_to_us(&self, ticks: u64) -> u64 {
        let dt = sys::rdtsc().wrapping_sub(self.calib_tsc);
        let dns = sys::clock_ns(libc::CLOCK_MONOTONIC).saturating_sub(self.calib_ns);
        if dt == 0 || dns == 0 {
            return 0;
        }
        ((ticks as u128 * dns as u128) / (dt as u128 * 1000)) as u64
    }

    /// Stops the threads and returns the final status.
    pub fn stop(mut self) -> String {
        self.shared.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let seq = self
            .shared
            .progress
            .iter()
            .map(|p| p.lock().unwrap().seq)
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
            // A TSC that went backwards (a restored guest on another host) is not a gap.
            if gap < u64::MAX / 2 {
                shared.max_gap_tsc.fetch_max(gap, Ordering::Relaxed);
            }
            last = now;
        }
        if errors > 0 {
            shared.errors.fetch_add(errors, Ordering::Relaxed);
        }
        *shared.progress[t].lock().unwrap() = Progress { seq, checksum: sum };
        seq += 1;
    }
}
