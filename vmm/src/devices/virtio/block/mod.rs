//! virtio-blk served in the VMM: one request queue, served off the vCPU threads by an async
//! worker with many requests in flight. The requests, the backends (a local file or a storaged
//! volume) and the offer come from the `vmm-disk` crate, which the vhost-user backend process
//! shares.

mod device;
mod persist;
#[cfg(test)]
mod testing;
mod worker;

pub use device::{Block, BlockError};
pub use persist::{BlockState, BlockStateError};
pub use vmm_disk::{
    Backend, BackendError, Disk, FileBackend, Request, RequestError, RequestKind, StoragedBackend,
    QUEUE_SIZE, SECTOR_SIZE,
};
