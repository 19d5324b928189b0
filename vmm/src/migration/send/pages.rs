//! Guest memory into PAGES frames: the full pass (every page that may hold data) and a set of
//! dirty pages (zero pages as markers).

use super::{check_abort, SendError, SourceCtx};
use crate::memory::{data_extents, private_extents, PAGE_SIZE};
use crate::migration::dirty::DirtyPages;
use crate::migration::update;
use crate::migration::wire::PageBatch;
use std::io::Write;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Size of a PAGES frame.
pub(super) const BATCH_BYTES: usize = 1 << 20;

/// Adds the page at `addr` to `batch` straight from guest memory (see
/// [`PageBatch::push_from`]); returns whether it was all zeroes.
fn push_page(
    ctx: &SourceCtx,
    batch: &mut PageBatch,
    addr: u64,
    zero_marker: bool,
) -> Result<bool, SendError> {
    let page = ctx
        .mem
        .get_slice(GuestAddress(addr), PAGE_SIZE)
        .map_err(|e| SendError::ReadGuest(addr, e))?;
    Ok(batch.push_from(addr, &page, zero_marker))
}

/// Sends every non-zero page (the destination's memory starts zeroed); returns the bytes sent.
pub(super) fn full_pass(ctx: &SourceCtx, w: &mut impl Write) -> Result<u64, SendError> {
    let mut batch = PageBatch::new(BATCH_BYTES);
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
            let end = (off + len).min(region.len());
            while at < end {
                // Per page, not per frame: a run of zero pages fills no frame.
                check_abort(ctx)?;
                if !push_page(ctx, &mut batch, base + at, false)? {
                    pages += 1;
                }
                if batch.full() {
                    sent += batch.flush(w)?;
                    update(&ctx.status, |s| {
                        s.bytes_sent += BATCH_BYTES as u64;
                        s.pages_sent = pages;
                    });
                }
                at += PAGE_SIZE as u64;
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
    let mut sent = 0u64;
    let (mut pages, mut zeroes) = (0u64, 0u64);
    for addr in dirty.addresses() {
        if push_page(ctx, &mut batch, addr, true)? {
            zeroes += 1;
        } else {
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
