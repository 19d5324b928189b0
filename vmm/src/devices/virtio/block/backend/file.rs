//! A raw image in a local file: positional I/O on tokio's blocking pool.

use super::BackendError;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// A raw image in a local file.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    pub(super) size: u64,
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

    pub(super) async fn blocking<T: Send + 'static>(
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

    pub(super) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a valid, owned descriptor with plain integer arguments.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}
