//! Buffers for reads and for long write data, reused across requests and connections.
//!
//! A fresh buffer for every large read or write costs a new mapping and a page fault per 4 KiB
//! page (the allocator maps large blocks anew and unmaps them on free), which for 1 MiB reads
//! was a fifth of the server's time, and for 1 MiB writes the faults on receipt about 8%.
//! [`Buffers`] keeps buffers of 128 KiB to 4 MiB that came back (a read's once the writer sent
//! it, a write's once its data is in the file), up to [`IDLE_MAX`] bytes in all, and hands them
//! out again.
//!
//! A buffer handed out again still holds an earlier request's bytes (zeroing it was a fifth of
//! the server's time on 1 MiB reads); only the part beyond the earlier length is zeroed. No
//! reply carries them: a read replies with its buffer only when it filled every byte
//! (`read_exact_at`, or a page-cache read of the whole length), and a reply with an error
//! carries no data, simple or structured (the encoder, `ReplyEncoder::encode_head`, sends none);
//! write data is used only once the whole of it was received into the buffer.
//! Every buffer's data starts on a [`ALIGN`]-byte boundary: the allocator's large blocks start
//! 16 bytes into a page, and the kernel copies into a destination off a cache line were about
//! six times slower here (`pread` of 1 MiB from the page cache: 1.0-1.3 GiB/s at +16 bytes,
//! 7 GiB/s at +0 or +64); perf had the page cache to read buffer copy at half the server's
//! time on 1 MiB reads over 4 connections.
//! Idle buffers are outside the memory [`super::Budget`]: that counts the requests in flight,
//! this adds at most [`IDLE_MAX`] to the server's memory.

use std::sync::{Arc, Mutex};

/// Buffers smaller than this are fresh ones (the allocator serves them from its own caches).
pub const POOLED_MIN: usize = 128 << 10;
/// Buffers larger than this are fresh ones.
pub const POOLED_MAX: usize = 4 << 20;
/// Most bytes kept in idle buffers, over all sizes.
pub const IDLE_MAX: usize = 32 << 20;
/// Where a buffer's data starts: a multiple of this (a cache line) in memory.
pub const ALIGN: usize = 64;

/// Buffer sizes kept: the powers of two from [`POOLED_MIN`] to [`POOLED_MAX`].
const SIZES: usize = (POOLED_MAX / POOLED_MIN).trailing_zeros() as usize + 1;

#[derive(Default)]
struct Idle {
    /// Per size, the idle buffers (each with that capacity and [`ALIGN`] more, and the length
    /// of its last use).
    free: [Vec<Vec<u8>>; SIZES],
    /// Their sizes' sum (without the alignment's slack).
    bytes: usize,
}

/// The server's idle buffers; cheap to clone.
#[derive(Clone, Default)]
pub struct Buffers(Arc<Mutex<Idle>>);

impl Buffers {
    /// A buffer of `len` bytes, to be filled by a read or a write's data (it may hold earlier
    /// bytes; see the module's documentation); it comes back here when dropped.
    pub fn take(&self, len: usize) -> PooledBuf {
        let Some(size) = size_class(len) else {
            let mut data = vec![0u8; len + ALIGN];
            let start = aligned_start(&data);
            data.truncate(start + len);
            return PooledBuf {
                data,
                start,
                home: None,
            };
        };
        let reused = {
            let mut idle = self.0.lock().expect("buffers lock");
            let buf = idle.free[size].pop();
            if buf.is_some() {
                idle.bytes -= POOLED_MIN << size;
            }
            buf
        };
        let mut data = reused.unwrap_or_else(|| Vec::with_capacity((POOLED_MIN << size) + ALIGN));
        // Shorter: cut; longer: the new part is zeroed (a buffer's length only grows to its
        // class's size, so a steady stream of one request size zeroes nothing).
        let start = aligned_start(&data);
        data.resize(start + len, 0);
        PooledBuf {
            data,
            start,
            home: Some(self.clone()),
        }
    }

    /// Keeps `data` for a later request, if it has a kept size and the idle total allows.
    fn give_back(&self, data: Vec<u8>) {
        let Some(size) = size_class(data.capacity().saturating_sub(ALIGN)) else {
            return;
        };
        if data.capacity() != (POOLED_MIN << size) + ALIGN {
            return;
        }
        let mut idle = self.0.lock().expect("buffers lock");
        if idle.bytes + (POOLED_MIN << size) > IDLE_MAX {
            return;
        }
        idle.bytes += POOLED_MIN << size;
        idle.free[size].push(data);
    }

    /// Bytes held in idle buffers.
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.0.lock().expect("buffers lock").bytes
    }
}

/// Where in `data`'s memory the first [`ALIGN`]-byte boundary is (it never moves: the vector
/// is only resized within its capacity).
fn aligned_start(data: &[u8]) -> usize {
    let at = data.as_ptr() as usize % ALIGN;
    (ALIGN - at) % ALIGN
}

/// The size class of a buffer for `len` bytes: the smallest kept size that holds it.
fn size_class(len: usize) -> Option<usize> {
    if !(POOLED_MIN..=POOLED_MAX).contains(&len) {
        return None;
    }
    let size = len.next_power_of_two() / POOLED_MIN;
    Some(size.trailing_zeros() as usize)
}

/// A read's or a write's data; a buffer from [`Buffers`] goes back there when this is dropped.
#[derive(Default)]
pub struct PooledBuf {
    data: Vec<u8>,
    /// Where the buffer's bytes start in `data` (an [`ALIGN`]-byte boundary).
    start: usize,
    home: Option<Buffers>,
}

impl From<Vec<u8>> for PooledBuf {
    fn from(data: Vec<u8>) -> PooledBuf {
        PooledBuf {
            data,
            start: 0,
            home: None,
        }
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[self.start..]
    }
}

impl AsMut<[u8]> for PooledBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home.give_back(std::mem::take(&mut self.data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_and_only_its_growth_zeroed() {
        let pool = Buffers::default();
        let mut b = pool.take((1 << 20) - 8192);
        let ptr = b.as_ref().as_ptr();
        b.as_mut().fill(0xab);
        drop(b);
        assert_eq!(pool.idle_bytes(), 1 << 20);
        // A read of the same size class gets the same memory, the part beyond the earlier
        // read's length zeroed.
        let b = pool.take(1 << 20);
        assert_eq!(b.as_ref().as_ptr(), ptr);
        assert_eq!(b.as_ref().len(), 1 << 20);
        assert!(b.as_ref()[(1 << 20) - 8192..].iter().all(|&x| x == 0));
        assert_eq!(pool.idle_bytes(), 0);
        drop(b);
        // A shorter one is cut to its length.
        assert_eq!(pool.take(POOLED_MIN * 5).as_ref().len(), POOLED_MIN * 5);
    }

    #[test]
    fn small_and_huge_reads_are_not_kept() {
        let pool = Buffers::default();
        drop(pool.take(4096));
        drop(pool.take(POOLED_MAX + 1));
        assert_eq!(pool.idle_bytes(), 0);
        assert_eq!(pool.take(0).as_ref().len(), 0);
    }

    #[test]
    fn idle_buffers_stay_within_their_limit() {
        let pool = Buffers::default();
        let held: Vec<_> = (0..(IDLE_MAX / POOLED_MAX + 3))
            .map(|_| pool.take(POOLED_MAX))
            .collect();
        drop(held);
        assert_eq!(pool.idle_bytes(), IDLE_MAX);
    }

    #[test]
    fn every_buffer_starts_on_a_cache_line() {
        let pool = Buffers::default();
        for len in [
            0,
            1,
            4096,
            65536,
            POOLED_MIN,
            POOLED_MIN + 1,
            1 << 20,
            POOLED_MAX + 1,
        ] {
            for _ in 0..2 {
                let mut b = pool.take(len);
                assert_eq!(b.as_ref().len(), len);
                assert_eq!(b.as_ref().as_ptr() as usize % ALIGN, 0, "{len} bytes");
                b.as_mut().fill(1);
            }
        }
    }

    #[test]
    fn size_classes_cover_the_kept_range() {
        assert_eq!(size_class(POOLED_MIN - 1), None);
        assert_eq!(size_class(POOLED_MIN), Some(0));
        assert_eq!(size_class(POOLED_MIN + 1), Some(1));
        assert_eq!(size_class(POOLED_MAX), Some(SIZES - 1));
        assert_eq!(size_class(POOLED_MAX + 1), None);
    }
}
