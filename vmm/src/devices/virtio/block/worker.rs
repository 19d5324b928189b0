//! The block data path: an async task per activated queue.
//!
//! It waits on the queue's ioeventfd, pops every available chain, parses it and starts the
//! backend I/O as its own task, so requests overlap. Completions come back over a channel to
//! this task, the only one that touches the queue: it writes read data and the status byte
//! into guest memory (dirty-tracked), adds the used entries, and raises the interrupt once per
//! batch when the driver wants one.

use super::backend::{Backend, BackendError};
use super::device::SECTOR_SIZE;
use super::request::{gather, parse_ranges, scatter, seg_len, Request, RequestKind};
use crate::devices::virtio::VirtioInterrupt;
use crate::memory::GuestMem;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

/// A finished request.
struct Completion {
    req: Request,
    status: u8,
    /// Data for the device-writable buffers (reads, GET_ID).
    data: Vec<u8>,
}

/// Why a worker is told to stop.
pub enum Stop {
    /// The driver reset the device: stop now; requests in flight finish unreported.
    Reset,
    /// Complete every request in flight, return them to the driver, then hand the queue back.
    Drain(std::sync::mpsc::Sender<Queue>),
}

/// The worker of one queue.
pub struct QueueWorker {
    mem: Arc<GuestMem>,
    queue: Queue,
    notify: AsyncFd<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    backend: Arc<Backend>,
    read_only: bool,
    id: [u8; 20],
    completions_tx: mpsc::UnboundedSender<Completion>,
    completions_rx: mpsc::UnboundedReceiver<Completion>,
    /// Requests submitted and not yet completed.
    in_flight: usize,
}

impl QueueWorker {
    /// Prepares the worker; must run inside the tokio runtime (the eventfd is registered with
    /// its reactor).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: Arc<GuestMem>,
        mut queue: Queue,
        notify: EventFd,
        interrupt: Arc<VirtioInterrupt>,
        backend: Arc<Backend>,
        read_only: bool,
        id: [u8; 20],
        event_idx: bool,
    ) -> std::io::Result<QueueWorker> {
        queue.set_event_idx(event_idx);
        let (completions_tx, completions_rx) = mpsc::unbounded_channel();
        Ok(QueueWorker {
            mem,
            queue,
            // SAFETY: the EventFd owns its descriptor and closes it only when dropped, which
            // happens when this AsyncFd is dropped; the descriptor never changes meanwhile.
            notify: unsafe { AsyncFd::register(notify) }
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            interrupt,
            backend,
            read_only,
            id,
            completions_tx,
            completions_rx,
            in_flight: 0,
        })
    }

    /// Serves the queue until `stop` fires or the VM goes away. After a reset, requests still
    /// in flight complete in the backend but are not reported to the guest; a drain reports
    /// them all first.
    pub async fn run(mut self, mut stop: tokio::sync::oneshot::Receiver<Stop>) {
        // The driver may have queued requests before the worker started listening (or before
        // a migration moved the queue here).
        self.process_queue();
        loop {
            tokio::select! {
                s = &mut stop => {
                    if let Ok(Stop::Drain(reply)) = s {
                        self.drain(reply).await;
                    }
                    return;
                }
                ready = self.notify.readable() => {
                    let Ok(mut guard) = ready else { return };
                    if guard.try_io(|fd| fd.get_ref().read()).is_ok() {
                        self.process_queue();
                    }
                }
                Some(c) = self.completions_rx.recv() => {
                    self.complete(c);
                    while let Ok(c) = self.completions_rx.try_recv() {
                        self.complete(c);
                    }
                    self.notify_guest();
                }
            }
        }
    }

    async fn drain(&mut self, reply: std::sync::mpsc::Sender<Queue>) {
        let waiting = self.in_flight;
        while self.in_flight > 0 {
            match self.completions_rx.recv().await {
                Some(c) => self.complete(c),
                None => break,
            }
        }
        self.notify_guest();
        tracing::debug!(waited_for = waiting, "virtio-blk: queue drained");
        match Queue::try_from(self.queue.state()) {
            Ok(q) => {
                let _ = reply.send(q);
            }
            Err(e) => tracing::error!(error = ?e, "virtio-blk: queue state not reusable"),
        }
    }

    fn process_queue(&mut self) {
        let mem = self.mem.clone();
        loop {
            if let Err(e) = self.queue.disable_notification(mem.as_ref()) {
                tracing::warn!(error = %e, "virtio-blk: disable notification");
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(mem.as_ref()) {
                let head = chain.head_index();
                match Request::parse(chain, &mem) {
                    Ok(req) => self.submit(req),
                    Err(e) => {
                        // Not a request we can answer: return the chain so the driver does
                        // not leak it, with nothing written.
                        tracing::warn!(error = %e, head, "virtio-blk: malformed request");
                        if let Err(e) = self.queue.add_used(mem.as_ref(), head, 0) {
                            tracing::warn!(error = %e, "virtio-blk: add_used");
                        }
                        self.notify_guest();
                    }
                }
            }
            match self.queue.enable_notification(mem.as_ref()) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk: enable notification");
                    break;
                }
            }
        }
    }

    fn done(&self, req: Request, status: u32, data: Vec<u8>) {
        let _ = self.completions_tx.send(Completion {
            req,
            status: status as u8,
            data,
        });
    }

    fn in_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(len)? <= self.backend.size()).then_some(offset)
    }

    fn submit(&mut self, req: Request) {
        self.in_flight += 1;
        let backend = self.backend.clone();
        let tx = self.completions_tx.clone();
        let finish = move |req: Request, r: Result<Vec<u8>, BackendError>| {
            let (status, data) = match r {
                Ok(d) => (VIRTIO_BLK_S_OK, d),
                Err(e) => {
                    tracing::warn!(error = %e, sector = req.sector, "virtio-blk: I/O error");
                    (VIRTIO_BLK_S_IOERR, Vec::new())
                }
            };
            let _ = tx.send(Completion {
                req,
                status: status as u8,
                data,
            });
        };
        match req.kind {
            RequestKind::In => {
                let len = seg_len(&req.data_in);
                match self.in_range(req.sector, len) {
                    Some(offset) if len.is_multiple_of(SECTOR_SIZE) => {
                        tokio::spawn(async move {
                            let r = backend.read(offset, len as usize).await;
                            finish(req, r);
                        });
                    }
                    _ => self.done(req, VIRTIO_BLK_S_IOERR, Vec::new()),
                }
            }
            RequestKind::Out => {
                let len = seg_len(&req.data_out);
                if self.read_only {
                    return self.done(req, VIRTIO_BLK_S_IOERR, Vec::new());
                }
                let data = match gather(&self.mem, &req.data_out) {
                    Ok(d) => d,
                    Err(_) => return self.done(req, VIRTIO_BLK_S_IOERR, Vec::new()),
                };
                match self.in_range(req.sector, len) {
                    Some(offset) if len.is_multiple_of(SECTOR_SIZE) => {
                        tokio::spawn(async move {
                            let r = backend.write(offset, data).await.map(|_| Vec::new());
                            finish(req, r);
                        });
                    }
                    _ => self.done(req, VIRTIO_BLK_S_IOERR, Vec::new()),
                }
            }
            RequestKind::Flush => {
                tokio::spawn(async move {
                    let r = backend.flush().await.map(|_| Vec::new());
                    finish(req, r);
                });
            }
            RequestKind::GetId => {
                let id = self.id.to_vec();
                self.done(req, VIRTIO_BLK_S_OK, id);
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.read_only || !self.backend.supports_discard() {
                    return self.done(req, VIRTIO_BLK_S_UNSUPP, Vec::new());
                }
                let Ok(bytes) = gather(&self.mem, &req.data_out) else {
                    return self.done(req, VIRTIO_BLK_S_IOERR, Vec::new());
                };
                let mut ranges = Vec::new();
                for (sector, sectors, _flags) in parse_ranges(&bytes) {
                    let len = u64::from(sectors) * SECTOR_SIZE;
                    match self.in_range(sector, len) {
                        Some(offset) => ranges.push((offset, len)),
                        None => return self.done(req, VIRTIO_BLK_S_IOERR, Vec::new()),
                    }
                }
                let zero = req.kind == RequestKind::WriteZeroes;
                tokio::spawn(async move {
                    let mut r = Ok(Vec::new());
                    for (offset, len) in ranges {
                        let one = if zero {
                            backend.write_zeroes(offset, len).await
                        } else {
                            backend.discard(offset, len).await
                        };
                        if let Err(e) = one {
                            r = Err(e);
                            break;
                        }
                    }
                    finish(req, r);
                });
            }
            RequestKind::Unsupported(t) => {
                tracing::debug!(kind = t, "virtio-blk: unsupported request");
                self.done(req, VIRTIO_BLK_S_UNSUPP, Vec::new());
            }
        }
    }

    /// Writes the result into guest memory and returns the chain to the driver.
    fn complete(&mut self, c: Completion) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let mem = self.mem.clone();
        let mut status = c.status;
        let mut written = 0usize;
        if !c.data.is_empty() {
            match scatter(&mem, &c.req.data_in, &c.data) {
                Ok(n) => written = n,
                Err(_) => status = VIRTIO_BLK_S_IOERR as u8,
            }
        }
        if mem.write_obj(status, c.req.status).is_err() {
            tracing::warn!(
                head = c.req.head,
                "virtio-blk: status byte outside guest memory"
            );
        }
        if let Err(e) = self
            .queue
            .add_used(mem.as_ref(), c.req.head, written as u32 + 1)
        {
            tracing::warn!(error = %e, "virtio-blk: add_used");
        }
    }

    fn notify_guest(&mut self) {
        match self.queue.needs_notification(self.mem.as_ref()) {
            Ok(false) => {}
            // On an error, interrupt anyway: a spurious interrupt is harmless, a lost one hangs
            // the guest's I/O.
            Ok(true) | Err(_) => self.interrupt.signal_used_queue(),
        }
    }
}
