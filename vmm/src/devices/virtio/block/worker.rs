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
                    self.complete_batch(c);
                }
                // A ring's worth was taken: the rest after the other branches had a turn.
                _ = tokio::task::yield_now(), if self.intake.more() => self.process_queue(),
            }
        }
    }

    /// Completes `first` and every completion already waiting, pops the chains that waited
    /// for room, and interrupts the driver once.
    fn complete_batch(&mut self, first: Completion) {
        let mut room = self.complete(first);
        while let Ok(c) = self.completions_rx.try_recv() {
            room |= self.complete(c);
        }
        self.notify_guest();
        if room {
            self.process_queue();
        }
    }

    async fn drain(&mut self, reply: std::sync::mpsc::Sender<Queue>) {
        let waiting = self.intake.requests();
        while self.intake.requests() > 0 {
            match self.completions_rx.recv().await {
                Some(c) => {
                    // Chains left in the ring for want of room stay there for whoever
                    // serves the queue next.
                    let _ = self.complete(c);
                }
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
    use super::*;
    use crate::devices::IrqLine;
    use std::time::Duration;
    use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_disk::intake::MAX_IN_FLIGHT_BYTES;
    use vmm_disk::{Backend, FileBackend};

    /// Guest memory, a disk of `disk_mib` zeroes, and the runtime the worker runs on.
    struct Rig {
        rt: tokio::runtime::Runtime,
        mem: Arc<GuestMem>,
        disk: Disk,
        _dir: tempfile::TempDir,
    }

    fn rig(disk_mib: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(disk_mib << 20)
            .unwrap();
        let disk = Disk::new(
            Backend::File(FileBackend::open(&path, false).unwrap()),
            false,
            "t",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mem, _) = crate::memory::create_guest_memory(64).unwrap();
        Rig {
            rt,
            mem,
            disk,
            _dir: dir,
        }
    }

    impl Rig {
        /// A worker of `queue`, and its interrupt's eventfd as the guest would see it.
        fn worker(&self, queue: Queue) -> (QueueWorker, AsyncFd<EventFd>) {
            let _in = self.rt.enter();
            let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            // SAFETY: the cloned EventFd owns its descriptor and closes it only when this
            // AsyncFd is dropped.
            let irq = unsafe { AsyncFd::register(evt.try_clone().unwrap()) }.unwrap();
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

    /// Waits, interrupt by interrupt, until the device has used `n` chains.
    async fn used(irq: &AsyncFd<EventFd>, ring: &MockSplitQueue<'_, GuestMem>, n: u16) {
        while ring.used().idx().load() < n {
            let mut g = irq.readable().await.unwrap();
            let _ = g.try_io(|fd| fd.get_ref().read());
        }
    }

    /// `n` chains, each a read of `len` bytes at sector 0 into the same buffer at 16 MiB,
    /// its status byte at 0x20_0000 + its index.
    fn reads(ring: &MockSplitQueue<GuestMem>, mem: &GuestMem, n: u16, len: u32) {
        let mut descs = Vec::new();
        for i in 0..n {
            let header = 0x10_0000 + 16 * u64::from(i);
            mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
                .unwrap();
            mem.write_obj(0xffu8, GuestAddress(0x20_0000 + u64::from(i)))
                .unwrap();
            let next = (3 * i + 1, 3 * i + 2);
            descs.push(SplitDescriptor::new(
                header,
                16,
                VRING_DESC_F_NEXT as u16,
                next.0,
            ));
            let w = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
            descs.push(SplitDescriptor::new(0x100_0000, len, w, next.1));
            let status = 0x20_0000 + u64::from(i);
            descs.push(SplitDescriptor::new(
                status,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            ));
        }
        let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
        ring.add_desc_chains(&raw, 0).unwrap();
    }

    fn statuses(mem: &GuestMem, n: u64) -> Vec<u8> {
        (0..n)
            .map(|i| mem.read_obj(GuestAddress(0x20_0000 + i)).unwrap())
            .collect()
    }

    #[test]
    fn requests_in_flight_stay_within_the_budget() {
        let rig = rig(64);
        let ring = MockSplitQueue::new(rig.mem.as_ref(), 256);
        // Twenty 16 MiB reads over one guest buffer: 320 MiB if all were taken at once.
        reads(&ring, &rig.mem, 20, 16 << 20);
        let (mut w, irq) = rig.worker(ring.create_queue().unwrap());
        rig.rt.block_on(async {
            w.process_queue();
            assert_eq!(w.intake.requests(), 4);
            assert!(w.intake.bytes() <= MAX_IN_FLIGHT_BYTES);
        });
        // The rest are taken as the first complete: all twenty are answered.
        let (_stop, rx) = tokio::sync::oneshot::channel();
        let task = rig.rt.spawn(w.run(rx));
        rig.rt.block_on(used(&irq, &ring, 20));
        assert_eq!(statuses(&rig.mem, 20), vec![0; 20]);
        task.abort();
    }

    #[test]
    fn an_invalid_available_index_stops_the_queue_until_a_valid_one() {
        let rig = rig(1);
        let ring = MockSplitQueue::new(rig.mem.as_ref(), 256);
        reads(&ring, &rig.mem, 1, 512);
        // More than a ring ahead of the device: no driver may publish that.
        ring.avail().idx().store(1000);
        let (mut w, irq) = rig.worker(ring.create_queue().unwrap());
        // Run where a loop that never ends fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = rig.rt.handle().clone();
        std::thread::spawn(move || {
            let _in = rt.enter();
            w.process_queue();
            let _ = tx.send(w);
        });
        let mut w = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the worker loops over the ring");
        assert_eq!(w.intake.requests(), 0);
        assert_eq!(ring.used().idx().load(), 0);
        // A valid index again: the queue serves.
        ring.avail().idx().store(1);
        rig.rt.block_on(async {
            w.process_queue();
            assert_eq!(w.intake.requests(), 1);
            let (_stop, rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(w.run(rx));
            used(&irq, &ring, 1).await;
            task.abort();
        });
        assert_eq!(statuses(&rig.mem, 1), vec![0]);
    }
}
