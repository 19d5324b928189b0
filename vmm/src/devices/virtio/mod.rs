//! virtio over MMIO: the transport ([`mmio`]) and the block device ([`block`]).
//!
//! The transport runs on the vCPU threads (register reads and writes); a device's data path
//! runs elsewhere: queue notifications arrive on ioeventfds that KVM signals without a VM exit
//! reaching user space, and the device raises its interrupt through an irqfd.

pub mod block;
pub mod disk;
pub mod mmio;
pub mod vhost_user;

use super::IrqLine;
use crate::memory::GuestMem;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the modern (1.x) interface, the only one offered.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: interrupt and notification suppression by index.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;

/// Errors from virtio devices.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// The driver set DRIVER_OK with a queue that is not valid.
    #[error("queue {0} is not set up validly")]
    InvalidQueue(usize),
    /// The device could not start its data path.
    #[error("activate {0}")]
    Activate(&'static str, #[source] std::io::Error),
    /// The data path did not stop in time.
    #[error("the data path did not drain within {0:?}")]
    DrainTimeout(std::time::Duration),
    /// The data path is gone.
    #[error("the data path ended before it could be drained")]
    DataPathGone,
    /// The vhost-user backend did not do as asked.
    #[error("vhost-user backend")]
    VhostUser(#[source] vhost_user::VhostUserError),
}

/// A device's interrupt: the MMIO InterruptStatus register plus the irqfd line.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
    /// Bits the InterruptStatus register always reports.
    always: u32,
}

impl VirtioInterrupt {
    /// An interrupt raising `line`.
    pub fn new(line: IrqLine) -> VirtioInterrupt {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
            always: 0,
        }
    }

    /// An interrupt that another process raises by writing the irqfd itself (a vhost-user
    /// backend's call eventfd): the VMM never sees those, so the register reports a used
    /// buffer as always pending, and the driver checks its queues on every interrupt.
    pub fn raised_by_backend(line: IrqLine) -> VirtioInterrupt {
        VirtioInterrupt {
            always: VIRTIO_MMIO_INT_VRING,
            ..VirtioInterrupt::new(line)
        }
    }

    /// The irqfd.
    pub fn irqfd(&self) -> &EventFd {
        &self.line.evt
    }

    /// Marks used buffers and raises the line.
    pub fn signal_used_queue(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.line.raise() {
            tracing::warn!(error = %e, gsi = self.line.gsi, "virtio interrupt lost");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst) | self.always
    }

    /// A write to InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the InterruptStatus register (restoring a saved state).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory (dirty-tracked).
    pub mem: Arc<GuestMem>,
    /// The configured queues with their notification eventfds.
    pub queues: Vec<(Queue, EventFd)>,
    /// Features the driver acknowledged.
    pub features: u64,
    /// The device's interrupt.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// A read of the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A write to it (ignored by devices whose configuration is read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the data path.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// Stops the data path after a driver reset; the transport then resets its own state.
    fn reset(&mut self);
    /// Stops the data path once every request in flight has completed and been returned to
    /// the driver, and gives back the queues as the data path left them (for a saved state,
    /// or to restart it with [`VirtioDevice::activate`]).
    /// On an error the data path runs on as it did (a drain that did not finish in time is
    /// given up, and the device serves its queues again).
    fn quiesce(&mut self) -> Result<Vec<Queue>, VirtioError>;
}

pub use vmm_disk::offer::read_config_bytes;
