//! The virtio-blk device: features, configuration space, and starting/stopping the worker.

use super::backend::Backend;
use super::worker::{QueueWorker, Stop};
use crate::devices::virtio::{
    read_config_bytes, Activation, VirtioDevice, VirtioError, VIRTIO_RING_F_EVENT_IDX,
};
use std::sync::Arc;
use thiserror::Error;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Descriptors per queue, and so the most requests in flight.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Largest discard / write-zeroes request, in sectors (1 GiB).
const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Ranges in one discard / write-zeroes request.
const MAX_RANGE_SEGMENTS: u32 = 32;

/// Errors of the block device.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The backend could not be set up.
    #[error("block backend")]
    Backend(#[source] super::backend::BackendError),
}

/// A virtio-blk device.
pub struct Block {
    backend: Arc<Backend>,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: Vec<u8>,
    /// Disk size in bytes.
    pub(super) size: u64,
    /// Feature bits offered.
    pub(super) features: u64,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<Stop>>,
}

/// How long a drain may take: requests in flight on a network volume must finish first.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Block {
    /// A device over `backend`; `id` is what GET_ID returns (truncated to 20 bytes). Its worker
    /// runs on `runtime`.
    pub fn new(
        backend: Backend,
        read_only: bool,
        id: &str,
        runtime: tokio::runtime::Handle,
    ) -> Block {
        let mut features = (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VIRTIO_RING_F_EVENT_IDX;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else if backend.supports_discard() {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            config: config_space(backend.size()),
            size: backend.size(),
            backend: Arc::new(backend),
            read_only,
            id: id_bytes,
            features,
            runtime,
            stop: None,
        }
    }
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap`.
fn config_space(size: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes()); // capacity
    c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 0; // write_zeroes_may_unmap: zeroes are written, not holes punched
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "ignored write to virtio-blk configuration");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        let Activation {
            mem,
            mut queues,
            features,
            interrupt,
        } = activation;
        let Some((queue, evt)) = queues.pop() else {
            return Err(VirtioError::InvalidQueue(0));
        };
        let _guard = self.runtime.enter();
        let worker = QueueWorker::new(
            mem,
            queue,
            evt,
            interrupt,
            self.backend.clone(),
            self.read_only,
            self.id,
            features & VIRTIO_RING_F_EVENT_IDX != 0,
        )
        .map_err(|e| VirtioError::Activate("register queue eventfd with tokio", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(worker.run(rx));
        self.stop = Some(tx);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Reset);
        }
    }

    fn quiesce(&mut self) -> Result<Vec<virtio_queue::Queue>, VirtioError> {
        let Some(stop) = self.stop.take() else {
            return Err(VirtioError::DataPathGone);
        };
        let (tx, rx) = std::sync::mpsc::channel();
        stop.send(Stop::Drain(tx))
            .map_err(|_| VirtioError::DataPathGone)?;
        match rx.recv_timeout(DRAIN_TIMEOUT) {
            Ok(queue) => Ok(vec![queue]),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(VirtioError::DrainTimeout(DRAIN_TIMEOUT))
            }
            Err(_) => Err(VirtioError::DataPathGone),
        }
    }
}
