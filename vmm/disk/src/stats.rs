//! What a disk served, counted as requests complete: a few relaxed atomic increments per
//! request, read by the VMM's `GET /v1/vm/counters`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use vmm_api::vm::DiskCounters;

/// The kind of a request, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// A read of this many bytes.
    Read(u64),
    /// A write of this many bytes.
    Write(u64),
    /// A flush.
    Flush,
    /// A discard or write-zeroes request.
    Discard,
    /// Anything else (GET_ID, unsupported, refused before any I/O).
    Other,
}

/// A disk's counters since it was opened.
#[derive(Debug, Default)]
pub struct DiskStats {
    read_requests: AtomicU64,
    write_requests: AtomicU64,
    flush_requests: AtomicU64,
    discard_requests: AtomicU64,
    other_requests: AtomicU64,
    errors: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
}

impl DiskStats {
    /// Counts one completed request; `ok` whether it completed without an error status.
    pub fn count(&self, what: Counted, ok: bool) {
        let (requests, bytes) = match what {
            Counted::Read(n) => (&self.read_requests, Some((&self.read_bytes, n))),
            Counted::Write(n) => (&self.write_requests, Some((&self.written_bytes, n))),
            Counted::Flush => (&self.flush_requests, None),
            Counted::Discard => (&self.discard_requests, None),
            Counted::Other => (&self.other_requests, None),
        };
        requests.fetch_add(1, Relaxed);
        match (ok, bytes) {
            (false, _) => {
                self.errors.fetch_add(1, Relaxed);
            }
            (true, Some((counter, n))) => {
                counter.fetch_add(n, Relaxed);
            }
            (true, None) => {}
        }
    }

    /// The counters as the API reports them, for the disk the guest calls `device`.
    pub fn snapshot(&self, device: &str) -> DiskCounters {
        DiskCounters {
            device: device.to_string(),
            served_by: "vmm".to_string(),
            read_requests: self.read_requests.load(Relaxed),
            write_requests: self.write_requests.load(Relaxed),
            flush_requests: self.flush_requests.load(Relaxed),
            discard_requests: self.discard_requests.load(Relaxed),
            other_requests: self.other_requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            written_bytes: self.written_bytes.load(Relaxed),
        }
    }
}
