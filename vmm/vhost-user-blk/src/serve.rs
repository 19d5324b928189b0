//! The socket: one frontend at a time, one after another, until the process is told to stop.
//! Each connection gets a fresh [`BlkBackend`] and `vhost-user-backend` daemon (the protocol
//! state starts over: a reconnecting frontend sets everything up again); the disk stays open
//! across connections.

use crate::backend::BlkBackend;
use crate::queue::Mem;
use std::convert::Infallible;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryMmap;
use vmm_disk::Disk;

/// Why the backend stopped serving.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The socket could not be created.
    #[error("listen on {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The vhost-user daemon could not start or accept (its error type implements `Display`
    /// but not `std::error::Error`, so it is shown in this message rather than as a source).
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
}

/// Serves `disk` on a Unix socket at `socket` (an old file there is replaced) with up to
/// `queues` request queues, one frontend connection after another. Returns only on an error.
pub fn serve(
    socket: &Path,
    disk: Disk,
    queues: u16,
    runtime: tokio::runtime::Handle,
) -> Result<Infallible, ServeError> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).map_err(|e| ServeError::Bind(socket.to_path_buf(), e))?;
    let mut listener = Listener::from(listener);
    tracing::info!(socket = %socket.display(), size = disk.size(), read_only = disk.read_only(),
        queues, "waiting for a frontend");
    let mut connection = 0u64;
    loop {
        connection += 1;
        let mem = Mem::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(
            disk.clone(),
            queues,
            mem.clone(),
            runtime.clone(),
        ));
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".into(), backend, mem)
            .map_err(ServeError::Daemon)?;
        daemon.start(&mut listener).map_err(ServeError::Daemon)?;
        tracing::info!(connection, "frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => tracing::info!(connection, "frontend disconnected"),
            Err(e) => tracing::warn!(connection, error = %e, "frontend connection ended"),
        }
    }
}
