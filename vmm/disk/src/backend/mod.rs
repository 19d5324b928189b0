//! Where a disk's data lives. Every operation is async so the data path can keep many
//! requests in flight: a local file runs each request on tokio's blocking pool (positional
//! I/O, no shared file offset); the storaged client pipelines requests on its NBD connection.
//!
//! Mapping of virtio-blk requests: IN/OUT to read/write, FLUSH to fsync or NBD_CMD_FLUSH
//! (virtio-blk has no per-request FUA: the guest orders durability with FLUSH, which is why
//! VIRTIO_BLK_F_FLUSH is always offered), DISCARD to a hole punch or NBD_CMD_TRIM,
//! WRITE_ZEROES to FALLOC_FL_ZERO_RANGE or NBD_CMD_WRITE_ZEROES.

mod file;
mod outage;
mod storaged;
mod tls;

#[cfg(test)]
mod testing {
    //! A storaged for the backend's tests that runs apart from the disk, as the separate
    //! process it is: on a runtime of its own, with one worker.
    use std::sync::Arc;
    use std::time::Duration;
    use storaged::registry::Registry;
    use storaged::server::NbdTls;
    use storaged_client::api::VolumeConfig;

    /// A multi-thread runtime of `workers` workers.
    pub(super) fn runtime(workers: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A storaged serving a 64 MiB volume `v` from `dir`: its runtime, its NBD address, and
    /// the sender that stops it.
    pub(super) fn storaged_apart(
        dir: &std::path::Path,
        tls: Option<NbdTls>,
    ) -> (
        tokio::runtime::Runtime,
        String,
        tokio::sync::watch::Sender<bool>,
    ) {
        let rt = runtime(1);
        let (addr, stop) = rt.block_on(async {
            let reg = Arc::new(Registry::open(dir).unwrap());
            reg.create(VolumeConfig::new("v", 64 << 20)).await.unwrap();
            let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = nbd.local_addr().unwrap().to_string();
            let (stop, rx) = tokio::sync::watch::channel(false);
            let server = storaged::server::run(nbd, reg, tls, rx, Duration::from_secs(1));
            tokio::spawn(server);
            (addr, stop)
        });
        (rt, addr, stop)
    }
}

pub use file::FileBackend;
pub use storaged::StoragedBackend;

use nix::fcntl::FallocateFlags;
use std::os::unix::fs::FileExt;
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
    /// The storaged client failed (connect, lease or I/O).
    #[error("storaged")]
    Storaged(#[from] storaged_client::nbd::ClientError),
    /// A storaged disk names no host id and has no certificate to take it from.
    #[error("a storaged disk needs host_id or a tls_dir whose certificate names the host")]
    NoHostId,
    /// The disk's TLS directory cannot be used.
    #[error("TLS directory {0}")]
    Tls(std::path::PathBuf, #[source] vmhop_common::tls::TlsError),
    /// The configured host id is not the one the certificate proves.
    #[error(
        "the disk names host {configured:?}, but the certificate in {} proves host \
         {certificate:?}: fix host_id or the TLS directory", dir.display()
    )]
    HostMismatch {
        /// The configured host id.
        configured: String,
        /// The TLS directory.
        dir: std::path::PathBuf,
        /// The host id its certificate proves.
        certificate: String,
    },
}

/// A block device's backend.
#[derive(Debug)]
pub enum Backend {
    /// A local file.
    File(FileBackend),
    /// A storaged volume.
    Storaged(StoragedBackend),
}

impl Backend {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Backend::File(f) => f.size,
            Backend::Storaged(s) => s.size(),
        }
    }

    /// Whether the backend itself is read-only (the device is then offered read-only).
    pub fn read_only(&self) -> bool {
        match self {
            Backend::File(_) => false,
            Backend::Storaged(s) => s.read_only(),
        }
    }

    /// Whether DISCARD and WRITE_ZEROES are offered.
    pub fn supports_discard(&self) -> bool {
        match self {
            Backend::File(_) => true,
            Backend::Storaged(s) => s.supports_discard(),
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
            Backend::Storaged(s) => s.read(offset, len).await,
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => {
                f.blocking("write", move |file| file.write_all_at(&data, offset))
                    .await
            }
            Backend::Storaged(s) => s.write(offset, data).await,
        }
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => f.blocking("flush", |file| file.sync_data()).await,
            Backend::Storaged(s) => s.flush().await,
        }
    }

    /// Deallocates a range (reads return zeroes afterwards).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => {
                f.blocking("discard", move |file| {
                    FileBackend::fallocate(
                        file,
                        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                })
                .await
            }
            Backend::Storaged(s) => s.discard(offset, len).await,
        }
    }

    /// Zeroes a range.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Backend::File(f) => {
                f.blocking("write zeroes", move |file| {
                    FileBackend::fallocate(
                        file,
                        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
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
            Backend::Storaged(s) => s.write_zeroes(offset, len).await,
        }
    }
}
