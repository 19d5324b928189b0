//! The vhost-user device: what the backend offers (the disk's offer from `vmm-disk`, plus the
//! vhost-user bits it implements), and the per-queue tasks of [`crate::queue`] it starts,
//! drains and resets as the frontend asks. One [`BlkBackend`] lives as long as one frontend
//! connection; the disk (and its storaged connection) outlives it.

use crate::queue::{Mem, QueueMsg, QueueWorker, Vring};
use crate::{MAX_QUEUES, MAX_QUEUE_SIZE};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_disk::{Disk, Offer};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// How long a queue may take to drain when the frontend stops it: requests in flight on a
/// network volume must finish first.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A disk behind one frontend connection.
pub struct BlkBackend {
    disk: Disk,
    offer: Offer,
    queues: u16,
    mem: Mem,
    runtime: tokio::runtime::Handle,
    /// The task of each queue, started at its first kick.
    workers: Mutex<Vec<Option<UnboundedSender<QueueMsg>>>>,
}

impl BlkBackend {
    /// A backend for `disk` offering up to `queues` request queues (clamped to
    /// 1..=[`MAX_QUEUES`]), serving guest memory `mem` (the daemon's) with tasks on `runtime`.
    pub fn new(disk: Disk, queues: u16, mem: Mem, runtime: tokio::runtime::Handle) -> BlkBackend {
        let queues = queues.clamp(1, MAX_QUEUES);
        BlkBackend {
            offer: disk.offer(queues),
            disk,
            queues,
            mem,
            runtime,
            workers: Mutex::new(vec![None; usize::from(queues)]),
        }
    }

    fn workers(&self) -> MutexGuard<'_, Vec<Option<UnboundedSender<QueueMsg>>>> {
        // Entries are replaced whole; a panic elsewhere cannot leave one half-written.
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task of queue `index`, started if needed.
    fn worker(&self, index: u16) -> Option<UnboundedSender<QueueMsg>> {
        let mut workers = self.workers();
        let slot = workers.get_mut(usize::from(index))?;
        if slot.as_ref().is_none_or(|tx| tx.is_closed()) {
            *slot = Some(QueueWorker::spawn(
                index,
                self.disk.clone(),
                self.mem.clone(),
                &self.runtime,
            ));
        }
        slot.clone()
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.offer.features
            | (1 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn acked_features(&self, features: u64) {
        tracing::info!(
            features = format_args!("{features:#x}"),
            "features acknowledged"
        );
    }

    fn reset_device(&self) {
        // Dropping the senders ends the tasks; requests in flight finish unreported.
        self.workers().iter_mut().for_each(|w| *w = None);
        tracing::info!("device reset");
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the daemon's epoll thread never ends, and dropping the daemon at the
        // end of a connection waits for it forever.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "create the queue thread's exit eventfd");
                None
            }
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings apply it (vhost-user-backend sets it on each queue).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.offer
            .config_bytes(u64::from(offset), size.min(4096) as usize)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Nothing in the offered configuration space is writable.
        tracing::debug!(
            offset,
            len = buf.len(),
            "ignored write to the configuration space"
        );
        Ok(())
    }

    fn update_memory(&self, _mem: Mem) -> std::io::Result<()> {
        // The daemon updated the memory the queues read through (`self.mem` is that object).
        tracing::info!("guest memory mapped");
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // An error here would end the daemon's epoll thread: log instead.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            tracing::warn!(device_event, "event for no queue");
            return Ok(());
        };
        match self.worker(device_event) {
            Some(tx) => {
                let _ = tx.send(QueueMsg::Kick(vring.clone()));
            }
            None => tracing::warn!(queue = device_event, "kick for a queue beyond the offer"),
        }
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let tx = u16::try_from(queue_index)
            .ok()
            .and_then(|i| self.workers().get(usize::from(i)).cloned().flatten());
        let Some(tx) = tx else {
            return Ok(()); // never started: nothing in flight
        };
        let (reply, done) = std::sync::mpsc::channel();
        if tx.send(QueueMsg::Drain(reply)).is_err() {
            return Ok(());
        }
        match done.recv_timeout(DRAIN_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Ok(()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!(queue = queue_index, timeout = ?DRAIN_TIMEOUT,
                    "requests in flight did not complete; refusing to report the ring's position");
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
            }
        }
    }
}
