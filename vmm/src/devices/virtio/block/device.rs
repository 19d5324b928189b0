//! The virtio-blk device: its offer (from `vmm-disk`), and starting/stopping the worker.

use super::worker::{Command, QueueWorker};
use crate::devices::virtio::{read_config_bytes, Activation, VirtioDevice, VirtioError};
use std::time::Duration;
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
    /// The running worker's commands.
    worker: Option<tokio::sync::mpsc::UnboundedSender<Command>>,
    drain_timeout: Duration,
}

/// How long a drain may take: requests in flight on a network volume must finish first.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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
            worker: None,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }

    /// The same device, giving up on a drain after `timeout` instead of [`DRAIN_TIMEOUT`].
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Block {
        self.drain_timeout = timeout;
        self
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
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.runtime.spawn(worker.run(rx));
        self.worker = Some(tx);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            let _ = worker.send(Command::Reset);
        }
    }

    /// Drains the worker. If that takes longer than the drain timeout, the worker is told to
    /// serve again and the data path stays as it was: the VM goes on here (a migration that
    /// needed the drain fails), and its disk works once the backend answers.
    fn quiesce(&mut self) -> Result<Vec<virtio_queue::Queue>, VirtioError> {
        let Some(worker) = self.worker.as_ref() else {
            return Err(VirtioError::DataPathGone);
        };
        let (tx, rx) = std::sync::mpsc::channel();
        if worker.send(Command::Drain(tx)).is_err() {
            self.worker = None;
            return Err(VirtioError::DataPathGone);
        }
        match rx.recv_timeout(self.drain_timeout) {
            Ok(queue) => {
                // Dropping the sender ends the worker: the queue is the caller's now.
                self.worker = None;
                Ok(vec![queue])
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(timeout = ?self.drain_timeout,
                    "virtio-blk: requests in flight did not complete in time; the queue \
                     goes on being served here");
                let _ = worker.send(Command::Resume);
                Err(VirtioError::DrainTimeout(self.drain_timeout))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                self.worker = None;
                Err(VirtioError::DataPathGone)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{disk, driving, reads, statuses, wait_used};
    use super::*;
    use crate::devices::virtio::VirtioInterrupt;
    use crate::devices::IrqLine;
    use std::sync::Arc;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn a_drain_that_times_out_leaves_the_disk_working() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody drives the runtime until said so: until then the worker cannot answer.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mem, _) = crate::memory::create_guest_memory(64).unwrap();
        let mut block =
            Block::new(disk(dir.path(), 1), rt.handle().clone()).with_drain_timeout(Duration::ZERO);
        let ring = MockSplitQueue::new(mem.as_ref(), 256);
        reads(&ring, &mem, 0, 1, 4096);
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![(ring.create_queue().unwrap(), notify.try_clone().unwrap())],
                features: 0,
                interrupt: Arc::new(VirtioInterrupt::new(IrqLine {
                    evt: irq.try_clone().unwrap(),
                    gsi: 5,
                })),
            })
            .unwrap();

        // A request in flight that does not complete in time: the drain fails.
        assert!(matches!(block.quiesce(), Err(VirtioError::DrainTimeout(_))));

        // The VM goes on: the request completes, and the guest's next ones are served.
        block.drain_timeout = DRAIN_TIMEOUT;
        driving(&rt, || {
            wait_used(&irq, &ring, 1);
            reads(&ring, &mem, 1, 2, 4096);
            notify.write(1).unwrap();
            wait_used(&irq, &ring, 3);
            // And a later drain hands the queue over where the guest left it.
            let queues = block.quiesce().unwrap();
            assert_eq!(queues[0].next_avail(), 3);
        });
        assert_eq!(statuses(&mem, 3), vec![0; 3]);
    }
}
