//! Guest memory into PAGES frames: the full pass (every page that may hold data) and a set of
//! dirty pages (zero pages as markers).

use super::{check_abort, SendError, SourceCtx};
use crate::memory::{data_extents, private_extents, PAGE_SIZE};
use crate::migration::dirty::DirtyPages;
use crate::migration::update;
use crate::migration::wire::PageBatch;
use std::io::Write;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Size of a PAGES frame.
pub(super) const BATCH_BYTES: usize = 1 << 20;
/// Read granularity of the full pass.
const CHUNK: usize = 64 * PAGE_SIZE;
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Sends every non-zero page (the destination's memory starts zeroed); returns the bytes sent.
pub(super) fn full_pass(ctx: &SourceCtx, w: &mut impl Write) -> Result<u64, SendError> {
    let mut batch = PageBatch::new(BATCH_BYTES);
    let mut chunk = vec![0u8; CHUNK];
    let mut sent = 0u64;
    let mut pages = 0u64;
    for region in ctx.mem.iter() {
        let base = region.start_addr().0;
        let extents = match region.file_offset() {
            Some(fo) if ctx.private_memory => {
                private_extents(fo.file(), fo.start(), region.as_ptr() as u64, region.len())
            }
            Some(fo) => data_extents(fo.file(), fo.start(), region.len()),
            None => vec![(0, region.len())],
        };
        for (off, len) in extents {
            let mut at = off & !(PAGE_SIZE as u64 - 1);
            let end = off + len;
            while at < end {
                check_abort(ctx)?;
                let n = ((end - at) as usize).min(CHUNK).next_multiple_of(PAGE_SIZE);
                let n = n.min((region.len() - at) as usize);
                let buf = &mut chunk[..n];
                ctx.mem
                    .read_slice(buf, GuestAddress(base + at))
                    .map_err(|e| SendError::ReadGuest(base + at, e))?;
                for (i, page) in buf.chunks(PAGE_SIZE).enumerate() {
                    if page != ZERO_PAGE.as_slice() {
                        batch.push(base + at + (i * PAGE_SIZE) as u64, page);
                        pages += 1;
                    }
                    if batch.full() {
                        sent += batch.flush(w)?;
                        update(&ctx.status, |s| {
                            s.bytes_sent += BATCH_BYTES as u64;
                            s.pages_sent = pages;
                        });
                    }
                }
                at += n as u64;
            }
        }
    }
    sent += batch.flush(w)?;
    update(&ctx.status, |s| {
        s.bytes_sent = sent;
        s.pages_sent = pages;
    });
    Ok(sent)
}

/// Sends the pages in `dirty`, zero pages as markers; returns the bytes sent.
pub(super) fn send_pages(
    ctx: &SourceCtx,
    w: &mut impl Write,
    dirty: &DirtyPages,
) -> Result<u64, SendError> {
    let mut batch = PageBatch::new(BATCH_BYTES);
    let mut page = [0u8; PAGE_SIZE];
    let mut sent = 0u64;
    let (mut pages, mut zeroes) = (0u64, 0u64);
    for addr in dirty.addresses() {
        ctx.mem
            .read_slice(&mut page, GuestAddress(addr))
            .map_err(|e| SendError::ReadGuest(addr, e))?;
        if page == ZERO_PAGE {
            batch.push_zero(addr);
            zeroes += 1;
        } else {
            batch.push(addr, &page);
            pages += 1;
        }
        if batch.full() {
            check_abort(ctx)?;
            sent += batch.flush(w)?;
        }
    }
    sent += batch.flush(w)?;
    update(&ctx.status, |s| {
        s.pages_sent += pages;
        s.zero_pages_sent += zeroes;
    });
    Ok(sent)
}
