//! Parsing a descriptor chain into a block request (virtio spec 1.2, 5.2.6).
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable memory, then the
//! data (device-readable for writes, device-writable for reads), then one status byte in
//! device-writable memory. Drivers may split any of these across descriptors, so parsing works
//! on byte ranges over the readable and writable segment lists rather than on descriptor
//! positions.
//!
//! The chain is the guest's: parsing stops at the first descriptor past what the device
//! advertised ([`MAX_DESCRIPTORS`], from `seg_max`) or past the largest request
//! ([`MAX_REQUEST_BYTES`]), so what a request holds is bounded before anything is kept.

use crate::offer::SEG_MAX;
use std::ops::Deref;
use thiserror::Error;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Size of the request header.
pub const HEADER_LEN: u64 = 16;
/// Size of one discard/write-zeroes segment.
pub const RANGE_SEGMENT_LEN: usize = 16;
/// The most descriptors a request may have: the header's, `seg_max` data segments, the
/// status byte's.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// The largest data buffer one request may have (the guest's driver stays far below: Linux
/// sends at most a few MiB). Caps what a malicious driver can make the data path allocate.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// Errors in a descriptor chain.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The readable part is shorter than a header.
    #[error("request header missing")]
    NoHeader,
    /// There is no writable byte for the status.
    #[error("status byte missing")]
    NoStatus,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// More descriptors than a request of `seg_max` data segments has.
    #[error("more data segments than the advertised seg_max")]
    TooManySegments,
    /// More data than the largest request.
    #[error("request larger than the largest the device serves")]
    TooLong,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device id string.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Anything else: answered with UNSUPP.
    Unsupported(u32),
}

/// A contiguous piece of guest memory.
pub type Segment = (GuestAddress, u32);

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Descriptor chain head, for the used ring.
    pub head: u16,
    /// What to do.
    pub kind: RequestKind,
    /// First sector (512 bytes).
    pub sector: u64,
    /// Device-readable data after the header (the write payload or discard ranges).
    pub data_out: Vec<Segment>,
    /// Device-writable data before the status byte (the read buffer).
    pub data_in: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Total length of segments.
pub fn seg_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.1)).sum()
}

/// Reads all of `segs` from guest memory.
pub fn gather<G: GuestMemory + ?Sized>(mem: &G, segs: &[Segment]) -> Result<Vec<u8>, RequestError> {
    let mut out = vec![0u8; seg_len(segs) as usize];
    let mut at = 0usize;
    for &(addr, len) in segs {
        let len = len as usize;
        mem.read_slice(&mut out[at..at + len], addr)
            .map_err(|_| RequestError::BadAddress)?;
        at += len;
    }
    Ok(out)
}

/// Writes `data` across `segs` through `mem` (whose bitmap, if it has one, records the pages
/// written); returns bytes written.
pub fn scatter<G: GuestMemory + ?Sized>(
    mem: &G,
    segs: &[Segment],
    data: &[u8],
) -> Result<usize, RequestError> {
    let mut at = 0usize;
    for &(addr, len) in segs {
        if at == data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], addr)
            .map_err(|_| RequestError::BadAddress)?;
        at += n;
    }
    Ok(at)
}

/// Splits `segs` at byte `n`: the first `n` bytes and the rest. A segment cut in two whose
/// second part would start past the end of the address space is not in guest memory.
fn split_at(segs: &[Segment], mut n: u64) -> Result<(Vec<Segment>, Vec<Segment>), RequestError> {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    for &(addr, len) in segs {
        let len64 = u64::from(len);
        if n >= len64 {
            head.push((addr, len));
            n -= len64;
        } else if n > 0 {
            let rest = addr.0.checked_add(n).ok_or(RequestError::BadAddress)?;
            head.push((addr, n as u32));
            tail.push((GuestAddress(rest), (len64 - n) as u32));
            n = 0;
        } else {
            tail.push((addr, len));
        }
    }
    Ok((head, tail))
}

impl Request {
    /// Bytes of data the request moves (its buffers, header and status not counted).
    pub fn data_len(&self) -> u64 {
        seg_len(&self.data_out) + seg_len(&self.data_in)
    }

    /// Parses a chain popped from the queue.
    pub fn parse<M, G>(chain: DescriptorChain<M>, mem: &G) -> Result<Request, RequestError>
    where
        M: Deref,
        M::Target: GuestMemory,
        G: GuestMemory + ?Sized,
    {
        let head = chain.head_index();
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let (mut readable_len, mut writable_len) = (0u64, 0u64);
        for (i, d) in chain.enumerate() {
            // Checked before anything is kept: an indirect table may hold 65535 descriptors.
            if i >= MAX_DESCRIPTORS {
                return Err(RequestError::TooManySegments);
            }
            if d.len() == 0 {
                continue;
            }
            let (segs, len, max) = if d.is_write_only() {
                (&mut writable, &mut writable_len, MAX_REQUEST_BYTES + 1)
            } else {
                (
                    &mut readable,
                    &mut readable_len,
                    MAX_REQUEST_BYTES + HEADER_LEN,
                )
            };
            *len += u64::from(d.len());
            if *len > max {
                return Err(RequestError::TooLong);
            }
            segs.push((d.addr(), d.len()));
        }
        if seg_len(&readable) < HEADER_LEN {
            return Err(RequestError::NoHeader);
        }
        let (header_segs, data_out) = split_at(&readable, HEADER_LEN)?;
        let header = gather(mem, &header_segs)?;
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let wlen = seg_len(&writable);
        if wlen == 0 {
            return Err(RequestError::NoStatus);
        }
        let (data_in, status_seg) = split_at(&writable, wlen - 1)?;
        let status = status_seg[0].0;
        let kind = match kind {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        };
        Ok(Request {
            head,
            kind,
            sector,
            data_out,
            data_in,
            status,
        })
    }
}

/// One range of a discard or write-zeroes request: `(sector, sectors, flags)`.
pub fn parse_ranges(bytes: &[u8]) -> Vec<(u64, u32, u32)> {
    bytes
        .chunks_exact(RANGE_SEGMENT_LEN)
        .map(|c| {
            (
                u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
                u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
                u32::from_le_bytes(c[12..16].try_into().expect("4 bytes")),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 MiB of anonymous memory with a dirty bitmap.
    fn test_memory() -> vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap> {
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn split_crosses_segment_boundaries() {
        let segs = vec![(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 10)];
        let (h, t) = split_at(&segs, 16).unwrap();
        assert_eq!(
            h,
            vec![(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 6)]
        );
        assert_eq!(t, vec![(GuestAddress(0x2006), 4)]);
        let (h, t) = split_at(&segs, 10).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(t, vec![(GuestAddress(0x2000), 10)]);
    }

    /// Found by the fuzzer: a header descriptor at the very end of the address space, longer
    /// than the header, made the cut overflow.
    #[test]
    fn a_descriptor_at_the_end_of_the_address_space_is_outside_guest_memory() {
        let mem = test_memory();
        let header = desc(u64::MAX - 8, 32, 0);
        let status = desc(0x30_0000, 1, W);
        assert_eq!(
            parse_chain(&mem, &[header, status]).unwrap_err(),
            RequestError::BadAddress
        );
        let end = desc(u64::MAX - 8, 32, W);
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(
            parse_chain(&mem, &[desc(0x10_0000, 16, 0), end]).unwrap_err(),
            RequestError::BadAddress
        );
    }

    #[test]
    fn scatter_and_gather_round_trip_and_mark_dirty() {
        let mem = test_memory();
        let segs = vec![(GuestAddress(0x10ffe), 4), (GuestAddress(0x30000), 4)];
        assert_eq!(scatter(&mem, &segs, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap(), 8);
        assert_eq!(gather(&mem, &segs).unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        use vm_memory::GuestMemoryBackend;
        let r = mem.find_region(GuestAddress(0)).unwrap();
        for page in [0x10000, 0x11000, 0x30000] {
            assert!(r.bitmap().is_addr_set(page), "{page:#x}");
        }
        assert!(!r.bitmap().is_addr_set(0x20000));
        assert!(gather(&mem, &[(GuestAddress(64 << 20), 4)]).is_err());
    }

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Puts `descs` in a ring as one chain at the front of `mem` and parses it.
    fn parse_chain<M: GuestMemory>(
        mem: &M,
        descs: &[RawDescriptor],
    ) -> Result<Request, RequestError> {
        let ring = MockSplitQueue::new(mem, 256);
        let chain = ring.build_desc_chain(descs).unwrap();
        Request::parse(chain, mem)
    }

    /// A chain whose head points at an indirect table of `descs` (written at `table`).
    fn parse_indirect<M: GuestMemory>(
        mem: &M,
        table: u64,
        descs: &[RawDescriptor],
    ) -> Result<Request, RequestError> {
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let flags = if i + 1 < descs.len() {
                d.flags() | 1
            } else {
                d.flags()
            };
            let d = SplitDescriptor::new(d.addr().0, d.len(), flags, (i + 1) as u16);
            mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = desc(table, 16 * descs.len() as u32, VRING_DESC_F_INDIRECT as u16);
        parse_chain(mem, &[head])
    }

    #[test]
    fn a_request_parses_across_descriptors() {
        let mem = test_memory();
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(8u64, GuestAddress(0x10_0008)).unwrap();
        let r = parse_chain(
            &mem,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 4096, W),
                desc(0x30_0000, 1, W),
            ],
        )
        .unwrap();
        assert_eq!((r.kind, r.sector), (RequestKind::In, 8));
        assert_eq!(r.data_in, vec![(GuestAddress(0x20_0000), 4096)]);
        assert_eq!(r.status, GuestAddress(0x30_0000));
    }

    #[test]
    fn chains_beyond_the_advertised_limits_are_refused_while_parsing() {
        let mem = test_memory();
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10_0000))
            .unwrap();
        let header = desc(0x10_0000, 16, 0);
        let status = desc(0x30_0000, 1, W);
        // seg_max data segments are fine, one more is not (an indirect table may hold 65535).
        let seg = |i: u64| desc(0x40_0000 + 512 * i, 512, W);
        let mut descs = vec![header];
        descs.extend((0..u64::from(crate::offer::SEG_MAX)).map(seg));
        descs.push(status);
        let r = parse_indirect(&mem, 0x80_0000, &descs).unwrap();
        assert_eq!(r.data_in.len(), crate::offer::SEG_MAX as usize);
        descs.insert(1, seg(999));
        assert_eq!(
            parse_indirect(&mem, 0x80_0000, &descs).unwrap_err(),
            RequestError::TooManySegments
        );
        // Descriptors of 1 GiB, all over the same 16 MiB: refused at the first one past the
        // largest request, before anything is read from or allocated for them.
        let huge = desc(0x40_0000, 1 << 30, W);
        assert_eq!(
            parse_chain(&mem, &[header, huge, huge, huge, status]).unwrap_err(),
            RequestError::TooLong
        );
        let huge_out = desc(0x40_0000, 1 << 30, 0);
        assert_eq!(
            parse_chain(&mem, &[header, huge_out, status]).unwrap_err(),
            RequestError::TooLong
        );
    }

    #[test]
    fn ranges_parse() {
        let mut b = vec![0u8; 32];
        b[0] = 8;
        b[8] = 16;
        b[16] = 1;
        assert_eq!(parse_ranges(&b), vec![(8, 16, 0), (1, 0, 0)]);
    }
}
