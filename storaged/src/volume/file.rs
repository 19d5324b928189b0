//! The sparse file that holds a volume's data.
//!
//! I/O is positional (`pread`/`pwrite`) on one shared file descriptor, so requests from many
//! connections run in parallel without a seek position to protect. Durability: `FLUSH` is
//! `fdatasync`; an FUA write is a `pwritev2(RWF_DSYNC)`, which makes just that range durable.
//! System calls go through `nix` where it wraps them (`fallocate`, `lseek`, `posix_fadvise`);
//! nix has no `preadv2` or `pwritev2`, which stay on `libc` in one small function each.
//!
//! Which ranges hold data ([`VolumeFile::spans`]) comes from `SEEK_DATA` / `SEEK_HOLE`, so a
//! hole punched by TRIM or WRITE_ZEROES, or never written, is reported as one.

use nix::errno::Errno;
use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use storaged_client::api::VolumeConfigError;
use thiserror::Error;

/// Deallocates a range without changing the file's size.
const PUNCH_HOLE: FallocateFlags =
    FallocateFlags::FALLOC_FL_PUNCH_HOLE.union(FallocateFlags::FALLOC_FL_KEEP_SIZE);

/// A volume operation that failed.
#[derive(Debug, Error)]
pub enum VolumeError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] VolumeConfigError),
    /// File system error on the volume's file.
    #[error("volume file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A run of bytes that is all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Its length.
    pub length: u32,
    /// Whether it is allocated (a hole reads as zeroes).
    pub allocated: bool,
}

/// The file behind a volume.
#[derive(Debug)]
pub struct VolumeFile {
    file: File,
    path: PathBuf,
    size: u64,
    /// The file system refused `RWF_NOWAIT` for buffered writes (ext4 does): skip the attempt.
    nowait_writes_unsupported: AtomicBool,
}

impl VolumeFile {
    /// Path of a volume's file in `dir`.
    pub fn path_in(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.img"))
    }

    /// Opens the file of an existing volume (created empty if it went missing).
    pub fn open(path: &Path, size: u64) -> Result<VolumeFile, VolumeError> {
        Self::open_with(path, size, false)
    }

    /// Creates the file of a new volume: empty and sparse, whatever a file of the same name
    /// held before (a volume deleted by a process that died before removing its file).
    pub fn create(path: &Path, size: u64) -> Result<VolumeFile, VolumeError> {
        Self::open_with(path, size, true)
    }

    fn open_with(path: &Path, size: u64, truncate: bool) -> Result<VolumeFile, VolumeError> {
        let io_err = |source| VolumeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .open(path)
            .map_err(io_err)?;
        if file.metadata().map_err(io_err)?.len() != size {
            file.set_len(size).map_err(io_err)?;
        }
        file.sync_all().map_err(io_err)?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        Ok(VolumeFile {
            file,
            path: path.to_path_buf(),
            size,
            nowait_writes_unsupported: AtomicBool::new(false),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`; with `fua` the range is durable on return.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if !fua {
            return self.file.write_all_at(buf, offset);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let at = offset + done as u64;
            match self.pwritev2(rest, at, libc::RWF_DSYNC) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.file.write_all_at(rest, at)?;
                    return self.file.sync_data();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads from the page cache only (`preadv2(RWF_NOWAIT)`): `Ok(true)` when all of `buf`
    /// was filled without blocking; `Ok(false)` when the caller must do a blocking read.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let len = buf.len();
        match self.preadv2(buf, offset, libc::RWF_NOWAIT) {
            Ok(n) => Ok(n == len),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINTR) => Ok(false),
                _ => Err(e),
            },
        }
    }

    /// Writes into the page cache only if that cannot block (`pwritev2(RWF_NOWAIT)`):
    /// `Ok(true)` when all of `buf` was written; `Ok(false)` when the caller must do a blocking
    /// write of the whole buffer (rewriting a prefix that did land is harmless).
    pub fn write_cached(&self, buf: &[u8], offset: u64) -> io::Result<bool> {
        if self.nowait_writes_unsupported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.pwritev2(buf, offset, libc::RWF_NOWAIT) {
            Ok(n) => Ok(n == buf.len()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => {
                    self.nowait_writes_unsupported
                        .store(true, Ordering::Relaxed);
                    Ok(false)
                }
                Some(libc::EAGAIN | libc::EINTR) => Ok(false),
                _ => Err(e),
            },
        }
    }

    // nix (0.30) wraps preadv/pwritev but not preadv2/pwritev2, whose per-call flags
    // (RWF_NOWAIT, RWF_DSYNC) this file needs: these two libc calls stay, one small function each.

    /// One `preadv2` into `buf` at `offset`: the count read, which may be short.
    fn preadv2(&self, buf: &mut [u8], offset: u64, flags: libc::c_int) -> io::Result<usize> {
        let (fd, off) = (self.file.as_raw_fd(), offset as libc::off_t);
        let iov = [IoSliceMut::new(buf)];
        // SAFETY: `IoSliceMut` has the layout of `iovec`; it describes `buf`, which is
        // exclusively borrowed for the call.
        let n = unsafe { libc::preadv2(fd, iov.as_ptr().cast(), 1, off, flags) };
        Ok(Errno::result(n)? as usize)
    }

    /// One `pwritev2` of `buf` at `offset`: the count written, which may be short.
    fn pwritev2(&self, buf: &[u8], offset: u64, flags: libc::c_int) -> io::Result<usize> {
        let (fd, off) = (self.file.as_raw_fd(), offset as libc::off_t);
        let iov = [IoSlice::new(buf)];
        // SAFETY: `IoSlice` has the layout of `iovec`; it describes `buf`, which outlives the
        // call and which the kernel only reads.
        let n = unsafe { libc::pwritev2(fd, iov.as_ptr().cast(), 1, off, flags) };
        Ok(Errno::result(n)? as usize)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a range (reads return zeroes afterwards).
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(PUNCH_HOLE, offset, len)
    }

    /// Zeroes a range, keeping it allocated when `no_hole`; durable on return with `fua`.
    /// With `fast`, fails with `ENOTSUP` instead of writing zeroes where the file system cannot
    /// zero the range without writing them.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
        fast: bool,
    ) -> io::Result<()> {
        let mode = if no_hole {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            PUNCH_HOLE
        };
        if let Err(e) = self.fallocate(mode, offset, len) {
            if fast {
                tracing::debug!(error = %e, "fallocate cannot zero: refusing a fast zero");
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            // File systems without the fallocate mode: write real zeroes.
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeroes.len() as u64) as usize;
                self.file.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Starts reading a range into the page cache (`NBD_CMD_CACHE`).
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let advice = PosixFadviseAdvice::POSIX_FADV_WILLNEED;
        Ok(posix_fadvise(
            &self.file,
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        )?)
    }

    /// The data and holes of `offset..offset + len`, in order and without gaps, from the start
    /// of the range: at most `max` spans, so they may end before the range does.
    pub fn spans(&self, offset: u64, len: u32, max: usize) -> io::Result<Vec<Span>> {
        let end = offset.saturating_add(len.into()).min(self.size);
        let mut spans: Vec<Span> = Vec::new();
        let mut at = offset;
        while at < end && spans.len() < max {
            let data = match lseek(&self.file, at as libc::off_t, Whence::SeekData) {
                Ok(d) => d as u64,
                // No data at or after `at`: a hole up to the end.
                Err(Errno::ENXIO) => end,
                Err(e) => return Err(e.into()),
            };
            let (next, allocated) = if data > at {
                (data.min(end), false)
            } else {
                let hole = lseek(&self.file, at as libc::off_t, Whence::SeekHole)? as u64;
                (hole.clamp(at + 1, end), true)
            };
            let length = (next - at) as u32;
            match spans.last_mut() {
                Some(last) if last.allocated == allocated => last.length += length,
                _ => spans.push(Span { length, allocated }),
            }
            at = next;
        }
        Ok(spans)
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        Ok(fallocate(
            &self.file,
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_io() {
        let dir = tempfile::tempdir().unwrap();
        let f = VolumeFile::create(&VolumeFile::path_in(dir.path(), "v"), 1 << 20).unwrap();
        f.write_at(&[7u8; 4096], 8192, false).unwrap();
        f.write_at(&[9u8; 512], 0, true).unwrap();
        let mut b = vec![0u8; 4096];
        f.read_at(&mut b, 8192).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        f.write_zeroes(8192, 4096, false, true, false).unwrap();
        f.read_at(&mut b, 8192).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        f.write_at(&[1u8; 4096], 8192, false).unwrap();
        f.trim(8192, 4096).unwrap();
        f.read_at(&mut b, 8192).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        f.write_zeroes(0, 512, true, false, true).unwrap();
        f.read_at(&mut b[..512], 0).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
        f.flush().unwrap();
        assert!(f.read_at(&mut b, (1 << 20) - 100).is_err());
        // The non-blocking variants either complete or tell the caller to block.
        if f.write_cached(&[5u8; 4096], 0).unwrap() {
            f.read_at(&mut b, 0).unwrap();
            assert!(b.iter().all(|&x| x == 5));
        }
        let mut c = vec![0u8; 4096];
        if f.read_cached(&mut c, 8192).unwrap() {
            assert!(c.iter().all(|&x| x == 0));
        }
        f.cache(0, 1 << 20).unwrap();
    }

    #[test]
    fn spans_follow_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = VolumeFile::path_in(dir.path(), "v");
        let f = VolumeFile::create(&path, 4 << 20).unwrap();
        let hole = |length| Span {
            length,
            allocated: false,
        };
        let data = |length| Span {
            length,
            allocated: true,
        };
        assert_eq!(f.spans(0, 4 << 20, 16).unwrap(), vec![hole(4 << 20)]);
        f.write_at(&[1u8; 1 << 20], 1 << 20, false).unwrap();
        assert_eq!(
            f.spans(0, 4 << 20, 16).unwrap(),
            vec![hole(1 << 20), data(1 << 20), hole(2 << 20)]
        );
        // From inside the data, bounded by the range, and by `max`.
        assert_eq!(
            f.spans(3 << 19, 1 << 20, 16).unwrap(),
            vec![data(1 << 19), hole(1 << 19)]
        );
        assert_eq!(f.spans(0, 4 << 20, 1).unwrap(), vec![hole(1 << 20)]);
        f.trim(1 << 20, 1 << 20).unwrap();
        assert_eq!(f.spans(0, 4 << 20, 16).unwrap(), vec![hole(4 << 20)]);
        // A re-created volume of the same name starts empty.
        f.write_at(&[2u8; 4096], 0, true).unwrap();
        drop(f);
        let again = VolumeFile::create(&path, 4 << 20).unwrap();
        let mut b = vec![1u8; 4096];
        again.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0), "old data in a new volume");
        let kept = VolumeFile::open(&path, 4 << 20).unwrap();
        assert_eq!(kept.spans(0, 4096, 4).unwrap(), vec![hole(4096)]);
    }
}
