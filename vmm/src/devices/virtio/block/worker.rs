//! The block data path: an async task per activated queue.
//!
//! It waits on the queue's ioeventfd, pops every available chain, parses it and starts the
//! backend I/O as its own task, so requests overlap. Completions come back over a channel to
//! this task, the only one that touches the queue: it writes read data and the status byte
//! into guest memory (dirty-tracked), adds the used entries, and raises the interrupt once per
//! batch when the driver wants one.

use crate::devices::virtio::VirtioInterrupt;
use crate::memory::GuestMem;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use virtio_queue::{Queue, QueueT};
use vmm_disk::exec::{complete, Completion as Done, Job};
use vmm_disk::{Disk, Request};
use vmm_sys_util::eventfd::EventFd;

/// A finished request.
struct Completion {
    req: Request,
    done: Done,
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
    disk: Disk,
    completions_tx: mpsc::UnboundedSender<Completion>,
    completions_rx: mpsc::UnboundedReceiver<Completion>,
    /// Requests submitted and not yet completed.
    in_flight: usize,
}

impl QueueWorker {
    /// Prepares the worker; must run inside the tokio runtime (the eventfd is registered with
    /// its reactor).
    pub fn new(
        mem: Arc<GuestMem>,
        mut queue: Queue,
        notify: EventFd,
        interrupt: Arc<VirtioInterrupt>,
        disk: Disk,
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
            disk,
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
                match Request::parse(chain, mem.as_ref()) {
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

    /// Starts `req`: answered at once when it needs no I/O, else run as a task of its own.
    fn submit(&mut self, req: Request) {
        self.in_flight += 1;
        let tx = self.completions_tx.clone();
        match self.disk.prepare(&req, self.mem.as_ref()) {
            Job::Done(done) => {
                let _ = tx.send(Completion { req, done });
            }
            job => {
                let disk = self.disk.clone();
                tokio::spawn(async move {
                    let done = disk.run(job).await;
                    let _ = tx.send(Completion { req, done });
                });
            }
        }
    }

    /// Writes the result into guest memory and returns the chain to the driver.
    fn complete(&mut self, c: Completion) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let mem = self.mem.clone();
        let len = complete(mem.as_ref(), &c.req, &c.done);
        if let Err(e) = self.queue.add_used(mem.as_ref(), c.req.head, len) {
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
