//! The migration stream's framing.
//!
//! ```text
//! preamble = "VMHOPMIG" | u32 version            (source -> destination, once)
//! frame    = u8 kind | u8 0 | u16 0 | u32 length | u32 CRC-32 of the payload | payload
//! ```
//! Kinds and payloads (JSON unless said otherwise):
//! | kind | dir | payload                                                        |
//! |------|-----|----------------------------------------------------------------|
//! | 1 HELLO    | s->d | [`Hello`]: the VM's shape, resume mode                |
//! | 2 REPLY    | d->s | [`Reply`]: ok or the reason for refusing              |
//! | 3 PAGES    | s->d | binary: entries `u64 address|flags` (+ 4096 bytes of data unless flag ZERO) |
//! | 4 PROGRESS | s->d | [`Progress`]: iteration and bytes left (for the destination's status) |
//! | 5 STATE    | s->d | binary: a [`crate::persist`] envelope                 |
//! | 6 READY    | d->s | [`Reply`]: the state is loaded (or why not)           |
//! | 7 COMMIT   | s->d | [`Commit`]: the guest is the destination's            |
//! | 8 ABORT    | s->d | [`Reply`] with the reason                             |
//! | 9 RESUMED  | d->s | [`Resumed`]: when the destination's vCPUs ran (auto)  |
//! | 10 SYNC    | s->d | empty: answer once everything before is in memory     |
//! | 11 SYNCED  | d->s | empty: the answer to SYNC                             |
//! | 12 COMMITTED | d->s | [`Reply`]: the destination holds the guest (wait), or why not |
//! Little-endian throughout. A frame whose checksum does not match, an unknown kind, or a
//! length above [`MAX_FRAME`] ends the stream with an error. Both ends speak one [`VERSION`]:
//! the destination refuses a preamble of another (a change of frames or of their order is a
//! new version).

use crate::memory::PAGE_SIZE;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};
use thiserror::Error;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// First bytes of a stream.
pub const MAGIC: &[u8; 8] = b"VMHOPMIG";
/// Stream version. 2: COMMIT is answered with COMMITTED in `wait` mode.
pub const VERSION: u32 = 2;
/// Bytes of the preamble.
pub const PREAMBLE_LEN: usize = 12;
/// Bytes of a frame's header.
pub const FRAME_HEADER: usize = 12;
/// Largest frame payload.
pub const MAX_FRAME: u32 = 64 << 20;
/// Flag in a page entry's address: the page is all zeroes and no data follows.
pub const PAGE_ZERO: u64 = 1;
/// Bytes of a page entry's address.
const ENTRY_HEADER: usize = 8;
/// How much of a payload is read (and the buffer grown) at a time.
const READ_STEP: usize = 1 << 20;
/// What a page is compared with (a `memcmp`, vectorised, unlike a loop over the bytes).
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source's greeting.
    Hello = 1,
    /// Destination's answer to HELLO.
    Reply = 2,
    /// Memory pages.
    Pages = 3,
    /// Pre-copy progress.
    Progress = 4,
    /// The saved state.
    State = 5,
    /// Destination loaded the state.
    Ready = 6,
    /// The hand-over.
    Commit = 7,
    /// The source gives up.
    Abort = 8,
    /// The destination ran the guest.
    Resumed = 9,
    /// Source asks the destination to catch up.
    Sync = 10,
    /// Destination caught up.
    Synced = 11,
    /// Destination took COMMIT (`wait`): the guest is its to run when told.
    Committed = 12,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Reply,
            3 => Kind::Pages,
            4 => Kind::Progress,
            5 => Kind::State,
            6 => Kind::Ready,
            7 => Kind::Commit,
            8 => Kind::Abort,
            9 => Kind::Resumed,
            10 => Kind::Sync,
            11 => Kind::Synced,
            12 => Kind::Committed,
            _ => return None,
        })
    }
}

/// Errors on the stream.
#[derive(Debug, Error)]
pub enum WireError {
    /// The connection failed or closed.
    #[error("migration stream I/O")]
    Io(#[from] std::io::Error),
    /// Not a migration stream.
    #[error("not a vmhop migration stream (preamble {0:02x?})")]
    Magic(Vec<u8>),
    /// A stream of another version.
    #[error("migration stream version {0}; this VMM speaks version {VERSION}")]
    Version(u32),
    /// A frame's checksum does not match.
    #[error("migration stream corrupt: frame {0} ({1:?}) checksum {2:#010x}, computed {3:#010x}")]
    Checksum(u64, Kind, u32, u32),
    /// A frame of a kind this VMM does not know.
    #[error("migration stream corrupt: frame {0}: unknown frame kind {1}")]
    UnknownKind(u64, u8),
    /// A frame whose reserved header bytes are set.
    #[error("migration stream corrupt: frame {0}: reserved header bytes are not zero")]
    Reserved(u64),
    /// A frame longer than [`MAX_FRAME`].
    #[error("migration stream corrupt: frame {0}: length {1} above {MAX_FRAME}")]
    TooLong(u64, u32),
    /// A PAGES payload that ends inside an entry.
    #[error("migration stream corrupt: PAGES frame: entry cut at byte {0}")]
    PageCut(usize),
    /// A frame that is not valid here.
    #[error("migration stream: unexpected {0:?} frame ({1})")]
    Unexpected(Kind, &'static str),
    /// A JSON payload that does not decode.
    #[error("migration stream: bad {0:?} payload")]
    Json(Kind, #[source] serde_json::Error),
}

/// HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The VM's name on the source.
    pub name: String,
    /// Its shape; the destination must have the same.
    pub shape: crate::persist::Shape,
    /// When the destination runs the guest.
    pub resume: vmm_api::migration::ResumeMode,
}

/// REPLY, READY and ABORT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Accepted.
    pub ok: bool,
    /// Otherwise why not.
    pub error: Option<String>,
}

/// PROGRESS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Iteration just finished (0 = full pass).
    pub iteration: u64,
    /// Dirty bytes the source still has to send.
    pub bytes_remaining: u64,
}

/// COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Wall-clock microseconds when the source's last vCPU paused.
    pub paused_at_us: u64,
    /// Wall-clock microseconds when the source started the migration.
    pub started_at_us: u64,
}

/// RESUMED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// Wall-clock microseconds when the destination's first vCPU ran.
    pub resumed_at_us: u64,
}

/// Writes the preamble.
pub fn write_preamble(w: &mut impl Write) -> Result<(), WireError> {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(MAGIC);
    p[8..].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&p)?;
    Ok(())
}

/// Reads and checks the preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<(), WireError> {
    read_magic(r)?;
    read_version(r)
}

/// Reads and checks the preamble's first part, the magic: whether the peer speaks this
/// protocol at all (the destination's gate reads it before it takes a connection as the source).
pub fn read_magic(r: &mut impl Read) -> Result<(), WireError> {
    let mut m = [0u8; MAGIC.len()];
    r.read_exact(&mut m)?;
    if &m != MAGIC {
        return Err(WireError::Magic(m.to_vec()));
    }
    Ok(())
}

/// Reads and checks the preamble's second part, the version.
pub fn read_version(r: &mut impl Read) -> Result<(), WireError> {
    let mut v = [0u8; PREAMBLE_LEN - MAGIC.len()];
    r.read_exact(&mut v)?;
    let v = u32::from_le_bytes(v);
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    Ok(())
}

/// A frame's header.
fn frame_header(kind: Kind, len: usize, crc: u32) -> [u8; FRAME_HEADER] {
    let mut h = [0u8; FRAME_HEADER];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..12].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    let h = frame_header(kind, payload.len(), crc32fast::hash(payload));
    w.write_all(&h)?;
    w.write_all(payload)?;
    Ok(())
}

/// Writes a frame with a JSON payload.
pub fn write_json(w: &mut impl Write, kind: Kind, v: &impl Serialize) -> Result<(), WireError> {
    let payload = serde_json::to_vec(v).map_err(|e| WireError::Json(kind, e))?;
    write_frame(w, kind, &payload)
}

/// Reads frames, counting them for error messages.
pub struct FrameReader<R> {
    inner: R,
    frames: u64,
    /// Payload bytes read so far.
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    /// Frames from `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            frames: 0,
            bytes: 0,
        }
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads one frame into `buf` and returns its kind.
    pub fn read(&mut self, buf: &mut Vec<u8>) -> Result<Kind, WireError> {
        let n = self.frames;
        self.frames += 1;
        let mut h = [0u8; FRAME_HEADER];
        self.inner.read_exact(&mut h)?;
        let kind = Kind::from_u8(h[0]).ok_or(WireError::UnknownKind(n, h[0]))?;
        if h[1..4] != [0, 0, 0] {
            return Err(WireError::Reserved(n));
        }
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            return Err(WireError::TooLong(n, len));
        }
        let stored = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        // The buffer keeps its length from the frame before, so that bytes already
        // initialised are not zeroed again (PAGES frames are all about one size); it grows
        // with what arrives, not with what the header claims: a peer that announces 64 MiB
        // and sends nothing costs at most one step.
        let len = len as usize;
        buf.truncate(len);
        let mut got = 0;
        while got < len {
            let end = (got + READ_STEP).min(len);
            if buf.len() < end {
                buf.resize(end, 0);
            }
            self.inner.read_exact(&mut buf[got..end])?;
            got = end;
        }
        self.bytes += (FRAME_HEADER + len) as u64;
        let computed = crc32fast::hash(buf);
        if computed != stored {
            return Err(WireError::Checksum(n, kind, stored, computed));
        }
        Ok(kind)
    }

    /// Reads one frame of kind `want` with a JSON payload.
    pub fn read_json<T: DeserializeOwned>(
        &mut self,
        want: Kind,
        context: &'static str,
    ) -> Result<T, WireError> {
        let mut buf = Vec::new();
        let kind = self.read(&mut buf)?;
        if kind != want {
            return Err(WireError::Unexpected(kind, context));
        }
        serde_json::from_slice(&buf).map_err(|e| WireError::Json(kind, e))
    }
}

/// Decodes a JSON payload.
pub fn json<T: DeserializeOwned>(kind: Kind, buf: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(buf).map_err(|e| WireError::Json(kind, e))
}

/// Builds PAGES frames of about `max` bytes in one buffer, header included, so that a frame
/// goes out in one write (past the writer's buffer when it is the larger). The buffer is
/// allocated and initialised once; a page is copied into it straight from guest memory, and
/// the checksum is updated while the page is still in the cache.
pub struct PageBatch {
    /// The frame header, then the entries.
    buf: Vec<u8>,
    /// Bytes of `buf` in use, the header included.
    len: usize,
    max: usize,
    crc: crc32fast::Hasher,
    /// Pages with data in the batch.
    pub pages: u64,
    /// Zero markers in the batch.
    pub zeroes: u64,
}

impl PageBatch {
    /// An empty batch.
    pub fn new(max: usize) -> PageBatch {
        PageBatch {
            buf: vec![0; FRAME_HEADER + max + ENTRY_HEADER + PAGE_SIZE],
            len: FRAME_HEADER,
            max,
            crc: crc32fast::Hasher::new(),
            pages: 0,
            zeroes: 0,
        }
    }

    /// Adds a page with data (the tests' pages; the VMM's come from guest memory through
    /// [`PageBatch::push_from`]).
    #[cfg(test)]
    pub fn push(&mut self, addr: u64, data: &[u8; PAGE_SIZE]) {
        let at = self.len;
        self.buf[at..at + ENTRY_HEADER].copy_from_slice(&addr.to_le_bytes());
        self.buf[at + ENTRY_HEADER..at + ENTRY_HEADER + PAGE_SIZE].copy_from_slice(data);
        self.commit(at, ENTRY_HEADER + PAGE_SIZE);
        self.pages += 1;
    }

    /// Adds the page at `addr` read from `page` (a page of guest memory), with its data, or
    /// as a zero marker when `zero_marker` is set and the page is all zeroes. Returns whether
    /// it was all zeroes; such a page is left out when `zero_marker` is not set.
    pub fn push_from<B: BitmapSlice>(
        &mut self,
        addr: u64,
        page: &VolatileSlice<B>,
        zero_marker: bool,
    ) -> bool {
        let at = self.len;
        let data = &mut self.buf[at + ENTRY_HEADER..at + ENTRY_HEADER + PAGE_SIZE];
        // One read of guest memory; the zero test runs on the copy (the guest may change
        // the page meanwhile: the dirty log has it sent again).
        page.copy_to(data);
        if *data == ZERO_PAGE {
            if zero_marker {
                self.push_zero(addr);
            }
            return true;
        }
        self.buf[at..at + ENTRY_HEADER].copy_from_slice(&addr.to_le_bytes());
        self.commit(at, ENTRY_HEADER + PAGE_SIZE);
        self.pages += 1;
        false
    }

    /// Adds a zero page marker.
    pub fn push_zero(&mut self, addr: u64) {
        let at = self.len;
        self.buf[at..at + ENTRY_HEADER].copy_from_slice(&(addr | PAGE_ZERO).to_le_bytes());
        self.commit(at, ENTRY_HEADER);
        self.zeroes += 1;
    }

    /// Takes the `n` bytes written at `at` into the frame.
    fn commit(&mut self, at: usize, n: usize) {
        self.crc.update(&self.buf[at..at + n]);
        self.len = at + n;
    }

    /// The batch is full.
    pub fn full(&self) -> bool {
        self.len - FRAME_HEADER >= self.max
    }

    /// Sends the batch if not empty and empties it; returns the bytes written.
    pub fn flush(&mut self, w: &mut impl Write) -> Result<u64, WireError> {
        if self.len == FRAME_HEADER {
            return Ok(0);
        }
        let crc = std::mem::take(&mut self.crc).finalize();
        let header = frame_header(Kind::Pages, self.len - FRAME_HEADER, crc);
        self.buf[..FRAME_HEADER].copy_from_slice(&header);
        w.write_all(&self.buf[..self.len])?;
        let n = self.len as u64;
        self.len = FRAME_HEADER;
        Ok(n)
    }
}

/// The entries of a PAGES payload, in order: `(address, Some(data))`, or `(address, None)`
/// for a zero page.
pub fn pages(payload: &[u8]) -> Pages<'_> {
    Pages { payload, at: 0 }
}

/// Iterator over a PAGES payload; see [`pages`]. A cut entry ends it with an error.
pub struct Pages<'a> {
    payload: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Pages<'a> {
    type Item = Result<(u64, Option<&'a [u8]>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.payload.len() {
            return None;
        }
        let Some(head) = self.payload.get(self.at..self.at + 8) else {
            let at = self.at;
            self.at = self.payload.len();
            return Some(Err(WireError::PageCut(at)));
        };
        let v = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        self.at += 8;
        let addr = v & !(PAGE_SIZE as u64 - 1);
        if v & PAGE_ZERO != 0 {
            return Some(Ok((addr, None)));
        }
        let Some(data) = self.payload.get(self.at..self.at + PAGE_SIZE) else {
            let at = self.at;
            self.at = self.payload.len();
            return Some(Err(WireError::PageCut(at)));
        };
        self.at += PAGE_SIZE;
        Some(Ok((addr, Some(data))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut out = Vec::new();
        write_preamble(&mut out).unwrap();
        let mut b = PageBatch::new(1 << 20);
        b.push(0x1000, &[7u8; 4096]);
        b.push_zero(0x3000);
        b.flush(&mut out).unwrap();
        write_json(&mut out, Kind::Progress, &Progress::default()).unwrap();

        let mut r = FrameReader::new(&out[..]);
        read_preamble(r.get_mut()).unwrap();
        let mut buf = Vec::new();
        assert_eq!(r.read(&mut buf).unwrap(), Kind::Pages);
        let seen: Vec<_> = pages(&buf)
            .map(|p| p.map(|(a, d)| (a, d.map(|d| d[0]))))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(seen, vec![(0x1000, Some(7)), (0x3000, None)]);
        let _: Progress = r.read_json(Kind::Progress, "test").unwrap();

        let mut bad = out.clone();
        bad[12 + 12 + 100] ^= 1;
        let mut r = FrameReader::new(&bad[..]);
        read_preamble(r.get_mut()).unwrap();
        assert!(matches!(
            r.read(&mut buf),
            Err(WireError::Checksum(0, Kind::Pages, ..))
        ));

        let mut v2 = out.clone();
        v2[8] = 9;
        assert!(matches!(
            read_preamble(&mut &v2[..]),
            Err(WireError::Version(9))
        ));
        assert!(matches!(
            read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(WireError::Magic(_))
        ));
        assert!(pages(&[1, 2, 3]).any(|p| p.is_err()));
    }

    #[test]
    fn a_batch_takes_pages_from_guest_memory_and_marks_or_skips_zero_pages() {
        let mut guest = vec![0u8; 4 * PAGE_SIZE];
        guest[PAGE_SIZE..2 * PAGE_SIZE].fill(5);
        guest[3 * PAGE_SIZE - 1] = 9;
        let mem = VolatileSlice::from(&mut guest[..]);
        let page = |i: usize| mem.subslice(i * PAGE_SIZE, PAGE_SIZE).unwrap();
        let mut b = PageBatch::new(1 << 20);
        assert!(b.push_from(0, &page(0), true));
        assert!(!b.push_from(0x1000, &page(1), true));
        assert!(!b.push_from(0x2000, &page(2), false));
        assert!(b.push_from(0x3000, &page(3), false));
        assert_eq!((b.pages, b.zeroes), (2, 1));
        let mut out = Vec::new();
        let n = b.flush(&mut out).unwrap();
        assert_eq!(n as usize, out.len());
        // The checksum starts again with each frame.
        b.push_zero(0x5000);
        b.flush(&mut out).unwrap();
        assert_eq!(b.flush(&mut out).unwrap(), 0);

        let mut r = FrameReader::new(&out[..]);
        let mut buf = Vec::new();
        assert_eq!(r.read(&mut buf).unwrap(), Kind::Pages);
        let seen: Vec<_> = pages(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], (0, None));
        assert_eq!(seen[1], (0x1000, Some(&guest[PAGE_SIZE..2 * PAGE_SIZE])));
        assert_eq!(
            seen[2],
            (0x2000, Some(&guest[2 * PAGE_SIZE..3 * PAGE_SIZE]))
        );
        assert_eq!(r.read(&mut buf).unwrap(), Kind::Pages);
        assert_eq!(pages(&buf).collect::<Vec<_>>().len(), 1);
    }

    #[test]
    fn the_frame_buffer_is_reused_across_frames_of_any_size() {
        let big: Vec<u8> = (0..READ_STEP + 5000).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        write_frame(&mut out, Kind::State, &big).unwrap();
        write_frame(&mut out, Kind::Progress, b"{}").unwrap();
        write_frame(&mut out, Kind::State, &big[7..]).unwrap();
        write_frame(&mut out, Kind::Sync, &[]).unwrap();
        let mut r = FrameReader::new(&out[..]);
        let mut buf = Vec::new();
        assert_eq!(r.read(&mut buf).unwrap(), Kind::State);
        assert_eq!(buf, big);
        assert_eq!(r.read(&mut buf).unwrap(), Kind::Progress);
        assert_eq!(buf, b"{}");
        assert_eq!(r.read(&mut buf).unwrap(), Kind::State);
        assert_eq!(buf, &big[7..]);
        assert_eq!(r.read(&mut buf).unwrap(), Kind::Sync);
        assert!(buf.is_empty());

        // A frame that ends early is an end of stream, whatever its header said.
        let mut cut = Vec::new();
        write_frame(&mut cut, Kind::State, &big).unwrap();
        cut.truncate(FRAME_HEADER + 100);
        let mut r = FrameReader::new(&cut[..]);
        assert!(matches!(r.read(&mut buf), Err(WireError::Io(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof));
    }
}
