//! A VM's disk: virtio-blk served in the VMM ([`super::block`]) or by a vhost-user backend
//! process ([`super::vhost_user`]). Both save the same state (what the guest's driver saw), so
//! a guest moves between them: a snapshot of an in-VMM disk restores onto a vhost-user one and
//! a migration may change the kind, as long as the offer is the same.

use super::block::{Block, BlockState, BlockStateError};
use super::vhost_user::VhostUserBlk;
use super::{Activation, VirtioDevice, VirtioError};
use crate::persist::Persist;
use virtio_queue::Queue;

/// One disk.
pub enum DiskDevice {
    /// Served in the VMM.
    Block(Block),
    /// Served by a vhost-user backend.
    VhostUser(VhostUserBlk),
}

impl DiskDevice {
    fn dev(&self) -> &dyn VirtioDevice {
        match self {
            DiskDevice::Block(b) => b,
            DiskDevice::VhostUser(v) => v,
        }
    }

    fn dev_mut(&mut self) -> &mut dyn VirtioDevice {
        match self {
            DiskDevice::Block(b) => b,
            DiskDevice::VhostUser(v) => v,
        }
    }
}

impl VirtioDevice for DiskDevice {
    fn device_type(&self) -> u32 {
        self.dev().device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.dev().queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.dev().features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.dev().read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.dev_mut().write_config(offset, data)
    }
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.dev_mut().activate(activation)
    }
    fn reset(&mut self) {
        self.dev_mut().reset()
    }
    fn quiesce(&mut self) -> Result<Vec<Queue>, VirtioError> {
        self.dev_mut().quiesce()
    }
}

impl Persist for DiskDevice {
    type State = BlockState;
    type Error = BlockStateError;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        match self {
            DiskDevice::Block(b) => b.save(),
            DiskDevice::VhostUser(v) => v.save(),
        }
    }

    fn restore(&mut self, state: &BlockState) -> Result<(), BlockStateError> {
        match self {
            DiskDevice::Block(b) => b.restore(state),
            DiskDevice::VhostUser(v) => v.restore(state),
        }
    }
}
