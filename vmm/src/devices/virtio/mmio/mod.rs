//! The virtio-mmio transport, version 2 (virtio 1.x, "modern" only).

mod transport;
pub use transport::{MmioTransport, QUEUE_NOTIFY_OFFSET};
