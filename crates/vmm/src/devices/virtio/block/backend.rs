//! Where a block device's data lives. Every operation is async so the worker can keep many
//! requests in flight: a local file runs each request on tokio's blocking pool (positional
//! I/O, no shared file offset); the storaged client pipelines requests on its NBD connection.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// Errors from a backend.
#[derive(Debug, Error)]
pub enum BackendError {
    /// Opening the file failed.
    #[error("open {0}")]
    Open(String, #[source] std::io::Error),
    /// Another process holds the file (a second VMM on the same disk).
    #[error("{0} is in use by another process")]
    Locked(String),
    /// An I/O request failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The blocking task was lost (runtime shutting down).
    #[error("I/O task lost")]
    TaskLost,
}

/// A raw image in a local file.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
}

impl FileBackend {
    /// Opens `path`, locked shared for read-only use and exclusive otherwise, so two VMMs never
    /// write one image.
    pub fn open(path: &Path, read_only: bool) -> Result<FileBackend, BackendError> {
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BackendError::Open(name.clone(), e))?;
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a valid, owned file descriptor; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(BackendError::Locked(name));
        }
        let size = file
            .metadata()
            .map_err(|e| BackendError::Open(name, e))?
            .len();
        Ok(FileBackend {
            file: Arc::new(file),
            size,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BackendError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|_| BackendError::TaskLost)?
            .map_err(|e| BackendError::Io(what, e))
    }

    fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a valid, owned descriptor with plain integer arguments.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// A block device's backend.
#[derive(Debug)]
pub enum Backend {
    /// A local file.
    File(FileBackend),
}

impl Backend {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Backend::File(f) => f.size,
        }
    }

    /// Whether DISCARD and WRITE_ZEROES are offered.
    pub fn supports_discard(&self) -> bool {
        match self {
            Backend::File(_) => true,
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BackendError> {
        match self {
            Backend::File(f) => {
                f.blocking("read", move |file| {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset)?;
                    Ok(buf)
                })
                .await
            }
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => {
                f.blocking("write", move |file| file.write_all_at(&data, offset))
                    .await
            }
        }
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => f.blocking("flush", |file| file.sync_data()).await,
        }
    }

    /// Deallocates a range (reads return zeroes afterwards).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => {
                f.blocking("discard", move |file| {
                    FileBackend::fallocate(
                        file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                })
                .await
            }
        }
    }

    /// Zeroes a range.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => {
                f.blocking("write zeroes", move |file| {
                    FileBackend::fallocate(
                        file,
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                    .or_else(|_| {
                        // Filesystems without ZERO_RANGE: write the zeroes.
                        let zeroes = vec![0u8; 1 << 20];
                        let mut at = 0;
                        while at < len {
                            let n = (len - at).min(zeroes.len() as u64) as usize;
                            file.write_all_at(&zeroes[..n], offset + at)?;
                            at += n as u64;
                        }
                        Ok(())
                    })
                })
                .await
            }
        }
    }
}
