//! The virtio-blk configuration space and the feature bits this device offers.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use zerocopy::{Immutable, IntoBytes, KnownLayout};

use crate::limits::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_SEGMENTS, MAX_SEGMENT_BYTES, SECTOR_SHIFT,
};

/// `VHOST_F_LOG_ALL`: the frontend asks the backend to log the guest pages it writes.
pub const VHOST_F_LOG_ALL: u32 = 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES`: the vhost-user protocol feature negotiation exists.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Offset of `writeback` in the config space: the only field a driver may write
/// (`VIRTIO_BLK_F_CONFIG_WCE`).
pub const WRITEBACK_OFFSET: usize = 32;

/// The virtio-blk configuration space (virtio 1.2, 5.2.4), little-endian, 60 bytes.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, IntoBytes, Immutable, KnownLayout)]
pub struct BlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<BlkConfig>() == 60);

impl BlkConfig {
    /// The config space of a disk of `size_bytes` served with `num_queues` queues, whose
    /// host I/O needs `block_size` alignment.
    pub fn new(size_bytes: u64, block_size: u32, num_queues: u16, writeback: bool) -> Self {
        let block_sectors = (block_size >> SECTOR_SHIFT).max(1);
        BlkConfig {
            capacity: (size_bytes >> SECTOR_SHIFT).to_le(),
            size_max: MAX_SEGMENT_BYTES.to_le(),
            seg_max: (MAX_SEGMENTS as u32).to_le(),
            blk_size: block_size.to_le(),
            physical_block_exp: 0,
            min_io_size: 1u16.to_le(),
            opt_io_size: 0,
            writeback: u8::from(writeback),
            num_queues: num_queues.to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: MAX_DISCARD_SEGMENTS.to_le(),
            discard_sector_alignment: block_sectors.to_le(),
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }
}

/// The virtio feature bits this device offers (the vhost-user layer adds its own).
pub fn device_features(read_only: bool, queues: u16) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VHOST_F_LOG_ALL,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | (1u64 << bit));
    if read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    }
    if queues > 1 {
        bits |= 1 << VIRTIO_BLK_F_MQ;
    }
    bits
}

/// Names of the feature bits set in `features`, for the control API.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    const NAMES: &[(u32, &str)] = &[
        (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (VIRTIO_BLK_F_RO, "RO"),
        (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (VIRTIO_BLK_F_MQ, "MQ"),
        (VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (VHOST_F_LOG_ALL, "LOG_ALL"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| features & (1u64 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// The slice of `config` a `GET_CONFIG` at `offset`/`size` asks for; empty if out of range.
pub fn config_slice(config: &BlkConfig, offset: u32, size: u32) -> Vec<u8> {
    let bytes = config.as_bytes();
    let start = offset as usize;
    match start.checked_add(size as usize) {
        Some(end) if end <= bytes.len() => bytes[start..end].to_vec(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_the_spec() {
        let c = BlkConfig::new(1 << 30, 512, 2, true);
        let b = c.as_bytes();
        assert_eq!(&b[0..8], &(2_097_152u64).to_le_bytes());
        assert_eq!(&b[20..24], &512u32.to_le_bytes());
        assert_eq!(b[WRITEBACK_OFFSET], 1);
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
        assert_eq!(&b[40..44], &MAX_DISCARD_SEGMENTS.to_le_bytes());
        assert_eq!(config_slice(&c, 34, 2), vec![2, 0]);
        assert!(config_slice(&c, 59, 2).is_empty());
        assert!(config_slice(&c, u32::MAX, 2).is_empty());
    }

    #[test]
    fn read_only_and_mq_bits() {
        let rw = device_features(false, 1);
        let ro = device_features(true, 4);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_MQ), 0);
        assert!(feature_names(rw).contains(&"LOG_ALL"));
        assert!(feature_names(rw).contains(&"VERSION_1"));
    }
}
