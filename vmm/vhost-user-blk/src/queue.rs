//! One request queue: a task that owns the ring's progress. Kicks (forwarded by the backend's
//! epoll thread) make it pop the available chains (within what [`vmm_disk::intake`] lets a
//! queue hold in flight), start each request on the disk as a task of its own, and return completions to the driver strictly in the order the requests were
//! popped, a completion that finishes early waiting for the ones before it. That order is what
//! makes a restart safe (see the crate docs): the used index always counts a prefix of the
//! available ring.
//!
//! Nothing the guest puts in the ring stops the queue: a chain that is not a request is
//! returned with nothing written, a request that cannot run completes with an error status.

use std::collections::VecDeque;
use std::sync::mpsc;
use tokio::sync::mpsc as tmpsc;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_disk::exec::{complete, Completion, Job};
use vmm_disk::{Disk, Intake, Request, RequestError};

/// Guest memory as the backend maps it: every write through it sets the page's bit in the
/// frontend's dirty log once one is set up.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
/// A vring over that memory.
pub type Vring = VringRwLock<Mem>;

/// What the backend tells a queue's task.
pub enum QueueMsg {
    /// The queue was kicked (or started): pop what is available.
    Kick(Vring),
    /// The frontend stops the queue: answer once every request popped has completed and been
    /// returned to the driver.
    Drain(mpsc::Sender<()>),
}

/// A request popped from the ring, waiting for its completion.
struct Slot {
    head: u16,
    /// `None` for a chain that was not a request: returned with nothing written.
    req: Option<Request>,
    done: Option<Completion>,
}

/// The task of one queue.
pub struct QueueWorker {
    index: u16,
    disk: Disk,
    mem: Mem,
    vring: Option<Vring>,
    /// Popped requests in ring order; the first has sequence number `first_seq`.
    pending: VecDeque<Slot>,
    first_seq: u64,
    done_tx: tmpsc::UnboundedSender<(u64, Completion)>,
    done_rx: tmpsc::UnboundedReceiver<(u64, Completion)>,
    /// What is in flight, and why the last pop stopped.
    intake: Intake,
}

impl QueueWorker {
    /// Starts the task of queue `index` on `runtime`; returns where to send it messages. The
    /// task ends when the sender is dropped.
    pub fn spawn(
        index: u16,
        disk: Disk,
        mem: Mem,
        runtime: &tokio::runtime::Handle,
    ) -> tmpsc::UnboundedSender<QueueMsg> {
        let (tx, rx) = tmpsc::unbounded_channel();
        let (done_tx, done_rx) = tmpsc::unbounded_channel();
        let worker = QueueWorker {
            index,
            disk,
            mem,
            vring: None,
            pending: VecDeque::new(),
            first_seq: 0,
            done_tx,
            done_rx,
            intake: Intake::new(),
        };
        runtime.spawn(worker.run(rx));
        tx
    }

    async fn run(mut self, mut rx: tmpsc::UnboundedReceiver<QueueMsg>) {
        let mut draining: Option<mpsc::Sender<()>> = None;
        loop {
            if self.pending.is_empty() {
                if let Some(reply) = draining.take() {
                    tracing::debug!(queue = self.index, "queue drained");
                    let _ = reply.send(());
                }
            }
            tokio::select! {
                msg = rx.recv() => match msg {
                    None => return,
                    Some(QueueMsg::Kick(vring)) => {
                        self.vring = Some(vring);
                        self.pop_all();
                        self.publish();
                    }
                    Some(QueueMsg::Drain(reply)) => draining = Some(reply),
                },
                Some((seq, done)) = self.done_rx.recv() => {
                    self.fill(seq, done);
                    while let Ok((seq, done)) = self.done_rx.try_recv() {
                        self.fill(seq, done);
                    }
                    if self.publish() {
                        self.pop_all();
                        self.publish();
                    }
                }
                // A ring's worth was taken: the rest after the other branches had a turn.
                _ = tokio::task::yield_now(), if self.intake.more() => {
                    self.pop_all();
                    self.publish();
                }
            }
        }
    }

    /// Pops the available chains, as far as the intake lets it, and starts their requests.
    /// A queue the frontend stopped (GET_VRING_BASE clears its ready flag first) is left
    /// alone, so a kick that raced the stop cannot move the ring past the index the frontend
    /// was given.
    fn pop_all(&mut self) {
        let Some(vring) = self.vring.clone() else {
            return;
        };
        let mem = self.mem.memory();
        let popped = {
            let mut state = vring.get_mut();
            if !state.get_queue().ready() {
                return;
            }
            self.intake.pop(state.get_queue_mut(), &*mem)
        };
        for (head, parsed) in popped {
            self.start(head, parsed, &mem);
        }
    }

    fn start(
        &mut self,
        head: u16,
        parsed: Result<Request, RequestError>,
        mem: &GuestMemoryMmap<BitmapMmapRegion>,
    ) {
        let seq = self.first_seq + self.pending.len() as u64;
        let req = match parsed {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(queue = self.index, head, error = %e, "malformed request");
                self.pending.push_back(Slot {
                    head,
                    req: None,
                    done: Some(Completion {
                        status: 0,
                        data: Vec::new(),
                    }),
                });
                return;
            }
        };
        let job = self.disk.prepare(&req, mem);
        let mut slot = Slot {
            head,
            req: Some(req),
            done: None,
        };
        match job {
            Job::Done(c) => slot.done = Some(c),
            job => {
                let disk = self.disk.clone();
                let tx = self.done_tx.clone();
                tokio::spawn(async move {
                    let done = disk.run(job).await;
                    let _ = tx.send((seq, done));
                });
            }
        }
        self.pending.push_back(slot);
    }

    fn fill(&mut self, seq: u64, done: Completion) {
        let slot = seq
            .checked_sub(self.first_seq)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.pending.get_mut(i));
        match slot {
            Some(slot) => slot.done = Some(done),
            None => tracing::warn!(queue = self.index, seq, "completion of an unknown request"),
        }
    }

    /// Returns the completed requests at the front, in order, and signals the driver if it
    /// wants to know. Returns whether chains wait in the ring for the room this made.
    fn publish(&mut self) -> bool {
        let Some(vring) = &self.vring else {
            return false;
        };
        let mem = self.mem.memory();
        let mut returned = 0;
        let mut room = false;
        while self.pending.front().is_some_and(|s| s.done.is_some()) {
            let Some(slot) = self.pending.pop_front() else {
                break;
            };
            self.first_seq += 1;
            let len = match (&slot.req, &slot.done) {
                (Some(req), Some(done)) => {
                    room |= self.intake.finish(req);
                    complete(&*mem, req, done)
                }
                _ => 0,
            };
            if let Err(e) = vring.add_used(slot.head, len) {
                tracing::warn!(queue = self.index, head = slot.head, error = %e, "add_used");
            }
            returned += 1;
        }
        if returned == 0 {
            return room;
        }
        // On an error, signal anyway: a spurious interrupt is harmless, a lost one hangs the
        // guest's I/O.
        if !matches!(vring.needs_notification(), Ok(false)) {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!(queue = self.index, error = %e, "signal the call eventfd");
            }
        }
        room
    }
}
