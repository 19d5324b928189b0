//! A raw image in a local file: positional I/O on tokio's blocking pool.

use super::BackendError;
use nix::fcntl::{fallocate, FallocateFlags};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// A raw image in a local file.
#[derive(Debug)]
pub struct FileBackend {
    /// Locked for as long as the backend lives: the lock (flock(2)) goes with the descriptor,
    /// so closing it releases the lock and nothing can fail on the way out.
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
        let locked = if read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        locked.map_err(|_| BackendError::Locked(name.clone()))?;
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

    pub(super) fn fallocate(
        file: &File,
        mode: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        Ok(fallocate(file, mode, offset as i64, len as i64)?)
    }
}
