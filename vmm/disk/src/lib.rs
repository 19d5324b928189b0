//! vmm-disk: a virtio-blk disk's data path, without KVM and without a transport.
//!
//! The VMM's in-process virtio-blk device and the `vhost-user-blk` backend process both serve
//! a guest's block requests with this crate, so a disk behaves the same whichever process
//! serves it:
//! - [`request`]: a descriptor chain parsed into a request (any guest memory type, so the
//!   VMM's dirty-tracked memory and a vhost-user backend's logged memory alike);
//! - [`backend`]: where the data lives, a local file or a storaged volume opened with a lease
//!   through storaged's lease-aware client (reconnect and fencing included);
//! - [`intake`]: the chains a queue takes from its ring, within what it may hold in flight;
//! - [`exec`]: one request run on a backend, from the guest's buffers to its status byte;
//! - [`offer`]: the feature bits and configuration space a disk offers the guest's driver;
//! - [`stats`]: what a disk served (requests, bytes, errors), for the VMM's counters;
//! - [`fuzz`]: a driver's ring through all of the above, as the fuzzer drives it.
#![warn(missing_docs)]

pub mod backend;
pub mod exec;
pub mod fuzz;
pub mod intake;
pub mod offer;
pub mod request;
pub mod stats;

pub use backend::{Backend, BackendError, FileBackend, StoragedBackend};
pub use exec::{Completion, Disk, Job};
pub use intake::{Intake, Stopped};
pub use offer::{Offer, QUEUE_SIZE, SECTOR_SIZE};
pub use request::{Request, RequestError, RequestKind};
pub use stats::DiskStats;
