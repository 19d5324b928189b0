//! A virtio-mmio transport's saved state: its registers, each queue's layout and position, and
//! the state of the device behind it. The transport is saved with its data path quiesced
//! (every request in flight completed), so the queue positions are all a restored device
//! needs to go on where the source stopped.

use super::transport::MmioTransport;
use crate::devices::virtio::VirtioDevice;
use crate::persist::Persist;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};

/// Errors saving or restoring a transport.
#[derive(Debug, Error)]
pub enum TransportStateError<E: std::error::Error + 'static> {
    /// Saving needs the data path quiesced.
    #[error("virtio device saved while its data path runs")]
    DataPathRunning,
    /// The saved device is of another kind.
    #[error("saved virtio device type {saved}, this one is {this}")]
    DeviceType {
        /// The saved device's id.
        saved: u32,
        /// This device's.
        this: u32,
    },
    /// The saved device has another number of queues.
    #[error("{saved} saved queues for a device with {this}")]
    QueueCount {
        /// Saved queues.
        saved: usize,
        /// This device's.
        this: usize,
    },
    /// A saved queue does not make a queue.
    #[error("saved queue {0}")]
    Queue(usize, #[source] virtio_queue::Error),
    /// A saved queue of an activated device lies outside guest memory.
    #[error("saved queue {0} is not valid in guest memory")]
    QueueOutside(usize),
    /// The device behind the transport.
    #[error("virtio device")]
    Device(#[source] E),
}

/// One virtqueue's position and layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available entry the device will read.
    pub next_avail: u16,
    /// Next used entry the device will write.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in use.
    pub event_idx: bool,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(s: virtio_queue::QueueState) -> QueueState {
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl From<&QueueState> for virtio_queue::QueueState {
    fn from(q: &QueueState) -> virtio_queue::QueueState {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport's registers, its queues, whether the device is active, and the
/// device's own state `D`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState<D> {
    /// The virtio device id (checked on restore).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// DRIVER_OK was accepted and the device runs its data path.
    pub activated: bool,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues.
    pub queues: Vec<QueueState>,
    /// The device behind the transport.
    pub device: D,
}

impl<D: VirtioDevice + Persist> Persist for MmioTransport<D> {
    type State = TransportState<D::State>;
    type Error = TransportStateError<D::Error>;

    fn save(&self) -> Result<Self::State, Self::Error> {
        if self.data_path {
            return Err(TransportStateError::DataPathRunning);
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: self.device.save().map_err(TransportStateError::Device)?,
        })
    }

    fn restore(&mut self, saved: &Self::State) -> Result<(), Self::Error> {
        let this = self.device.device_type();
        if saved.device_type != this {
            return Err(TransportStateError::DeviceType {
                saved: saved.device_type,
                this,
            });
        }
        if saved.queues.len() != self.queues.len() {
            return Err(TransportStateError::QueueCount {
                saved: saved.queues.len(),
                this: self.queues.len(),
            });
        }
        let mut queues = Vec::new();
        for (i, q) in saved.queues.iter().enumerate() {
            queues.push(
                Queue::try_from(virtio_queue::QueueState::from(q))
                    .map_err(|e| TransportStateError::Queue(i, e))?,
            );
        }
        if saved.activated {
            for (i, q) in queues.iter().enumerate() {
                if !q.is_valid(self.mem.as_ref()) {
                    return Err(TransportStateError::QueueOutside(i));
                }
            }
        }
        self.device
            .restore(&saved.device)
            .map_err(TransportStateError::Device)?;
        self.queues = queues;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.driver_features = saved.driver_features;
        self.queue_sel = saved.queue_sel;
        self.status = saved.status;
        self.activated = saved.activated;
        self.data_path = false;
        self.interrupt.set_status(saved.interrupt_status);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::transport::{
        REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_LOW,
        REG_QUEUE_DRIVER_LOW, REG_QUEUE_NUM, REG_QUEUE_READY, REG_STATUS, STATUS_DRIVER_OK,
        STATUS_FEATURES_OK,
    };
    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::virtio::VirtioInterrupt;
    use crate::devices::virtio::{Activation, VirtioError};
    use crate::devices::IrqLine;
    use crate::memory::GuestMem;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A device that records activations and hands its queues back on quiesce.
    struct Probe {
        activations: Arc<AtomicUsize>,
        queues: Vec<Queue>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
            self.activations.fetch_add(1, Ordering::SeqCst);
            self.queues = a.queues.into_iter().map(|(q, _)| q).collect();
            Ok(())
        }
        fn reset(&mut self) {}
        fn quiesce(&mut self) -> Result<Vec<Queue>, VirtioError> {
            Ok(std::mem::take(&mut self.queues))
        }
    }

    impl Persist for Probe {
        type State = ();
        type Error = Infallible;
        fn save(&self) -> Result<(), Infallible> {
            Ok(())
        }
        fn restore(&mut self, _state: &()) -> Result<(), Infallible> {
            Ok(())
        }
    }

    fn transport(mem: &Arc<GuestMem>) -> (MmioTransport<Probe>, Arc<AtomicUsize>) {
        let activations = Arc::new(AtomicUsize::new(0));
        let probe = Probe {
            activations: activations.clone(),
            queues: Vec::new(),
        };
        let line = IrqLine {
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            gsi: 5,
        };
        let t = MmioTransport::new(
            probe,
            mem.clone(),
            Arc::new(VirtioInterrupt::new(line)),
            vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        );
        (t, activations)
    }

    fn write(t: &mut MmioTransport<Probe>, reg: u64, v: u32) {
        BusDevice::write(t, reg, &v.to_le_bytes());
    }

    #[test]
    fn a_saved_transport_restores_with_its_queue_and_restarts_on_unquiesce() {
        let (mem, _fd) = crate::memory::create_guest_memory(16).unwrap();
        let (mut t, activations) = transport(&mem);
        for status in [1, 3] {
            write(&mut t, REG_STATUS, status);
        }
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        write(&mut t, REG_STATUS, 3 | STATUS_FEATURES_OK);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DESC_LOW, 0x10000);
        write(&mut t, REG_QUEUE_DRIVER_LOW, 0x11000);
        write(&mut t, REG_QUEUE_DEVICE_LOW, 0x12000);
        write(&mut t, REG_QUEUE_READY, 1);
        write(
            &mut t,
            REG_STATUS,
            3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        assert!(t.save().is_err(), "saved while the data path runs");

        t.quiesce().unwrap();
        let saved = t.save().unwrap();
        assert!(saved.activated);
        assert_eq!(saved.queues[0].desc_table, 0x10000);
        assert_eq!(saved.queues[0].size, 16);

        let (mut fresh, fresh_activations) = transport(&mem);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save().unwrap(), saved);
        assert_eq!(
            fresh_activations.load(Ordering::SeqCst),
            0,
            "no data path before resume"
        );
        fresh.unquiesce().unwrap();
        assert_eq!(fresh_activations.load(Ordering::SeqCst), 1);

        let mut other = saved.clone();
        other.device_type = 1;
        assert!(transport(&mem).0.restore(&other).is_err());
        let mut outside = saved;
        outside.queues[0].used_ring = 64 << 20;
        assert!(transport(&mem).0.restore(&outside).is_err());
    }
}
