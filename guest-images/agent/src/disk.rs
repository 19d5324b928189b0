//! The disk workload: append checksummed records to a block device with O_DIRECT, a batch per
//! write followed by fsync, and verify them.

use crate::rt::{self, Thread};
use crate::sys::{self, AlignedBuf, Fd};
use agent_proto::{Record, RECORD_SIZE};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// Records per write: 256 KiB, so that the per-syscall cost (milliseconds here) stays small.
const BATCH: usize = 64;
/// Records per read when scanning.
const SCAN_BATCH: usize = 256;

const RUNNING: u8 = 0;
const STOPPED: u8 = 1;
const FULL: u8 = 2;
const FAILED: u8 = 3;

struct Shared {
    stop: AtomicBool,
    acked: AtomicU64,
    state: AtomicU8,
}

/// A running disk writer.
pub struct Disk {
    shared: Arc<Shared>,
    thread: Thread,
}

fn open(dev: &str, write: bool) -> sys::Result<Fd> {
    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
    Fd::open(dev, mode | libc::O_DIRECT)
}

/// Result of scanning a device from its start.
pub struct Scan {
    /// Valid consecutive records from offset 0.
    pub valid: u64,
    /// Distinct writer boot ids among them.
    pub boot_ids: usize,
}

/// Counts the valid consecutive records at the start of the device.
pub fn scan(dev: &Fd) -> sys::Result<Scan> {
    let total = dev.block_device_size()? / RECORD_SIZE as u64;
    let mut buf = AlignedBuf::new(SCAN_BATCH * RECORD_SIZE);
    let mut seq = 0u64;
    let mut boot_ids: Vec<[u8; 16]> = Vec::new();
    while seq < total {
        let n = (total - seq).min(SCAN_BATCH as u64) as usize;
        dev.read_exact_at(&mut buf[..n * RECORD_SIZE], seq * RECORD_SIZE as u64)?;
        for chunk in buf[..n * RECORD_SIZE].chunks(RECORD_SIZE) {
            match Record::decode(chunk, seq) {
                Some(r) => {
                    if !boot_ids.contains(&r.boot_id) {
                        boot_ids.push(r.boot_id);
                    }
                    seq += 1;
                }
                None => {
                    return Ok(Scan {
                        valid: seq,
                        boot_ids: boot_ids.len(),
                    })
                }
            }
        }
    }
    Ok(Scan {
        valid: seq,
        boot_ids: boot_ids.len(),
    })
}

impl Disk {
    /// Opens `dev`, finds the end of the existing records and starts appending after them.
    pub fn start(dev: &str, boot_id: [u8; 16]) -> sys::Result<(Disk, u64)> {
        let file = open(dev, true)?;
        let next = scan(&file)?.valid;
        let total = file.block_device_size()? / RECORD_SIZE as u64;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(next),
            state: AtomicU8::new(RUNNING),
        });
        let s = shared.clone();
        let thread = rt::spawn(move || {
            let end = write_loop(&file, &s, next, total, boot_id);
            s.state.store(end, Ordering::Relaxed);
        });
        Ok((Disk { shared, thread }, next))
    }

    /// The status reply body.
    pub fn status(&self) -> String {
        let state = match self.shared.state.load(Ordering::Relaxed) {
            RUNNING => "running",
            STOPPED => "stopped",
            FULL => "full",
            _ => "failed",
        };
        format!(
            "disk state={state} acked={}",
            self.shared.acked.load(Ordering::Relaxed)
        )
    }

    /// Stops the writer after its current batch and returns the number of durable records.
    pub fn stop(self) -> u64 {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.thread.join();
        self.shared.acked.load(Ordering::Relaxed)
    }
}

fn write_loop(file: &Fd, shared: &Shared, mut next: u64, total: u64, boot_id: [u8; 16]) -> u8 {
    let mut buf = AlignedBuf::new(BATCH * RECORD_SIZE);
    while !shared.stop.load(Ordering::Relaxed) {
        if next >= total {
            return FULL;
        }
        let n = (total - next).min(BATCH as u64) as usize;
        for (i, chunk) in buf[..n * RECORD_SIZE].chunks_mut(RECORD_SIZE).enumerate() {
            Record {
                seq: next + i as u64,
                boot_id,
            }
            .encode(chunk);
        }
        let written = file.write_all_at(&buf[..n * RECORD_SIZE], next * RECORD_SIZE as u64);
        if written.and_then(|()| file.sync_data()).is_err() {
            return FAILED;
        }
        next += n as u64;
        shared.acked.store(next, Ordering::Relaxed);
    }
    STOPPED
}

/// Opens `dev` read-only and scans it.
pub fn verify(dev: &str) -> sys::Result<Scan> {
    scan(&open(dev, false)?)
}
