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
//! Idle buffers are outside the memory [`super::Budget`]: that counts the requests in flight,
//! this adds at most [`IDLE_MAX`] to the server's memory.

use std::sync::{Arc, Mutex};

/// Buffers smaller than this are fresh ones (the allocator serves them from its own caches).
pub const POOLED_MIN: usize = 128 << 10;
/// Buffers larger than this are fresh ones.
pub const POOLED_MAX: usize = 4 << 20;
/// Most bytes kept in idle buffers, over all sizes.
pub const IDLE_MAX: usize = 32 << 20;

/// Buffer sizes kept: the powers of two from [`POOLED_MIN`] to [`POOLED_MAX`].
const SIZES: usize = (POOLED_MAX / POOLED_MIN).trailing_zeros() as usize + 1;

#[derive(Default)]
struct Idle {
    /// Per size, the idle buffers (each with that capacity, and the length of its last use).
    free: [Vec<Vec<u8>>; SIZES],
    /// Their capacities' sum.
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
            return PooledBuf::from(vec![0u8; len]);
        };
        let reused = {
            let mut idle = self.0.lock().expect("buffers lock");
            let buf = idle.free[size].pop();
            if let Some(b) = &buf {
                idle.bytes -= b.capacity();
            }
            buf
        };
        let mut data = reused.unwrap_or_else(|| Vec::with_capacity(POOLED_MIN << size));
        // Shorter: cut; longer: the new part is zeroed (a buffer's length only grows to its
        // class's size, so a steady stream of one request size zeroes nothing).
        data.resize(len, 0);
        PooledBuf {
            data,
            home: Some(self.clone()),
        }
    }

    /// Keeps `data` for a later request, if it has a kept size and the idle total allows.
    fn give_back(&self, data: Vec<u8>) {
        let Some(size) = size_class(data.capacity()) else {
            return;
        };
        if data.capacity() != POOLED_MIN << size {
            return;
        }
        let mut idle = self.0.lock().expect("buffers lock");
        if idle.bytes + data.capacity() > IDLE_MAX {
            return;
        }
        idle.bytes += data.capacity();
        idle.free[size].push(data);
    }

    /// Bytes held in idle buffers.
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.0.lock().expect("buffers lock").bytes
    }
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
    home: Option<Buffers>,
}

impl From<Vec<u8>> for PooledBuf {
    fn from(data: Vec<u8>) -> PooledBuf {
        PooledBuf { data, home: None }
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl AsMut<[u8]> for PooledBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data
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
    fn size_classes_cover_the_kept_range() {
        assert_eq!(size_class(POOLED_MIN - 1), None);
        assert_eq!(size_class(POOLED_MIN), Some(0));
        assert_eq!(size_class(POOLED_MIN + 1), Some(1));
        assert_eq!(size_class(POOLED_MAX), Some(SIZES - 1));
        assert_eq!(size_class(POOLED_MAX + 1), None);
    }
}
