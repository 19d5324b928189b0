//! virtio-blk served by a vhost-user backend process (`vhost-user-blk`, or any
//! vhost-user-blk backend such as `qemu-storage-daemon --export type=vhost-user-blk`).
//!
//! The guest sees a virtio-mmio block device like the in-VMM one; behind the transport, the
//! backend serves its queues directly:
//! - memory: the guest memory's memfd regions are sent with SET_MEM_TABLE, so the backend maps
//!   the same pages (a restored snapshot is copied into a memfd first for that reason);
//! - kicks: each queue's ioeventfd (KVM signals it on the guest's QueueNotify write) is the
//!   backend's kick eventfd; no VM exit reaches the VMM;
//! - completions: the device's irqfd is the backend's call eventfd, so the backend raises the
//!   guest's interrupt itself; since only the VMM can set the virtio-mmio InterruptStatus
//!   register, the device reports a used-buffer interrupt as always pending (see
//!   [`super::VirtioInterrupt::raised_by_backend`]): the driver then looks at its queues on
//!   every interrupt, which is what an interrupt of this device means anyway;
//! - configuration space and features: from the backend (GET_CONFIG, GET_FEATURES), masked to
//!   what this transport implements, read once when the VM is built;
//! - migration ([`DirtyLogging`]): pre-copy gives the backend a dirty log (SET_LOG_BASE with a
//!   memfd bitmap, then LOG_ALL) and merges it into the VM's dirty set at every round; at the
//!   stop-and-copy GET_VRING_BASE stops the rings once what is in flight has completed, and
//!   the ring positions travel in the transport's saved state; the destination's device
//!   starts its backend's rings from them when the guest resumes there;
//! - a backend that dies ([`monitor`]): the VMM logs it at once, keeps reconnecting, and when a
//!   backend listens on the socket again sets everything up anew with each ring's base at its
//!   used index. Our backend returns completions in ring order, so exactly the requests that
//!   had not completed run again (a write that reached the disk before the crash is written
//!   once more, with the same data: nothing the guest was told is lost). Meanwhile the
//!   guest's I/O on that disk waits; nothing else of the VM stops.

mod device;
mod frontend;
pub mod log;
mod monitor;

pub use device::{DirtyLogging, VhostUserBlk};

use thiserror::Error;

/// Errors talking to a vhost-user backend.
#[derive(Debug, Error)]
pub enum VhostUserError {
    /// The socket did not accept.
    #[error("connect")]
    Connect(#[source] std::io::Error),
    /// The connected socket could not be set up.
    #[error("set up the socket")]
    Socket(#[source] std::io::Error),
    /// A message failed (sent, answered with an error, or not answered in time).
    #[error("{0}")]
    Message(&'static str, #[source] vhost::Error),
    /// SET_LOG_BASE could not be sent or was not answered as the protocol says.
    #[error("SET_LOG_BASE")]
    LogBase(#[source] std::io::Error),
    /// The backend does not offer something the VMM needs.
    #[error("the backend lacks {0}")]
    Lacks(&'static str),
    /// The backend serves fewer queues than configured.
    #[error("the backend serves at most {offered} queues; {wanted} configured")]
    Queues {
        /// The backend's GET_QUEUE_NUM.
        offered: u64,
        /// The disk's `queues`.
        wanted: u16,
    },
    /// A queue's rings do not lie in guest memory.
    #[error("queue {0} lies outside guest memory")]
    RingOutside(usize),
    /// The backend is gone (the VMM reconnects by itself).
    #[error("the backend is not connected (the VMM reconnects when it is back)")]
    Disconnected,
    /// The backend cannot log its writes into guest memory.
    #[error("the backend cannot log dirty pages (no VHOST_USER_PROTOCOL_F_LOG_SHMFD or VHOST_F_LOG_ALL): its disk cannot be migrated")]
    CannotLog,
    /// The dirty log could not be created.
    #[error("dirty log")]
    Log(#[from] log::LogError),
    /// The monitor thread could not start.
    #[error("start the backend monitor thread")]
    Monitor(#[source] std::io::Error),
}
