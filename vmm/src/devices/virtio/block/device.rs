//! The virtio-blk device: its offer (from `vmm-disk`), and starting/stopping the worker.

use super::worker::{QueueWorker, Stop};
use crate::devices::virtio::{read_config_bytes, Activation, VirtioDevice, VirtioError};
use thiserror::Error;
use vmm_disk::{Disk, Offer, QUEUE_SIZE};

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Errors of the block device.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The backend could not be set up.
    #[error("block backend")]
    Backend(#[source] vmm_disk::BackendError),
}

/// A virtio-blk device.
pub struct Block {
    disk: Disk,
    offer: Offer,
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
    /// A device over `disk`, with one request queue. Its worker runs on `runtime`.
    pub fn new(disk: Disk, runtime: tokio::runtime::Handle) -> Block {
        let offer = disk.offer(1);
        Block {
            size: disk.size(),
            features: offer.features,
            disk,
            offer,
            runtime,
            stop: None,
        }
    }
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
        read_config_bytes(&self.offer.config, offset, data);
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
            self.disk.clone(),
            features & crate::devices::virtio::VIRTIO_RING_F_EVENT_IDX != 0,
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
