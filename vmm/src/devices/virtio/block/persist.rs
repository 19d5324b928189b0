//! The block device's saved state: what the guest's driver negotiated against, the features the
//! device offered and the disk's size. Everything else a running block device has lives
//! elsewhere: its queue in the transport's state (the worker hands it back when drained), its
//! data on the backend. Restoring checks that this device offers the same, so that a guest is
//! never resumed on a disk that is smaller, read-only or without a feature it uses.

use super::device::Block;
use crate::persist::Persist;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors restoring a block device.
#[derive(Debug, Error)]
pub enum BlockStateError {
    /// The disk offers other features than the saved device did.
    #[error("the disk offers features {this:#x}; the saved guest negotiated against {saved:#x}")]
    Features {
        /// Offered by the saved device.
        saved: u64,
        /// Offered by this one.
        this: u64,
    },
    /// The disk has another size.
    #[error("the disk has {this} bytes; the saved guest's had {saved}")]
    Size {
        /// The saved disk's.
        saved: u64,
        /// This one's.
        this: u64,
    },
}

/// What the guest's driver saw of the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Feature bits offered.
    pub features: u64,
    /// Disk size in bytes.
    pub size: u64,
}

impl BlockState {
    /// Checks that a device offering `this` can go on with a guest that saw `self`.
    pub fn check(&self, this: &BlockState) -> Result<(), BlockStateError> {
        if self.features != this.features {
            return Err(BlockStateError::Features {
                saved: self.features,
                this: this.features,
            });
        }
        if self.size != this.size {
            return Err(BlockStateError::Size {
                saved: self.size,
                this: this.size,
            });
        }
        Ok(())
    }
}

impl Persist for Block {
    type State = BlockState;
    type Error = BlockStateError;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        Ok(BlockState {
            features: self.features,
            size: self.size,
        })
    }

    fn restore(&mut self, saved: &BlockState) -> Result<(), BlockStateError> {
        saved.check(&self.save()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{Backend, Disk, FileBackend};

    fn block(dir: &std::path::Path, name: &str, size: u64, read_only: bool) -> Block {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let backend = Backend::File(FileBackend::open(&path, read_only).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        Block::new(Disk::new(backend, read_only, "t"), rt.handle().clone())
    }

    #[test]
    fn the_offer_round_trips_and_another_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = block(dir.path(), "a", 1 << 20, false);
        let saved = a.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: BlockState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        let mut same = block(dir.path(), "b", 1 << 20, false);
        same.restore(&back).unwrap();
        assert_eq!(same.save().unwrap(), saved);
        assert!(matches!(
            block(dir.path(), "c", 1 << 20, true).restore(&saved),
            Err(BlockStateError::Features { .. })
        ));
        assert!(matches!(
            block(dir.path(), "d", 2 << 20, false).restore(&saved),
            Err(BlockStateError::Size { .. })
        ));
    }
}
