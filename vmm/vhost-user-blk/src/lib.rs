//! vhost-user-blk: one disk served to a frontend's virtio-blk queues from a process of its own.
//!
//! The frontend (our VMM with `--disk vhost-user=SOCKET`, or QEMU's `vhost-user-blk` device)
//! connects to the Unix socket this backend listens on and speaks the vhost-user protocol
//! (QEMU's `docs/interop/vhost-user.rst`); the `vhost` and `vhost-user-backend` crates handle
//! the messages, this crate serves the queues with the `vmm-disk` data path, so a disk served
//! here behaves as one served inside the VMM (same requests, same backends, same offer).
//!
//! ```text
//!  frontend                                   backend (this process)
//!  GET_FEATURES, GET_PROTOCOL_FEATURES ─────► the disk's offer | VERSION_1 | LOG_ALL |
//!                                             PROTOCOL_FEATURES; CONFIG | MQ | LOG_SHMFD |
//!                                             REPLY_ACK
//!  SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
//!  GET_CONFIG (struct virtio_blk_config) ───► the offer's configuration space
//!  ...the guest's driver sets DRIVER_OK...
//!  SET_FEATURES, SET_MEM_TABLE (memfds) ────► guest memory mapped here
//!  per queue: SET_VRING_NUM/ADDR/BASE,
//!  SET_VRING_CALL/KICK, SET_VRING_ENABLE ───► kicks (the VMM's ioeventfd) start the queue;
//!                                             completions signal the call eventfd (the
//!                                             VMM's irqfd)
//!  migration: SET_LOG_BASE (memfd bitmap),
//!  SET_FEATURES | LOG_ALL ──────────────────► every write into guest memory sets its page's
//!                                             bit (vhost-user-backend's BitmapMmapRegion)
//!  GET_VRING_BASE ──────────────────────────► the queue stops; requests in flight complete
//!                                             first; the answer is the next available index
//! ```
//! Version policy: the vhost-user protocol negotiates by feature bits; this backend offers
//! what is listed above and nothing it does not implement (no INFLIGHT_SHMFD, no
//! DEVICE_STATE: a disk has no state of its own beyond the ring positions).
//!
//! Completions are returned to the driver in the order the requests were taken from the
//! ring ([`queue`]). So the used ring's index alone says how far this backend got: a frontend
//! that lost its backend (killed, restarted) sets the ring base to the used index on the new
//! one, and exactly the requests that had not completed run again.
#![warn(missing_docs)]

pub mod backend;
pub mod queue;
pub mod serve;

pub use backend::BlkBackend;
pub use serve::{serve, ServeError};

/// The most request queues a backend serves.
pub const MAX_QUEUES: u16 = 16;
/// The largest queue a frontend may set up (`SET_VRING_NUM`).
pub const MAX_QUEUE_SIZE: usize = 1024;
