//! The block data path: an async task per activated queue.
//!
//! It waits on the queue's ioeventfd, takes the available chains through [`Intake`] (which
//! bounds what the guest can make it hold in flight), parses each and starts the backend I/O
//! as its own task, so requests overlap. Completions come back over a channel to this task,
//! the only one that touches the queue: it writes read data and the status byte into guest
//! memory (dirty-tracked), adds the used entries, and raises the interrupt once per batch
//! when the driver wants one.

use crate::devices::virtio::VirtioInterrupt;
use crate::memory::GuestMem;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use virtio_queue::{Queue, QueueT};
use vmm_disk::exec::{complete, Completion as Done, Job};
use vmm_disk::{Disk, Intake, Request};
use vmm_sys_util::eventfd::EventFd;

/// A finished request.
struct Completion {
    req: Request,
    done: Done,
}

/// What the device tells its worker. The worker ends when told to reset or when the device
/// drops its sender (after a drain that handed the queue over).
pub enum Command {
    /// The driver reset the device: stop now; requests in flight finish unreported.
    Reset,
    /// Take nothing more from the ring, complete every request in flight and return it to the
    /// driver, then hand the queue back and wait for the next command.
    Drain(std::sync::mpsc::Sender<Queue>),
    /// The device gave up waiting for a drain (the VM runs on here): serve the queue again,
    /// whether the drain finished meanwhile or not.
    Resume,
}

/// What the worker is doing.
enum Mode {
    /// Taking requests from the ring.
    Serving,
    /// Waiting for the requests in flight; then the queue goes to this sender.
    Draining(std::sync::mpsc::Sender<Queue>),
    /// The queue was handed back: nothing happens until the next command.
    Drained,
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
    /// What is in flight, and why the last pop stopped.
    intake: Intake,
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
            intake: Intake::new(),
        })
    }

    /// Serves the queue until told to reset or the device drops its sender. After a reset,
    /// requests still in flight complete in the backend but are not reported to the guest; a
    /// drain reports them all first. A drain the device gave up on ([`Command::Resume`]) goes
    /// back to serving: the guest's disk works on whatever the requests in flight were
    /// waiting for.
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        // The driver may have queued requests before the worker started listening (or before
        // a migration moved the queue here).
        self.process_queue();
        let mut mode = Mode::Serving;
        loop {
            let serving = matches!(mode, Mode::Serving);
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Reset) => return,
                    Some(Command::Drain(reply)) => {
                        tracing::debug!(in_flight = self.intake.requests(),
                            "virtio-blk: draining the queue");
                        mode = Mode::Draining(reply);
                    }
                    Some(Command::Resume) => {
                        if !serving {
                            tracing::info!(in_flight = self.intake.requests(),
                                "virtio-blk: drain given up; serving the queue again");
                        }
                        mode = Mode::Serving;
                        self.process_queue();
                    }
                },
                ready = self.notify.readable(), if serving => {
                    let Ok(mut guard) = ready else { return };
                    if guard.try_io(|fd| fd.get_ref().read()).is_ok() {
                        self.process_queue();
                    }
                }
                Some(c) = self.completions_rx.recv() => self.complete_batch(c, serving),
                // A ring's worth was taken: the rest after the other branches had a turn.
                _ = tokio::task::yield_now(), if serving && self.intake.more() => {
                    self.process_queue();
                }
            }
            if matches!(mode, Mode::Draining(_)) && self.intake.requests() == 0 {
                if let Mode::Draining(reply) = std::mem::replace(&mut mode, Mode::Drained) {
                    self.hand_over(reply);
                }
            }
        }
    }

    /// Completes `first` and every completion already waiting and interrupts the driver
    /// once; when `serving`, pops the chains that waited for the room this made (a drain
    /// leaves them in the ring for whoever serves the queue next).
    fn complete_batch(&mut self, first: Completion, serving: bool) {
        let mut room = self.complete(first);
        while let Ok(c) = self.completions_rx.try_recv() {
            room |= self.complete(c);
        }
        self.notify_guest();
        if room && serving {
            self.process_queue();
        }
    }

    /// Gives the queue, every request it took completed, to whoever asked for the drain.
    fn hand_over(&mut self, reply: std::sync::mpsc::Sender<Queue>) {
        tracing::debug!("virtio-blk: queue drained");
        match Queue::try_from(self.queue.state()) {
            Ok(q) => {
                // Nobody waits any more if the device gave up: it says Resume next.
                let _ = reply.send(q);
            }
            Err(e) => tracing::error!(error = ?e, "virtio-blk: queue state not reusable"),
        }
    }

    /// Takes what the driver made available, as far as the intake lets it.
    fn process_queue(&mut self) {
        let mem = self.mem.clone();
        let mut returned = false;
        for (head, parsed) in self.intake.pop(&mut self.queue, mem.as_ref()) {
            match parsed {
                Ok(req) => self.submit(req),
                Err(e) => {
                    // Not a request we can answer: return the chain so the driver does not
                    // leak it, with nothing written.
                    tracing::warn!(error = %e, head, "virtio-blk: malformed request");
                    if let Err(e) = self.queue.add_used(mem.as_ref(), head, 0) {
                        tracing::warn!(error = %e, "virtio-blk: add_used");
                    }
                    returned = true;
                }
            }
        }
        if returned {
            self.notify_guest();
        }
    }

    /// Starts `req`: answered at once when it needs no I/O, else run as a task of its own.
    fn submit(&mut self, req: Request) {
        let tx = self.completions_tx.clone();
        match self.disk.prepare(&req, self.mem.as_ref()) {
            Job::Done(done) => {
                self.disk.count_done(&done);
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

    /// Writes the result into guest memory and returns the chain to the driver. Returns
    /// whether chains wait in the ring for the room this made.
    fn complete(&mut self, c: Completion) -> bool {
        let room = self.intake.finish(&c.req);
        let mem = self.mem.clone();
        let len = complete(mem.as_ref(), &c.req, &c.done);
        if let Err(e) = self.queue.add_used(mem.as_ref(), c.req.head, len) {
            tracing::warn!(error = %e, "virtio-blk: add_used");
        }
        room
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

#[cfg(test)]
mod tests {
    use super::super::testing::{disk, driving, reads, statuses, wait_used};
    use super::*;
    use crate::devices::IrqLine;
    use std::time::Duration;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_disk::intake::MAX_IN_FLIGHT_BYTES;

    /// Guest memory, a disk of `disk_mib` zeroes, and the runtime the worker runs on.
    struct Rig {
        rt: tokio::runtime::Runtime,
        mem: Arc<GuestMem>,
        disk: Disk,
        _dir: tempfile::TempDir,
    }

    fn rig(disk_mib: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mem, _) = crate::memory::create_guest_memory(64).unwrap();
        Rig {
            rt,
            mem,
            disk: disk(dir.path(), disk_mib),
            _dir: dir,
        }
    }

    impl Rig {
        /// A worker of `queue`, and its interrupt's eventfd as the guest would see it.
        fn worker(&self, queue: Queue) -> (QueueWorker, EventFd) {
            let _in = self.rt.enter();
            let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let irq = evt.try_clone().unwrap();
            let w = QueueWorker::new(
                self.mem.clone(),
                queue,
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                Arc::new(VirtioInterrupt::new(IrqLine { evt, gsi: 5 })),
                self.disk.clone(),
                false,
            )
            .unwrap();
            (w, irq)
        }
    }

    #[test]
    fn requests_in_flight_stay_within_the_budget() {
        let rig = rig(64);
        let ring = MockSplitQueue::new(rig.mem.as_ref(), 256);
        // Twenty 16 MiB reads over one guest buffer: 320 MiB if all were taken at once.
        reads(&ring, &rig.mem, 0, 20, 16 << 20);
        let (mut w, irq) = rig.worker(ring.create_queue().unwrap());
        rig.rt.block_on(async {
            w.process_queue();
            assert_eq!(w.intake.requests(), 4);
            assert!(w.intake.bytes() <= MAX_IN_FLIGHT_BYTES);
        });
        // The rest are taken as the first complete: all twenty are answered.
        let (_ctl, rx) = mpsc::unbounded_channel();
        let task = rig.rt.spawn(w.run(rx));
        driving(&rig.rt, || wait_used(&irq, &ring, 20));
        assert_eq!(statuses(&rig.mem, 20), vec![0; 20]);
        task.abort();
    }

    #[test]
    fn an_invalid_available_index_stops_the_queue_until_a_valid_one() {
        let rig = rig(1);
        let ring = MockSplitQueue::new(rig.mem.as_ref(), 256);
        reads(&ring, &rig.mem, 0, 1, 512);
        // More than a ring ahead of the device: no driver may publish that.
        ring.avail().idx().store(1000);
        let (mut w, _irq) = rig.worker(ring.create_queue().unwrap());
        // Run where a loop that never ends fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = rig.rt.handle().clone();
        std::thread::spawn(move || {
            let _in = rt.enter();
            w.process_queue();
            let _ = tx.send(w);
        });
        let mut w = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the worker loops over the ring");
        assert_eq!(w.intake.requests(), 0);
        assert_eq!(ring.used().idx().load(), 0);
        // A valid index again: the queue serves.
        ring.avail().idx().store(1);
        rig.rt.block_on(async {
            w.process_queue();
            assert_eq!(w.intake.requests(), 1);
            let c = w.completions_rx.recv().await.unwrap();
            w.complete_batch(c, true);
        });
        assert_eq!(ring.used().idx().load(), 1);
        assert_eq!(statuses(&rig.mem, 1), vec![0]);
    }
}
