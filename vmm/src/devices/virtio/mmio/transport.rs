//! Register file of a virtio-mmio device (virtio spec 1.2, section 4.2.2).
//!
//! The driver's sequence: reset (status 0), ACKNOWLEDGE, DRIVER, read device features and
//! write driver features (32 bits at a time, selected by the *FeaturesSel registers),
//! FEATURES_OK, set up each queue (QueueSel, QueueNum, the three ring addresses, QueueReady),
//! then DRIVER_OK, at which point the device is activated with the queues. A notification
//! write (QueueNotify) normally never reaches this code: KVM matches it against the ioeventfd
//! registered for that queue and signals the device directly.

use super::super::{Activation, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::memory::GuestMem;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x564d_4850; // "PHMV"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(super) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(super) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(super) const REG_QUEUE_NUM: u64 = 0x038;
pub(super) const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: the offset the ioeventfds are registered at.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
pub(super) const REG_STATUS: u64 = 0x070;
pub(super) const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(super) const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(super) const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

pub(super) const STATUS_DRIVER_OK: u32 = 4;
pub(super) const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

/// One virtio-mmio device window in front of device `D`.
pub struct MmioTransport<D> {
    pub(super) device: D,
    pub(super) mem: Arc<GuestMem>,
    pub(super) interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    pub(super) queues: Vec<Queue>,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) status: u32,
    /// DRIVER_OK was accepted.
    pub(super) activated: bool,
    /// The device's data path runs (false while quiesced for a saved state, and on a
    /// migration's destination until the guest resumes).
    pub(super) data_path: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; `queue_evts[i]` is the ioeventfd registered for queue `i`.
    pub fn new(
        device: D,
        mem: Arc<GuestMem>,
        interrupt: Arc<VirtioInterrupt>,
        queue_evts: Vec<EventFd>,
    ) -> MmioTransport<D> {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            data_path: false,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect()
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.data_path {
            self.device.reset();
        }
        self.activated = false;
        self.data_path = false;
        self.queues = Self::fresh_queues(&self.device);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        if status & STATUS_FEATURES_OK != 0 && self.driver_features & !self.features() != 0 {
            // The driver accepted features we never offered: refuse FEATURES_OK.
            self.status = status & !STATUS_FEATURES_OK;
            return;
        }
        self.status = status;
        if status & STATUS_DRIVER_OK != 0 && !self.activated {
            for (i, q) in self.queues.iter().enumerate() {
                if !q.is_valid(self.mem.as_ref()) {
                    tracing::error!(queue = i, "virtio device activation failed: invalid queue");
                    self.status |= STATUS_FAILED;
                    return;
                }
            }
            if let Err(e) = self.start_data_path() {
                tracing::error!(error = %e, "virtio device activation failed");
                self.status |= STATUS_FAILED;
                return;
            }
            self.activated = true;
        }
    }

    /// Stops the data path with every request in flight completed (see
    /// [`VirtioDevice::quiesce`]); the queues' positions come back here for a saved state.
    pub fn quiesce(&mut self) -> Result<(), super::super::VirtioError> {
        if self.data_path {
            self.queues = self.device.quiesce()?;
            self.data_path = false;
        }
        Ok(())
    }

    /// Restarts the data path of an activated device after [`Self::quiesce`] or a restore.
    pub fn unquiesce(&mut self) -> Result<(), super::super::VirtioError> {
        if self.activated && !self.data_path {
            self.start_data_path()?;
            // An interrupt raised while the data path drained may have reached KVM after the
            // irqchip was saved; one more is harmless (the driver reads the used ring) and a
            // lost one would leave the guest waiting for a completion forever.
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn start_data_path(&mut self) -> Result<(), super::super::VirtioError> {
        let mut queues = Vec::new();
        for (q, evt) in self.queues.iter().zip(&self.queue_evts) {
            let evt = evt
                .try_clone()
                .map_err(|e| super::super::VirtioError::Activate("clone queue eventfd", e))?;
            // The device gets its own copy; the transport's stays for register reads.
            let q = Queue::try_from(q.state())
                .map_err(|_| super::super::VirtioError::InvalidQueue(queues.len()))?;
            queues.push((q, evt));
        }
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
        })?;
        self.data_path = true;
        Ok(())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16)
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1)
                }
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                let (lo, hi) = split(offset == REG_QUEUE_DESC_LOW, v);
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(lo, hi)
                }
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                let (lo, hi) = split(offset == REG_QUEUE_DRIVER_LOW, v);
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(lo, hi)
                }
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                let (lo, hi) = split(offset == REG_QUEUE_DEVICE_LOW, v);
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(lo, hi)
                }
            }
            QUEUE_NOTIFY_OFFSET => {
                // Only reached if the ioeventfd did not match (e.g. an odd access width).
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            _ => tracing::debug!(
                offset,
                v,
                "virtio-mmio write to read-only or unknown register"
            ),
        }
    }
}

fn split(low: bool, v: u32) -> (Option<u32>, Option<u32>) {
    if low {
        (Some(v), None)
    } else {
        (None, Some(v))
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}
