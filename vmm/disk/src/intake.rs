//! What a queue takes from its available ring, and how much it holds: the one loop that pops
//! and parses chains for the VMM's worker and the vhost-user backend alike.
//!
//! The ring is the guest's, so the loop bounds what the guest can make a data path hold:
//! - in flight at most [`MAX_IN_FLIGHT_BYTES`] of request data and at most one request per
//!   ring entry: a request that does not fit is left in the ring (the ring's position goes
//!   back one) and taken once completions make room, so a guest cannot make the process
//!   allocate more than that however many large requests it queues;
//! - at most one ring's worth of chains per call, so a guest that keeps publishing chains (or
//!   malformed ones, which cost nothing in flight) cannot hold the thread: the caller calls
//!   again after letting other work run ([`Intake::more`]);
//! - an available index that is more than a ring ahead of the device's position (which no
//!   driver may publish) stops the loop instead of spinning on it: the queue serves nothing
//!   until the driver publishes a valid one, and the log says so once.

use crate::request::{Request, RequestError};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

/// Request data (read buffers and write payloads) one queue may have in flight. The largest
/// request ([`crate::request::MAX_REQUEST_BYTES`]) fits, alone.
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;

/// A chain popped from the ring: its head and the request it holds (or why it holds none).
pub type Popped = (u16, Result<Request, RequestError>);

/// Why the last [`Intake::pop`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stopped {
    /// The ring is empty and the driver notifies the next request.
    #[default]
    Empty,
    /// The next request waits for room: [`Intake::finish`] says when to pop again.
    Full,
    /// A ring's worth of chains was taken: pop again after letting other work run.
    Turn,
    /// The available index is not valid: nothing is taken until the driver fixes it.
    BadIndex,
}

/// One queue's intake: what it has in flight and why it stopped taking.
#[derive(Debug, Default)]
pub struct Intake {
    bytes: u64,
    requests: u32,
    stopped: Stopped,
}

impl Intake {
    /// An intake with nothing in flight.
    pub fn new() -> Intake {
        Intake::default()
    }

    /// Requests taken and not yet finished.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// Their data bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Why the last pop stopped.
    pub fn stopped(&self) -> Stopped {
        self.stopped
    }

    /// Whether the caller should pop again without waiting for a notification.
    pub fn more(&self) -> bool {
        self.stopped == Stopped::Turn
    }

    fn fits(&self, req: &Request, ring_size: u16) -> bool {
        self.requests == 0
            || (self.requests < u32::from(ring_size)
                && self.bytes + req.data_len() <= MAX_IN_FLIGHT_BYTES)
    }

    /// Pops and parses the available chains, at most one ring's worth, while the requests fit.
    /// Every `Ok` request returned is in flight until [`Intake::finish`]; a chain that is not
    /// a request holds nothing and goes back to the driver at once.
    pub fn pop<M>(&mut self, queue: &mut Queue, mem: &M) -> Vec<Popped>
    where
        M: GuestMemory,
    {
        let mut popped = Vec::new();
        let size = queue.size();
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                tracing::warn!(error = %e, "virtio-blk: disable notification");
            }
            let before = popped.len();
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let parsed = Request::parse(chain, mem);
                if let Ok(req) = &parsed {
                    if !self.fits(req, size) {
                        // Left in the ring: taken again once completions make room.
                        queue.go_to_previous_position();
                        self.stopped = Stopped::Full;
                        return popped;
                    }
                    self.bytes += req.data_len();
                    self.requests += 1;
                }
                popped.push((head, parsed));
                if popped.len() >= usize::from(size) {
                    self.stopped = Stopped::Turn;
                    return popped;
                }
            }
            match queue.enable_notification(mem) {
                // More arrived meanwhile.
                Ok(true) if popped.len() > before => continue,
                // Something is said to be available, yet nothing could be popped: the index
                // is more than a ring ahead, and would say so forever.
                Ok(true) => {
                    if self.stopped != Stopped::BadIndex {
                        tracing::warn!(
                            next_avail = queue.next_avail(),
                            "virtio-blk: the driver's available ring index is not valid; the \
                             queue waits for a valid one"
                        );
                    }
                    self.stopped = Stopped::BadIndex;
                }
                Ok(false) => self.stopped = Stopped::Empty,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk: enable notification");
                    self.stopped = Stopped::Empty;
                }
            }
            return popped;
        }
    }

    /// `req`, taken by [`Intake::pop`], has completed. Returns whether the caller should pop
    /// again because it makes room for a request that waits in the ring.
    pub fn finish(&mut self, req: &Request) -> bool {
        self.bytes = self.bytes.saturating_sub(req.data_len());
        self.requests = self.requests.saturating_sub(1);
        self.stopped == Stopped::Full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn one_call_takes_at_most_a_ring_of_chains() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ring = MockSplitQueue::new(&mem, 16);
        // Sixteen chains that are not requests (a status byte and no header): they hold
        // nothing in flight, so only the turn limit stops the loop.
        let descs: Vec<RawDescriptor> = (0..16)
            .map(|i| {
                let d = SplitDescriptor::new(0x8_0000 + i, 1, VRING_DESC_F_WRITE as u16, 0);
                RawDescriptor::from(d)
            })
            .collect();
        ring.add_desc_chains(&descs, 0).unwrap();
        let mut q = ring.create_queue::<Queue>().unwrap();
        let mut intake = Intake::new();
        let popped = intake.pop(&mut q, &mem);
        assert_eq!(popped.len(), 16);
        assert!(popped.iter().all(|(_, r)| r.is_err()));
        assert_eq!((intake.stopped(), intake.more()), (Stopped::Turn, true));
        assert_eq!(intake.requests(), 0);
        assert!(intake.pop(&mut q, &mem).is_empty());
        assert_eq!((intake.stopped(), intake.more()), (Stopped::Empty, false));
    }
}
