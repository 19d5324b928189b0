//! One request run on a disk: [`Disk::prepare`] takes what the request needs out of guest
//! memory (the write payload, the discard ranges) and checks it, [`Disk::run`] does the I/O on
//! the backend, [`complete`] writes the read data and the status byte back into guest memory.
//! The caller owns the queue: it pops the chain before and returns it to the driver after, so
//! the same steps serve the VMM's worker and the vhost-user backend.
//!
//! Nothing here trusts the guest: a request outside the disk, of a length that is not a whole
//! number of sectors, larger than [`MAX_REQUEST_BYTES`], with buffers outside guest memory, or
//! a discard or write-zeroes request beyond the advertised `max_discard_seg` /
//! `max_discard_sectors` (and their write-zeroes twins) completes with VIRTIO_BLK_S_IOERR; an
//! unknown type with VIRTIO_BLK_S_UNSUPP.

use crate::backend::{Backend, BackendError};
use crate::offer::{Offer, MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR_SIZE};
use crate::request::{
    gather, parse_ranges, scatter, seg_len, Request, RequestKind, MAX_REQUEST_BYTES,
    RANGE_SEGMENT_LEN,
};
use crate::stats::{Counted, DiskStats};
use std::sync::Arc;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use vm_memory::{Bytes, GuestMemory};

/// What a finished request returns to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// VIRTIO_BLK_S_*.
    pub status: u8,
    /// Data for the device-writable buffers (reads, GET_ID).
    pub data: Vec<u8>,
}

impl Completion {
    fn status(status: u32) -> Completion {
        Completion {
            status: status as u8,
            data: Vec::new(),
        }
    }
}

/// The I/O a request needs, with everything taken from guest memory already.
#[derive(Debug)]
pub enum Job {
    /// Nothing to do on the backend: the answer is known.
    Done(Completion),
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// The payload.
        data: Vec<u8>,
    },
    /// Make completed writes durable.
    Flush,
    /// Zero (or deallocate) byte ranges `(offset, len)`.
    Ranges {
        /// Write zeroes rather than discard.
        zero: bool,
        /// The ranges.
        ranges: Vec<(u64, u64)>,
    },
}

/// A disk as the guest sees it: a backend, whether it is offered read-only, and its id.
/// Cheap to clone (the backend is shared).
#[derive(Debug, Clone)]
pub struct Disk {
    backend: Arc<Backend>,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: Arc<DiskStats>,
}

impl Disk {
    /// A disk over `backend`, read-only if asked or if the backend is; `id` is what GET_ID
    /// returns (truncated to 20 bytes).
    pub fn new(backend: Backend, read_only: bool, id: &str) -> Disk {
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Disk {
            read_only: read_only || backend.read_only(),
            backend: Arc::new(backend),
            id: id_bytes,
            stats: Arc::default(),
        }
    }

    /// What the disk served so far (shared by its clones).
    pub fn stats(&self) -> &Arc<DiskStats> {
        &self.stats
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// What the disk offers a driver with `queues` request queues.
    pub fn offer(&self, queues: u16) -> Offer {
        Offer::new(
            self.size(),
            self.read_only,
            self.backend.supports_discard(),
            queues,
        )
    }

    fn in_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(len)? <= self.size()).then_some(offset)
    }

    /// Checks `req` and takes its payload out of guest memory.
    pub fn prepare<G: GuestMemory + ?Sized>(&self, req: &Request, mem: &G) -> Job {
        let ioerr = || Job::Done(Completion::status(VIRTIO_BLK_S_IOERR));
        let sectors = |len: u64| len.is_multiple_of(SECTOR_SIZE) && len <= MAX_REQUEST_BYTES;
        match req.kind {
            RequestKind::In => {
                let len = seg_len(&req.data_in);
                match self.in_range(req.sector, len) {
                    Some(offset) if sectors(len) => Job::Read {
                        offset,
                        len: len as usize,
                    },
                    _ => ioerr(),
                }
            }
            RequestKind::Out => {
                let len = seg_len(&req.data_out);
                if self.read_only || !sectors(len) {
                    return ioerr();
                }
                let Some(offset) = self.in_range(req.sector, len) else {
                    return ioerr();
                };
                match gather(mem, &req.data_out) {
                    Ok(data) => Job::Write { offset, data },
                    Err(_) => ioerr(),
                }
            }
            RequestKind::Flush => Job::Flush,
            RequestKind::GetId => Job::Done(Completion {
                status: VIRTIO_BLK_S_OK as u8,
                data: self.id.to_vec(),
            }),
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.read_only || !self.backend.supports_discard() {
                    return Job::Done(Completion::status(VIRTIO_BLK_S_UNSUPP));
                }
                // Whole segments, no more than max_discard_seg (max_write_zeroes_seg) of
                // them, checked before they are read.
                let len = seg_len(&req.data_out);
                if len == 0
                    || !len.is_multiple_of(RANGE_SEGMENT_LEN as u64)
                    || len > u64::from(MAX_RANGE_SEGMENTS) * RANGE_SEGMENT_LEN as u64
                {
                    return ioerr();
                }
                let Ok(bytes) = gather(mem, &req.data_out) else {
                    return ioerr();
                };
                let mut ranges = Vec::new();
                for (sector, sectors, _flags) in parse_ranges(&bytes) {
                    if sectors > MAX_RANGE_SECTORS {
                        return ioerr();
                    }
                    let len = u64::from(sectors) * SECTOR_SIZE;
                    match self.in_range(sector, len) {
                        Some(offset) => ranges.push((offset, len)),
                        None => return ioerr(),
                    }
                }
                Job::Ranges {
                    zero: req.kind == RequestKind::WriteZeroes,
                    ranges,
                }
            }
            RequestKind::Unsupported(t) => {
                tracing::debug!(kind = t, "virtio-blk: unsupported request");
                Job::Done(Completion::status(VIRTIO_BLK_S_UNSUPP))
            }
        }
    }

    /// Runs `job` on the backend. A failed I/O completes with VIRTIO_BLK_S_IOERR (and a
    /// warning in the log).
    pub async fn run(&self, job: Job) -> Completion {
        let counted = match &job {
            Job::Done(_) => Counted::Other,
            Job::Read { len, .. } => Counted::Read(*len as u64),
            Job::Write { data, .. } => Counted::Write(data.len() as u64),
            Job::Flush => Counted::Flush,
            Job::Ranges { .. } => Counted::Discard,
        };
        let c = self.execute(job).await;
        self.stats
            .count(counted, u32::from(c.status) == VIRTIO_BLK_S_OK);
        c
    }

    /// Counts a request answered without I/O (a [`Job::Done`] the caller completes itself
    /// instead of passing it to [`Disk::run`]).
    pub fn count_done(&self, c: &Completion) {
        self.stats
            .count(Counted::Other, u32::from(c.status) == VIRTIO_BLK_S_OK);
    }

    async fn execute(&self, job: Job) -> Completion {
        let b = &self.backend;
        let r: Result<Vec<u8>, BackendError> = match job {
            Job::Done(c) => return c,
            Job::Read { offset, len } => b.read(offset, len).await,
            Job::Write { offset, data } => b.write(offset, data).await.map(|_| Vec::new()),
            Job::Flush => b.flush().await.map(|_| Vec::new()),
            Job::Ranges { zero, ranges } => {
                let mut r = Ok(Vec::new());
                for (offset, len) in ranges {
                    let one = if zero {
                        b.write_zeroes(offset, len).await
                    } else {
                        b.discard(offset, len).await
                    };
                    if let Err(e) = one {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
        };
        match r {
            Ok(data) => Completion {
                status: VIRTIO_BLK_S_OK as u8,
                data,
            },
            Err(e) => {
                tracing::warn!(error = %e, "virtio-blk: I/O error");
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }
}

/// Writes a completion into guest memory: the data into the request's writable buffers, then
/// the status byte. Returns the length for the used ring (bytes written, status included).
pub fn complete<G: GuestMemory + ?Sized>(mem: &G, req: &Request, c: &Completion) -> u32 {
    let mut status = c.status;
    let mut written = 0usize;
    if !c.data.is_empty() {
        match scatter(mem, &req.data_in, &c.data) {
            Ok(n) => written = n,
            Err(_) => status = VIRTIO_BLK_S_IOERR as u8,
        }
    }
    if mem.write_obj(status, req.status).is_err() {
        tracing::warn!(
            head = req.head,
            "virtio-blk: status byte outside guest memory"
        );
    }
    u32::try_from(written).unwrap_or(u32::MAX - 1) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FileBackend;
    use crate::request::Segment;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn disk(dir: &std::path::Path, read_only: bool) -> Disk {
        sized_disk(dir, read_only, 1 << 20)
    }

    fn sized_disk(dir: &std::path::Path, read_only: bool, size: u64) -> Disk {
        let path = dir.join("d.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        Disk::new(
            Backend::File(FileBackend::open(&path, read_only).unwrap()),
            read_only,
            "disk-id",
        )
    }

    fn request(
        kind: RequestKind,
        sector: u64,
        data_out: Vec<Segment>,
        data_in: Vec<Segment>,
    ) -> Request {
        Request {
            head: 0,
            kind,
            sector,
            data_out,
            data_in,
            status: GuestAddress(0x9000),
        }
    }

    #[tokio::test]
    async fn requests_run_and_bad_ones_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(dir.path(), false);
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[7u8; 1024], GuestAddress(0x1000)).unwrap();
        let w = request(
            RequestKind::Out,
            2,
            vec![(GuestAddress(0x1000), 1024)],
            vec![],
        );
        let c = d.run(d.prepare(&w, &mem)).await;
        assert_eq!(c.status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(complete(&mem, &w, &c), 1);
        let r = request(
            RequestKind::In,
            2,
            vec![],
            vec![(GuestAddress(0x4000), 512), (GuestAddress(0x6000), 512)],
        );
        let c = d.run(d.prepare(&r, &mem)).await;
        assert_eq!(complete(&mem, &r, &c), 1025);
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x6000)).unwrap();
        assert_eq!(back, [7u8; 512]);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );

        let ioerr = |c: Completion| c.status == VIRTIO_BLK_S_IOERR as u8;
        // Past the end, not whole sectors, too large, buffers outside memory.
        let past = request(
            RequestKind::In,
            2047,
            vec![],
            vec![(GuestAddress(0x4000), 1024)],
        );
        assert!(ioerr(d.run(d.prepare(&past, &mem)).await));
        let odd = request(
            RequestKind::Out,
            0,
            vec![(GuestAddress(0x1000), 100)],
            vec![],
        );
        assert!(ioerr(d.run(d.prepare(&odd, &mem)).await));
        let huge = request(
            RequestKind::In,
            0,
            vec![],
            vec![(GuestAddress(0), u32::MAX); 64],
        );
        assert!(ioerr(d.run(d.prepare(&huge, &mem)).await));
        let outside = request(
            RequestKind::Out,
            0,
            vec![(GuestAddress(4 << 20), 512)],
            vec![],
        );
        assert!(ioerr(d.run(d.prepare(&outside, &mem)).await));
        let id = request(
            RequestKind::GetId,
            0,
            vec![],
            vec![(GuestAddress(0x4000), 20)],
        );
        let c = d.run(d.prepare(&id, &mem)).await;
        assert_eq!(&c.data[..7], b"disk-id");
        let unknown = request(RequestKind::Unsupported(99), 0, vec![], vec![]);
        assert_eq!(
            d.run(d.prepare(&unknown, &mem)).await.status,
            VIRTIO_BLK_S_UNSUPP as u8
        );

        let ro_dir = tempfile::tempdir().unwrap();
        let ro = disk(ro_dir.path(), true);
        assert!(ioerr(ro.run(ro.prepare(&w, &mem)).await));
    }

    /// Discard or write-zeroes ranges at 0x1000 in `mem`: `(sector, sectors)` each.
    fn ranges(mem: &GuestMemoryMmap, kind: RequestKind, ranges: &[(u64, u32)]) -> Request {
        let mut bytes = Vec::new();
        for &(sector, sectors) in ranges {
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&sectors.to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        mem.write_slice(&bytes, GuestAddress(0x1000)).unwrap();
        let len = bytes.len() as u32;
        request(kind, 0, vec![(GuestAddress(0x1000), len)], vec![])
    }

    #[test]
    fn discard_and_write_zeroes_keep_to_the_advertised_limits() {
        use crate::offer::{MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS};
        let dir = tempfile::tempdir().unwrap();
        let d = sized_disk(dir.path(), false, 64 << 30);
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ioerr = |j: Job| matches!(j, Job::Done(c) if c.status == VIRTIO_BLK_S_IOERR as u8);
        for kind in [RequestKind::Discard, RequestKind::WriteZeroes] {
            // max_discard_seg ranges of max_discard_sectors each: served.
            let full: Vec<_> = (0..u64::from(MAX_RANGE_SEGMENTS))
                .map(|i| (i * u64::from(MAX_RANGE_SECTORS), MAX_RANGE_SECTORS))
                .collect();
            match d.prepare(&ranges(&mem, kind, &full), &mem) {
                Job::Ranges { ranges, .. } => assert_eq!(ranges.len(), full.len()),
                other => panic!("{other:?}"),
            }
            // One range more, one sector more, or a range cut short: refused before any I/O.
            let mut more = full.clone();
            more.push((0, 8));
            assert!(
                ioerr(d.prepare(&ranges(&mem, kind, &more), &mem)),
                "{kind:?}"
            );
            let long = [(0, MAX_RANGE_SECTORS + 1)];
            assert!(
                ioerr(d.prepare(&ranges(&mem, kind, &long), &mem)),
                "{kind:?}"
            );
            let mut cut = ranges(&mem, kind, &[(0, 8)]);
            cut.data_out[0].1 += 4;
            assert!(ioerr(d.prepare(&cut, &mem)), "{kind:?}");
        }
    }
}
