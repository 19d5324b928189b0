//! What a disk offers the guest's driver: its virtio-blk feature bits and its configuration
//! space (`struct virtio_blk_config`, virtio spec 1.2, 5.2.4). One definition for the VMM's
//! in-process device and the vhost-user backend, so that a guest that negotiated with one can
//! go on with the other (a saved state checks the offer, see the VMM's block `persist`).

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Descriptors per queue, and so the most requests in flight on one queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments in one request (`seg_max`): every descriptor but the header's and the
/// status byte's, so that a chain fits the queue's descriptor table.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Largest discard / write-zeroes request, in sectors (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Ranges in one discard / write-zeroes request.
pub const MAX_RANGE_SEGMENTS: u32 = 32;
/// Bytes of the configuration space up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: usize = 60;
/// Offset of `num_queues` in the configuration space.
pub const CONFIG_NUM_QUEUES: usize = 34;

/// A disk's offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// virtio-blk and ring feature bits (VIRTIO_F_VERSION_1 is the transport's).
    pub features: u64,
    /// The configuration space.
    pub config: Vec<u8>,
}

impl Offer {
    /// The offer of a disk of `size` bytes with `queues` request queues (1 or more).
    pub fn new(size: u64, read_only: bool, discard: bool, queues: u16) -> Offer {
        let mut features = (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else if discard {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        let mut c = vec![0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes()); // capacity
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 0; // write_zeroes_may_unmap: zeroes are written, not holes punched
        Offer {
            features,
            config: c,
        }
    }

    /// `len` bytes of the configuration space from `offset`; bytes past its end read as zero.
    pub fn config_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        read_config_bytes(&self.config, offset, &mut out);
        out
    }
}

/// Copies `data.len()` bytes of `config` from `offset`; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *b = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offer_follows_the_disk() {
        let rw = Offer::new(1 << 20, false, true, 1);
        assert_eq!(&rw.config[0..8], &2048u64.to_le_bytes());
        assert_ne!(rw.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(rw.features & (1 << VIRTIO_BLK_F_MQ), 0);
        let ro = Offer::new(1 << 20, true, true, 1);
        assert_ne!(ro.features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let mq = Offer::new(1 << 20, false, false, 4);
        assert_ne!(mq.features & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(mq.config_bytes(CONFIG_NUM_QUEUES as u64, 2), vec![4, 0]);
        assert_eq!(mq.config_bytes(58, 4), vec![0; 4]);
        assert_eq!(mq.config_bytes(u64::MAX, 2), vec![0; 2]);
    }
}
