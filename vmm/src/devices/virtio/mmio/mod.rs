//! The virtio-mmio transport, version 2 (virtio 1.x, "modern" only), and its saved state.

mod persist;
mod transport;
pub use persist::{QueueState, TransportState, TransportStateError};
pub use transport::{MmioTransport, QUEUE_NOTIFY_OFFSET};
