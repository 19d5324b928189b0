//! virtio-blk: one request queue, served off the vCPU threads by an async worker with many
//! requests in flight, over a local file or a storaged volume.

mod backend;
mod device;
mod persist;
mod request;
mod worker;

pub use backend::{Backend, BackendError, FileBackend, StoragedBackend};
pub use device::{Block, BlockError, QUEUE_SIZE, SECTOR_SIZE};
pub use persist::{BlockState, BlockStateError};
pub use request::{Request, RequestError, RequestKind};
